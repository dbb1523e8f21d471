"""Semantic encoder: the Qwen2-VL vision tower (SPEC 1.2).

    images float[N, Hs, Ws, 3] in [0, 1]  (Hs, Ws multiples of patch * merge = 28)
      -> CLIP normalisation
      -> patches in 2x2-merge order, each flattened as (c, t, ky, kx) with the still image repeated
         twice in time -> patch_embed (the Conv3d as a matmul)
      -> blocks: x += attn(norm1 x) with 2-D vision RoPE; x += fc2(quick_gelu(fc1(norm2 x)))
      -> merger: ln_q -> concatenate each 2x2 group -> mlp_0 -> GELU -> mlp_2
      -> float[N, (Hs/28) * (Ws/28), out_dim]

Token order. The official processor (Qwen2VLImageProcessor) lays the patches of an image out as
(merged row i, merged col j, dy, dx) for patch (row 2i+dy, col 2j+dx), and the merger views each
run of 4 consecutive patches as one token. So merged token k = i * (Ws/28) + j: the output is the
row-major order of the merged (Hs/28, Ws/28) grid. The rotary positions are the (row, col) of each
patch in that same 2x2-merge order (tests/test_model_encoders.py checks both against the official
processor + model).

Attention never crosses images (each image is its own batch row). Unlike the official code, which
casts q/k/v to bf16 inside attention, attention runs in the module's compute dtype.

Parameter mapping (ours -> official `vit_model.*`; kernels are `w.reshape(out, -1).T`):
    patch_embed.proj.kernel [3*2*14*14, E]   patch_embed.proj.weight [E, 3, 2, 14, 14]
    blocks[i].norm1.{scale,bias}             blocks.i.norm1.{weight,bias}
    blocks[i].attn.qkv.{kernel,bias}         blocks.i.attn.qkv.{weight,bias}   (out = [q | k | v], heads inside)
    blocks[i].attn.proj.{kernel,bias}        blocks.i.attn.proj.{weight,bias}
    blocks[i].norm2.{scale,bias}             blocks.i.norm2.{weight,bias}
    blocks[i].mlp.fc1 / mlp.fc2              blocks.i.mlp.fc1 / mlp.fc2
    merger.ln_q.{scale,bias}                 merger.ln_q.{weight,bias}
    merger.mlp_0.{kernel,bias}               merger.mlp.0.{weight,bias}   (nn.Sequential index 0)
    merger.mlp_2.{kernel,bias}               merger.mlp.2.{weight,bias}   (index 1 is the GELU)
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2vlm_jax.config import VitConfig
from g2vlm_jax.model import encoder_layers as el
from g2vlm_jax.model.rope import apply_rotary, vision_rope_cos_sin


class PatchEmbed(nnx.Module):
    """The Conv3d (kernel = stride = (T, p, p), no bias) as a matmul over flattened patches."""

    def __init__(self, cfg: VitConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.cfg = cfg
        self.dtype = dtype
        fan_in = 3 * cfg.temporal_patch_size * cfg.patch_size ** 2
        self.proj = el.dense(fan_in, cfg.hidden_size, (None, "enc_embed"), rngs=rngs, dtype=dtype,
                             param_dtype=param_dtype, use_bias=False)

    def __call__(self, patches: jax.Array) -> jax.Array:
        """patches: float[N, L, 3*p*p] flattened (c, ky, kx) -> float[N, L, E].

        A still image is the same frame at both time steps, so the Conv3d equals a matmul with the
        kernel summed over time: half the FLOPs of materialising the repeated frame.
        """
        c, t, p = 3, self.cfg.temporal_patch_size, self.cfg.patch_size
        kernel = self.proj.kernel.get_value().astype(jnp.float32)
        kernel = kernel.reshape(c, t, p * p, -1).sum(axis=1).reshape(c * p * p, -1)
        return jnp.einsum("nlk,ke->nle", patches.astype(self.dtype), kernel.astype(self.dtype))


class VisionAttention(nnx.Module):
    def __init__(self, cfg: VitConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.num_heads = cfg.num_heads
        e = cfg.hidden_size
        self.qkv = el.dense(e, 3 * e, ("enc_embed", "enc_heads"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.proj = el.dense(e, e, ("enc_heads", "enc_embed"), rngs=rngs, dtype=dtype, param_dtype=param_dtype)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x: float[N, L, E]; cos, sin: float[L, Dh] -> float[N, L, E]."""
        n, l, e = x.shape
        qkv = self.qkv(x).reshape(n, l, 3, self.num_heads, e // self.num_heads)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        q = apply_rotary(q, cos[None], sin[None])
        k = apply_rotary(k, cos[None], sin[None])
        return self.proj(el.attention(q, k, v).reshape(n, l, e))


class VisionMlp(nnx.Module):
    def __init__(self, cfg: VitConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = el.dense(cfg.hidden_size, cfg.mlp_hidden, ("enc_embed", "enc_mlp"), **kw)
        self.fc2 = el.dense(cfg.mlp_hidden, cfg.hidden_size, ("enc_mlp", "enc_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(el.quick_gelu(self.fc1(x)))


class VisionBlock(nnx.Module):
    def __init__(self, cfg: VitConfig, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = el.layer_norm(cfg.hidden_size, cfg.ln_eps, **kw)
        self.attn = VisionAttention(cfg, **kw)
        self.norm2 = el.layer_norm(cfg.hidden_size, cfg.ln_eps, **kw)
        self.mlp = VisionMlp(cfg, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """LayerNorm, then each run of merge^2 consecutive patches -> one token of width out_dim."""

    def __init__(self, cfg: VitConfig, out_dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.group = cfg.spatial_merge_size ** 2
        wide = cfg.hidden_size * self.group
        self.ln_q = el.layer_norm(cfg.hidden_size, cfg.ln_eps, **kw)
        self.mlp_0 = el.dense(wide, wide, (None, "enc_mlp"), **kw)
        self.mlp_2 = el.dense(wide, out_dim, ("enc_mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: float[N, L, E] in 2x2-merge order -> float[N, L / merge^2, out_dim]."""
        n, l, e = x.shape
        x = self.ln_q(x).reshape(n, l // self.group, self.group * e)
        return self.mlp_2(el.gelu(self.mlp_0(x)))


def merge_order_positions(mh: int, mw: int, merge: int) -> np.ndarray:
    """(row, col) of every patch in 2x2-merge order: int32[mh*mw*merge^2, 2].

    Entry ((i * mw + j) * merge + dy) * merge + dx is patch (i * merge + dy, j * merge + dx).
    """
    i, j, dy, dx = np.meshgrid(np.arange(mh), np.arange(mw), np.arange(merge), np.arange(merge), indexing="ij")
    return np.stack([i * merge + dy, j * merge + dx], axis=-1).reshape(-1, 2).astype(np.int32)


class SemanticEncoder(nnx.Module):
    """Qwen2-VL ViT + merger. Official checkpoint prefix: `vit_model.`."""

    def __init__(self, cfg: VitConfig, out_dim: int, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.cfg = cfg
        self.dtype = dtype
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.blocks = nnx.List([VisionBlock(cfg, **kw) for _ in range(cfg.num_layers)])
        self.merger = PatchMerger(cfg, out_dim, **kw)

    def patchify(self, images: jax.Array) -> jax.Array:
        """images float[N, Hs, Ws, 3] (normalised) -> float[N, L, 3*p*p] in 2x2-merge order, (c, ky, kx)."""
        n, hs, ws, c = images.shape
        p, m = self.cfg.patch_size, self.cfg.spatial_merge_size
        mh, mw = hs // (p * m), ws // (p * m)
        x = images.reshape(n, mh, m, p, mw, m, p, c)  # rows (i, dy, ky), cols (j, dx, kx)
        x = x.transpose(0, 1, 4, 2, 5, 7, 3, 6)  # n, i, j, dy, dx, c, ky, kx
        return x.reshape(n, mh * mw * m * m, c * p * p)

    def __call__(self, images: jax.Array) -> jax.Array:
        """images: float[N, Hs, Ws, 3] in [0, 1] -> float[N, (Hs/28)*(Ws/28), out_dim]."""
        cfg = self.cfg
        side = cfg.patch_size * cfg.spatial_merge_size
        if images.ndim != 4 or images.shape[-1] != 3 or images.shape[1] % side or images.shape[2] % side:
            raise ValueError(f"SemanticEncoder expects images float[N, H, W, 3] with H, W multiples of {side}; "
                             f"got shape {images.shape}. Resize (the official size is 756x756).")
        mean = jnp.asarray(cfg.image_mean, jnp.float32)
        std = jnp.asarray(cfg.image_std, jnp.float32)
        x = ((images.astype(jnp.float32) - mean) / std).astype(self.dtype)
        x = self.patch_embed(self.patchify(x))
        rows_cols = merge_order_positions(images.shape[1] // side, images.shape[2] // side, cfg.spatial_merge_size)
        cos, sin = vision_rope_cos_sin(jnp.asarray(rows_cols), cfg.hidden_size // cfg.num_heads, cfg.rope_theta)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.merger(x)


def load_official_weights(module: SemanticEncoder, state_dict: Mapping[str, np.ndarray], prefix: str = "") -> list[str]:
    """Loads official `vit_model.*` weights (pass prefix='vit_model.' for a full checkpoint) in place.

    Returns the consumed keys; raises ValueError on a missing, misshapen or unused weight.
    """
    return el.load_official(module, state_dict, prefix)
