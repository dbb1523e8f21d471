"""Geometry encoder: DINOv2-L/14 with 4 registers (HF Dinov2WithRegisters layout, SPEC 1.3).

    images float[N, H, W, 3] in [0, 1]  (H, W multiples of 14)
      -> ImageNet normalisation -> patch conv (a matmul over (c, ky, kx) patches)
      -> [CLS, patches] + position embedding (bicubic-antialias interpolated to the (H/14, W/14) grid)
      -> insert the register tokens after CLS (no position embedding)
      -> pre-LN layers: x += ls1 * attn(norm1 x); x += ls2 * fc2(gelu(fc1(norm2 x)))
      -> final layernorm -> patch tokens only: float[N, (H/14) * (W/14), hidden]

Attention is within each image (each image is its own batch row). The official G2VLM packs images
with wrong segment lengths (SPEC 1.3); this module does what the HF model does per image.
`dino2llm` (1024 -> D) belongs to the top-level model, not here.

Position interpolation matches HF `interpolate_pos_encoding` as the G2VLM code calls it:
`F.interpolate(size=(h, w), mode="bicubic", align_corners=False, antialias=True)` in fp32 with an
explicit output size (scale = in/out, no +0.1 offset). Torch's antialiased bicubic is the PIL-style
separable resampler with the Keys kernel a = -0.5, support 2 * max(scale, 1), weights normalised
over the in-range taps (`bicubic_aa_matrix`). At the native grid it is the identity.

Parameter mapping (ours -> official `dino_model.*`; kernels are `w.reshape(out, -1).T`):
    embeddings.cls_token [1, 1, C]                      embeddings.cls_token
    embeddings.register_tokens [1, R, C]                embeddings.register_tokens
    embeddings.position_embeddings [1, G*G+1, C]        embeddings.position_embeddings
    embeddings.mask_token [1, C]                        embeddings.mask_token
    embeddings.patch_embeddings.projection.kernel [3*14*14, C]
                                                        embeddings.patch_embeddings.projection.weight [C, 3, 14, 14]
    encoder.layer[i].norm1 / norm2 .{scale,bias}        encoder.layer.i.norm1 / norm2 .{weight,bias}
    encoder.layer[i].attention.attention.{query,key,value}.{kernel,bias}
                                            encoder.layer.i.attention.attention.{query,key,value}.{weight,bias}
    encoder.layer[i].attention.output.dense             encoder.layer.i.attention.output.dense
    encoder.layer[i].layer_scale{1,2}.lambda1 [C]       encoder.layer.i.layer_scale{1,2}.lambda1
    encoder.layer[i].mlp.fc1 / mlp.fc2                  encoder.layer.i.mlp.fc1 / mlp.fc2
    layernorm.{scale,bias}                              layernorm.{weight,bias}
The mask token serves only DINOv2's masked pre-training and is never used in a forward pass here; it
is kept (it gets no gradient) so that official -> ours -> official is the identity.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2vlm_jax.config import DinoConfig
from g2vlm_jax.model import encoder_layers as el

def _keys_cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    x = np.abs(x)
    near = ((a + 2) * x - (a + 3)) * x * x + 1
    far = ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
    return np.where(x < 1, near, np.where(x < 2, far, 0.0))


def bicubic_aa_matrix(in_size: int, out_size: int) -> np.ndarray:
    """float64[out_size, in_size]: torch's bicubic antialias resampling along one axis (align_corners=False)."""
    scale = in_size / out_size
    support = 2.0 * scale if scale >= 1.0 else 2.0
    inv = 1.0 / scale if scale >= 1.0 else 1.0
    mat = np.zeros((out_size, in_size))
    for i in range(out_size):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), in_size)
        taps = np.arange(lo, hi)
        w = _keys_cubic((taps - center + 0.5) * inv)
        total = w.sum()
        mat[i, lo:hi] = w / total if total != 0 else w
    return mat


def interpolate_pos_embed(grid_embed: jax.Array, h: int, w: int) -> jax.Array:
    """Resizes a learned position grid [G, G, C] to float32[h, w, C]; identity at (G, G).

    Computed and returned in fp32 whatever the parameter dtype (the caller casts to the compute
    dtype, as HF DINOv2 does), so bf16 master weights lose no more than one final rounding.
    """
    g = grid_embed.shape[0]
    if (h, w) == (g, g):
        return grid_embed.astype(jnp.float32)
    mh = jnp.asarray(bicubic_aa_matrix(g, h), jnp.float32)
    mw = jnp.asarray(bicubic_aa_matrix(g, w), jnp.float32)
    return jnp.einsum("hi,ijc,wj->hwc", mh, grid_embed.astype(jnp.float32), mw, precision=jax.lax.Precision.HIGHEST)


class Dinov2PatchEmbeddings(nnx.Module):
    def __init__(self, cfg: DinoConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.patch = cfg.patch_size
        self.projection = el.dense(3 * cfg.patch_size ** 2, cfg.hidden_size, (None, "enc_embed"), rngs=rngs,
                                   dtype=dtype, param_dtype=param_dtype)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images: float[N, H, W, 3] -> float[N, (H/p)*(W/p), C], patches row-major, flattened (c, ky, kx)."""
        n, hh, ww, c = images.shape
        p = self.patch
        x = images.reshape(n, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 5, 2, 4)
        return self.projection(x.reshape(n, (hh // p) * (ww // p), c * p * p))


class Dinov2Embeddings(nnx.Module):
    def __init__(self, cfg: DinoConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        c = cfg.hidden_size
        names = (None, None, "enc_embed")
        self.pos_grid = cfg.pos_grid
        self.dtype = dtype
        self.cls_token = el.normal_param(rngs, (1, 1, c), names, param_dtype)
        self.register_tokens = el.normal_param(rngs, (1, cfg.num_registers, c), names, param_dtype)
        self.position_embeddings = el.normal_param(rngs, (1, cfg.pos_grid ** 2 + 1, c), names, param_dtype,
                                                   std=cfg.position_init_std)
        # Unused in the forward (DINOv2 masked pre-training only); zeros as the official initialisation. No
        # key is drawn from `rngs`, so every other parameter initialises as before the token was kept.
        self.mask_token = nnx.Param(nnx.with_partitioning(nnx.initializers.zeros_init(), (None, "enc_embed"))(
            jax.random.key(0), (1, c), param_dtype))
        self.patch_embeddings = Dinov2PatchEmbeddings(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def position_table(self, h: int, w: int) -> jax.Array:
        """float[1 + h*w, C]: the CLS position embedding, then the patch grid resized to (h, w)."""
        pos = self.position_embeddings.get_value()[0]
        grid = pos[1:].reshape(self.pos_grid, self.pos_grid, -1)
        patches = interpolate_pos_embed(grid, h, w).reshape(h * w, -1)
        return jnp.concatenate([pos[:1].astype(jnp.float32), patches], axis=0)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images: float[N, H, W, 3] normalised -> float[N, 1 + R + h*w, C] = [CLS, registers, patches]."""
        n, hh, ww, _ = images.shape
        p = self.patch_embeddings.patch
        patches = self.patch_embeddings(images)
        cls = jnp.broadcast_to(self.cls_token.get_value().astype(self.dtype), (n, 1, patches.shape[-1]))
        x = jnp.concatenate([cls, patches], axis=1) + self.position_table(hh // p, ww // p).astype(self.dtype)
        regs = jnp.broadcast_to(self.register_tokens.get_value().astype(self.dtype),
                                (n,) + self.register_tokens.get_value().shape[1:])
        return jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)


class Dinov2SelfAttention(nnx.Module):
    def __init__(self, cfg: DinoConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        c = cfg.hidden_size
        self.num_heads = cfg.num_heads
        self.query = el.dense(c, c, ("enc_embed", "enc_heads"), **kw)
        self.key = el.dense(c, c, ("enc_embed", "enc_heads"), **kw)
        self.value = el.dense(c, c, ("enc_embed", "enc_heads"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[N, L, C] -> per-image attention context float[N, L, C]."""
        n, l, c = x.shape
        split = lambda t: t.reshape(n, l, self.num_heads, c // self.num_heads)  # noqa: E731
        out = el.attention(split(self.query(x)), split(self.key(x)), split(self.value(x)))
        return out.reshape(n, l, c)


class Dinov2SelfOutput(nnx.Module):
    def __init__(self, cfg: DinoConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.dense = el.dense(cfg.hidden_size, cfg.hidden_size, ("enc_heads", "enc_embed"), rngs=rngs, dtype=dtype,
                              param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.dense(x)


class Dinov2Attention(nnx.Module):
    def __init__(self, cfg: DinoConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.attention = Dinov2SelfAttention(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.output = Dinov2SelfOutput(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.output(self.attention(x))


class Dinov2LayerScale(nnx.Module):
    def __init__(self, cfg: DinoConfig, *, param_dtype):
        init = nnx.with_partitioning(nnx.initializers.constant(cfg.layerscale_init), ("enc_embed",))
        self.lambda1 = nnx.Param(init(None, (cfg.hidden_size,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.lambda1.get_value().astype(x.dtype)


class Dinov2MLP(nnx.Module):
    def __init__(self, cfg: DinoConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = el.dense(cfg.hidden_size, cfg.mlp_hidden, ("enc_embed", "enc_mlp"), **kw)
        self.fc2 = el.dense(cfg.mlp_hidden, cfg.hidden_size, ("enc_mlp", "enc_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(el.gelu(self.fc1(x)))


class Dinov2Layer(nnx.Module):
    def __init__(self, cfg: DinoConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = el.layer_norm(cfg.hidden_size, cfg.ln_eps, **kw)
        self.attention = Dinov2Attention(cfg, **kw)
        self.layer_scale1 = Dinov2LayerScale(cfg, param_dtype=param_dtype)
        self.norm2 = el.layer_norm(cfg.hidden_size, cfg.ln_eps, **kw)
        self.mlp = Dinov2MLP(cfg, **kw)
        self.layer_scale2 = Dinov2LayerScale(cfg, param_dtype=param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.layer_scale1(self.attention(self.norm1(x)))
        return x + self.layer_scale2(self.mlp(self.norm2(x)))


class Dinov2Encoder(nnx.Module):
    def __init__(self, cfg: DinoConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.layer = nnx.List([Dinov2Layer(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
                               for _ in range(cfg.num_layers)])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layer:
            x = layer(x)
        return x


class GeometryEncoder(nnx.Module):
    """DINOv2 with registers, patch tokens out. Official checkpoint prefix: `dino_model.`."""

    def __init__(self, cfg: DinoConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.dtype = dtype
        self.embeddings = Dinov2Embeddings(cfg, **kw)
        self.encoder = Dinov2Encoder(cfg, **kw)
        self.layernorm = el.layer_norm(cfg.hidden_size, cfg.ln_eps, **kw)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images: float[N, H, W, 3] in [0, 1] -> patch tokens float[N, (H/14)*(W/14), hidden]."""
        p = self.cfg.patch_size
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f"GeometryEncoder expects images float[N, H, W, 3] with H, W multiples of {p}; "
                             f"got shape {images.shape}. Resize or crop (the official width is 518).")
        mean = jnp.asarray(self.cfg.image_mean, jnp.float32)
        std = jnp.asarray(self.cfg.image_std, jnp.float32)
        x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
        x = self.layernorm(self.encoder(self.embeddings(x)))
        return x[:, 1 + self.cfg.num_registers:]


def load_official_weights(module: GeometryEncoder, state_dict: Mapping[str, np.ndarray], prefix: str = "") -> list[str]:
    """Loads official `dino_model.*` weights (prefix='dino_model.' for a full checkpoint) in place.

    Returns the consumed keys; raises ValueError on a missing, misshapen or unused weight.
    """
    return el.load_official(module, state_dict, prefix)
