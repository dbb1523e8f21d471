"""Geometry decoders and heads (Pi3 style, SPEC 1.5) on the final-normed geometry tokens.

    tokens float[B, V, h*w, D] (row-major patch grid of every frame)
      point_decoder          per-frame blocks -> linear_out D->point_dim -> point_head (pixel shuffle)
                             -> (u, v, s) -> local points (u e^s, v e^s, e^s)
      camera_decoder         per-frame blocks -> linear_out D->camera_dim -> camera_head -> c2w pose
      global_points_decoder  per-frame self-attention + cross-attention to frame 0 of the same
                             sample -> linear_out -> global_point_head -> raw xyz
      world points = c2w . [local; 1]

Decoder blocks are pre-LN, 2-D RoPE (base `rope_base`, (row, col) of the patch, CroCo layout) on
q and k, exact-GELU MLP. Attention never crosses frames, except the global decoder's cross-attention
whose keys are the (input) tokens of frame 0; frame 0's keys are shared by all V frames, so they are
projected once per sample and all V*h*w queries of a sample attend to them together.
The heads (Pi3LinearPts3d, camera head, rotation) run in fp32 whatever the decoders' dtype.

Pixel shuffle (`LinearPts3d`): channel `c * p^2 + dy * p + dx` of token (y, x) goes to pixel
(y * p + dy, x * p + dx), channel c (torch's F.pixel_shuffle layout that the weights depend on).

Parameter mapping (ours -> official, no prefix; kernels are `w.T`):
    {point,camera}_decoder.blocks[i].norm1 / norm2        {point,camera}_decoder.blocks.i.norm1 / norm2
    {point,camera}_decoder.blocks[i].attn.qkv / attn.proj {point,camera}_decoder.blocks.i.attn.qkv / attn.proj
    {point,camera}_decoder.blocks[i].mlp.fc1 / mlp.fc2    {point,camera}_decoder.blocks.i.mlp.fc1 / mlp.fc2
    {point,camera}_decoder.linear_out                     {point,camera}_decoder.linear_out
    global_points_decoder.blocks[i].{norm1,attn.qkv,attn.proj,norm2,norm_y,cross_attn.{q,k,v}_proj,
        cross_attn.proj,norm3,mlp.fc1,mlp.fc2}            global_points_decoder.blocks.i.<same>
    global_points_decoder.linear_out                      global_points_decoder.linear_out
    point_head.proj, global_point_head.proj               point_head.proj, global_point_head.proj
    camera_head.res_conv[k].res_conv{1,2,3}               camera_head.res_conv.k.res_conv{1,2,3}
    camera_head.more_mlps_0 / more_mlps_2                 camera_head.more_mlps.0 / more_mlps.2 (Sequential)
    camera_head.fc_t, camera_head.fc_rot                  camera_head.fc_t, camera_head.fc_rot
    (cfg.heads.confidence) conf_decoder.*, conf_head.proj conf_decoder.*, conf_head.proj
Every Linear's `.kernel`/`.bias` is the official `.weight`/`.bias`; LayerNorm `.scale` is `.weight`.
"""
from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2vlm_jax import geometry
from g2vlm_jax.config import ModelConfig
from g2vlm_jax.model import encoder_layers as el
from g2vlm_jax.model.rope import apply_rotary_2d, grid_positions, rope_2d_cos_sin


class DecoderMlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.fc1 = el.dense(dim, hidden, ("enc_embed", "enc_mlp"), **kw)
        self.fc2 = el.dense(hidden, dim, ("enc_mlp", "enc_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(el.gelu(self.fc1(x)))


class RopeAttention(nnx.Module):
    """Self-attention with a fused qkv and 2-D RoPE (official AttentionRope)."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads = heads
        self.qkv = el.dense(dim, 3 * dim, ("enc_embed", "enc_heads"), **kw)
        self.proj = el.dense(dim, dim, ("enc_heads", "enc_embed"), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x: float[F, N, D] (one frame per row); cos, sin: float[N, Dh] -> float[F, N, D]."""
        f, n, d = x.shape
        qkv = self.qkv(x).reshape(f, n, 3, self.heads, d // self.heads)
        q = apply_rotary_2d(qkv[:, :, 0], cos, sin)
        k = apply_rotary_2d(qkv[:, :, 1], cos, sin)
        return self.proj(el.attention(q, k, qkv[:, :, 2]).reshape(f, n, d))


class CrossAttentionRope(nnx.Module):
    """Cross-attention with separate q/k/v projections and 2-D RoPE on q and k."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.heads = heads
        self.q_proj = el.dense(dim, dim, ("enc_embed", "enc_heads"), **kw)
        self.k_proj = el.dense(dim, dim, ("enc_embed", "enc_heads"), **kw)
        self.v_proj = el.dense(dim, dim, ("enc_embed", "enc_heads"), **kw)
        self.proj = el.dense(dim, dim, ("enc_heads", "enc_embed"), **kw)

    def __call__(self, x: jax.Array, y: jax.Array, x_cos, x_sin, y_cos, y_sin) -> jax.Array:
        """x: float[B, Nq, D] queries; y: float[B, Nk, D] keys/values; tables float[Nq|Nk, Dh]."""
        b, nq, d = x.shape
        split = lambda t: t.reshape(t.shape[0], t.shape[1], self.heads, d // self.heads)  # noqa: E731
        q = apply_rotary_2d(split(self.q_proj(x)), x_cos, x_sin)
        k = apply_rotary_2d(split(self.k_proj(y)), y_cos, y_sin)
        return self.proj(el.attention(q, k, split(self.v_proj(y))).reshape(b, nq, d))


class BlockRope(nnx.Module):
    """x += attn(norm1 x); x += mlp(norm2 x)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, eps: float, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = el.layer_norm(dim, eps, **kw)
        self.attn = RopeAttention(dim, heads, **kw)
        self.norm2 = el.layer_norm(dim, eps, **kw)
        self.mlp = DecoderMlp(dim, mlp_hidden, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


class CrossBlockRope(nnx.Module):
    """x += SA(norm1 x); x += CA(norm2 x, norm_y y); x += mlp(norm3 x)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, eps: float, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.norm1 = el.layer_norm(dim, eps, **kw)
        self.attn = RopeAttention(dim, heads, **kw)
        self.norm2 = el.layer_norm(dim, eps, **kw)
        self.norm_y = el.layer_norm(dim, eps, **kw)
        self.cross_attn = CrossAttentionRope(dim, heads, **kw)
        self.norm3 = el.layer_norm(dim, eps, **kw)
        self.mlp = DecoderMlp(dim, mlp_hidden, **kw)

    def __call__(self, x: jax.Array, y: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x: float[B, V, N, D] all frames; y: float[B, N, D] the context frame; cos, sin: float[N, Dh]."""
        b, v, n, d = x.shape
        x = x + self.attn(self.norm1(x).reshape(b * v, n, d), cos, sin).reshape(b, v, n, d)
        # The V frames of a sample share their keys: flatten them into one query axis.
        q_cos, q_sin = jnp.tile(cos, (v, 1)), jnp.tile(sin, (v, 1))
        cross = self.cross_attn(self.norm2(x).reshape(b, v * n, d), self.norm_y(y), q_cos, q_sin, cos, sin)
        x = x + cross.reshape(b, v, n, d)
        return x + self.mlp(self.norm3(x))


def _decoder_blocks(cfg: ModelConfig, block_cls, **kw) -> nnx.List:
    h, d = cfg.heads, cfg.text.hidden_size
    return nnx.List([block_cls(d, h.decoder_heads, h.mlp_ratio * d, h.ln_eps, **kw) for _ in range(h.decoder_layers)])


class TransformerDecoder(nnx.Module):
    """Per-frame decoder (official Pi3TransformerDecoder, no input projection)."""

    def __init__(self, cfg: ModelConfig, out_dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.blocks = _decoder_blocks(cfg, BlockRope, **kw)
        self.linear_out = el.dense(cfg.text.hidden_size, out_dim, ("enc_embed", None), **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x: float[F, N, D] -> float[F, N, out_dim]."""
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.linear_out(x)


class ContextTransformerDecoder(nnx.Module):
    """Decoder whose blocks also cross-attend to a context frame (official Pi3ContextTransformerDecoder)."""

    def __init__(self, cfg: ModelConfig, out_dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        self.blocks = _decoder_blocks(cfg, CrossBlockRope, **kw)
        self.linear_out = el.dense(cfg.text.hidden_size, out_dim, ("enc_embed", None), **kw)

    def __call__(self, x: jax.Array, context: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        """x: float[B, V, N, D]; context: float[B, N, D] -> float[B, V, N, out_dim]."""
        for block in self.blocks:
            x = block(x, context, cos, sin)
        return self.linear_out(x)


class LinearPts3d(nnx.Module):
    """Linear in_dim -> C*p*p per token, then pixel shuffle to a dense [H, W, C] map (fp32)."""

    def __init__(self, in_dim: int, channels: int, patch: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.channels = channels
        self.patch = patch
        self.proj = el.dense(in_dim, channels * patch * patch, (None, None), rngs=rngs, dtype=jnp.float32,
                             param_dtype=param_dtype)

    def __call__(self, x: jax.Array, h: int, w: int) -> jax.Array:
        """x: float[F, h*w, in_dim] -> float32[F, h*p, w*p, C]."""
        return pixel_shuffle(self.proj(x.astype(jnp.float32)), h, w, self.channels, self.patch)


def pixel_shuffle(feat: jax.Array, h: int, w: int, channels: int, patch: int) -> jax.Array:
    """float[F, h*w, C*p*p] -> float[F, h*p, w*p, C].

    Channel c*p*p + dy*p + dx of token (y, x) goes to pixel (y*p + dy, x*p + dx), channel c.
    """
    f = feat.shape[0]
    x = feat.reshape(f, h, w, channels, patch, patch)  # f, y, x, c, dy, dx
    return x.transpose(0, 1, 4, 2, 5, 3).reshape(f, h * patch, w * patch, channels)


class ResConvBlock(nnx.Module):
    """x + relu(L3 relu(L2 relu(L1 x))) (official 1x1 convs turned into Linears)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype)
        self.res_conv1 = el.dense(dim, dim, (None, None), **kw)
        self.res_conv2 = el.dense(dim, dim, (None, None), **kw)
        self.res_conv3 = el.dense(dim, dim, (None, None), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jax.nn.relu(self.res_conv1(x))
        y = jax.nn.relu(self.res_conv2(y))
        return x + jax.nn.relu(self.res_conv3(y))


class CameraHead(nnx.Module):
    """Residual MLP blocks -> mean over the frame's tokens -> MLP -> fc_t (3), fc_rot (9) -> c2w (fp32)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=jnp.float32, param_dtype=param_dtype)
        self.res_conv = nnx.List([ResConvBlock(dim, rngs=rngs, param_dtype=param_dtype) for _ in range(2)])
        self.more_mlps_0 = el.dense(dim, dim, (None, None), **kw)
        self.more_mlps_2 = el.dense(dim, dim, (None, None), **kw)
        self.fc_t = el.dense(dim, 3, (None, None), **kw)
        self.fc_rot = el.dense(dim, 9, (None, None), **kw)

    def __call__(self, x: jax.Array, valid: jax.Array | None = None) -> jax.Array:
        """x: float[F, N, dim], valid: bool[F] or None -> camera-to-world poses float32[F, 4, 4].

        Frames of padded sample slots (`valid` False) get the identity rotation: their 9-d outputs are
        replaced *before* the SVD, whose derivative is infinite at the repeated singular values such
        frames produce (a zero cotangent times inf would turn every gradient into NaN).
        """
        x = x.astype(jnp.float32)
        for block in self.res_conv:
            x = block(x)
        x = x.mean(axis=1)
        x = jax.nn.relu(self.more_mlps_2(jax.nn.relu(self.more_mlps_0(x))))
        m9 = self.fc_rot(x)
        if valid is not None:
            m9 = jnp.where(valid[:, None], m9, jnp.eye(3, dtype=m9.dtype).reshape(9))
        rot = geometry.rotation_from_9d(m9)
        top = jnp.concatenate([rot, self.fc_t(x)[:, :, None]], axis=-1)  # [F, 3, 4]
        bottom = jnp.broadcast_to(jnp.asarray([0.0, 0.0, 0.0, 1.0], jnp.float32), (x.shape[0], 1, 4))
        return jnp.concatenate([top, bottom], axis=1)


class GeometryHeads(nnx.Module):
    """Point / camera / global-point decoders and heads (official names, no checkpoint prefix)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, dtype=jnp.float32, param_dtype=jnp.float32):
        kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
        h = cfg.heads
        self.cfg = cfg
        self.dtype = dtype
        self.patch = cfg.dino.patch_size
        self.point_decoder = TransformerDecoder(cfg, h.point_dim, **kw)
        self.camera_decoder = TransformerDecoder(cfg, h.camera_dim, **kw)
        self.global_points_decoder = ContextTransformerDecoder(cfg, h.point_dim, **kw)
        self.point_head = LinearPts3d(h.point_dim, 3, self.patch, rngs=rngs, param_dtype=param_dtype)
        self.global_point_head = LinearPts3d(h.point_dim, 3, self.patch, rngs=rngs, param_dtype=param_dtype)
        self.camera_head = CameraHead(h.camera_dim, rngs=rngs, param_dtype=param_dtype)
        if h.confidence:
            self.conf_decoder = TransformerDecoder(cfg, h.point_dim, **kw)
            self.conf_head = LinearPts3d(h.point_dim, 1, self.patch, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, tokens: jax.Array, grid: tuple[int, int], *, with_global: bool = True,
                 sample_valid: jax.Array | None = None) -> dict[str, jax.Array]:
        """tokens: float[B, V, h*w, D], grid (h, w), sample_valid: bool[B] or None (padded sample slots)
        -> dict of float32 outputs (H = h*p, W = w*p):

        local_points [B, V, H, W, 3], camera_poses [B, V, 4, 4] (c2w), world_points [B, V, H, W, 3],
        global_points [B, V, H, W, 3] (if with_global), confidence [B, V, H, W] logits (if cfg.heads.confidence).
        """
        h, w = grid
        d = self.cfg.text.hidden_size
        if tokens.ndim != 4 or tokens.shape[2] != h * w or tokens.shape[3] != d:
            raise ValueError(f"GeometryHeads expects tokens float[B, V, h*w={h * w}, D={d}] for grid {grid}; "
                             f"got shape {tokens.shape}")
        b, v = tokens.shape[:2]
        x = tokens.astype(self.dtype)
        frames = x.reshape(b * v, h * w, d)
        cos, sin = rope_2d_cos_sin(grid_positions(h, w), d // self.cfg.heads.decoder_heads, self.cfg.heads.rope_base)
        hh, ww = h * self.patch, w * self.patch

        uvs = self.point_head(self.point_decoder(frames, cos, sin), h, w)
        z = jnp.exp(uvs[..., 2:])
        local = jnp.concatenate([uvs[..., :2] * z, z], axis=-1).reshape(b, v, hh, ww, 3)
        frame_valid = None if sample_valid is None else jnp.repeat(sample_valid.reshape(b).astype(bool), v)
        poses = self.camera_head(self.camera_decoder(frames, cos, sin), frame_valid).reshape(b, v, 4, 4)
        world = jnp.einsum("bvij,bvhwj->bvhwi", poses[..., :3, :3], local, precision=jax.lax.Precision.HIGHEST)
        world = world + poses[:, :, None, None, :3, 3]
        out = dict(local_points=local, camera_poses=poses, world_points=world)
        if with_global:
            decoded = self.global_points_decoder(x, x[:, 0], cos, sin).reshape(b * v, h * w, -1)
            out["global_points"] = self.global_point_head(decoded, h, w).reshape(b, v, hh, ww, 3)
        if self.cfg.heads.confidence:
            conf = self.conf_head(self.conf_decoder(frames, cos, sin), h, w)
            out["confidence"] = conf.reshape(b, v, hh, ww)
        return out


def load_official_weights(module: GeometryHeads, state_dict: Mapping[str, np.ndarray], prefix: str = "") -> list[str]:
    """Loads the official decoder/head weights (top-level names, so prefix '' for a full checkpoint).

    Returns the consumed keys; raises ValueError on a missing, misshapen or unused weight.
    """
    return el.load_official(module, state_dict, prefix)
