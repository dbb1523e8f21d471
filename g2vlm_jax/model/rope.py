"""Rotary position embeddings: M-RoPE (backbone), 2-D RoPE (Pi3 decoders), vision RoPE (ViT).

All three use the `rotate_half` layout: a head vector of width Dh is two halves [x1, x2] and the
rotation is `x * cos + rotate_half(x) * sin` with `rotate_half([x1, x2]) = [-x2, x1]`, where the
angle table `cos/sin: float[..., Dh]` repeats the Dh/2 frequency angles across both halves.
They differ only in which position feeds which frequency slot:

- M-RoPE (SPEC 1.4): positions (t, h, w); slot k < s_t takes t, s_t <= k < s_t+s_h takes h, the
  rest take w; `inv_freq_k = theta^(-2k/Dh)`.
- 2-D RoPE (CroCo/DUSt3R, Pi3 decoders): the head is split into two halves of Dh/2; the first half
  is rotated by the patch row, the second by the patch column, each half its own rotate_half layout
  with `inv_freq_k = base^(-2k/(Dh/2))`.
- Vision RoPE (Qwen2-VL ViT): `inv_freq_k = theta^(-2k/(Dh/2))` for k < Dh/4; the Dh/2 angles are
  [row angles, column angles], then repeated across both halves.
"""
from __future__ import annotations

import jax.numpy as jnp


def rotate_half(x: jnp.ndarray) -> jnp.ndarray:
    """[x1, x2] -> [-x2, x1] over the last axis."""
    x1, x2 = jnp.split(x, 2, axis=-1)
    return jnp.concatenate([-x2, x1], axis=-1)


def apply_rotary(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotates `x: float[B, L, H, Dh]` by angle tables `cos, sin: float[B, L, Dh]`.

    Computed in fp32 and cast back, so bf16 activations do not lose the phase.
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    c = cos[:, :, None, :]
    s = sin[:, :, None, :]
    return (xf * c + rotate_half(xf) * s).astype(dtype)


def mrope_cos_sin(positions: jnp.ndarray, head_dim: int, theta: float,
                  sections: tuple[int, int, int]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """M-RoPE angle tables.

    Args:
      positions: int[B, 3, L] (t, h, w) position ids.
      head_dim: Dh; `sum(sections) == Dh // 2`.
    Returns:
      cos, sin: float32[B, L, Dh].
    """
    half = head_dim // 2
    if sum(sections) != half:
        raise ValueError(f"mrope sections {sections} must sum to head_dim/2 = {half}")
    inv_freq = theta ** (-jnp.arange(0, half, dtype=jnp.float32) * 2.0 / head_dim)  # [Dh/2]
    # Which of (t, h, w) drives each frequency slot.
    component = jnp.concatenate([jnp.full((n,), i, jnp.int32) for i, n in enumerate(sections)])  # [Dh/2]
    pos = positions.astype(jnp.float32)  # [B, 3, L]
    pos_per_slot = jnp.take(pos, component, axis=1)  # [B, Dh/2, L]
    angles = jnp.swapaxes(pos_per_slot, 1, 2) * inv_freq  # [B, L, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def text_positions(length: int, batch: int = 1, start: int = 0) -> jnp.ndarray:
    """Plain text positions (p, p, p): int32[B, 3, L]."""
    p = jnp.arange(start, start + length, dtype=jnp.int32)
    return jnp.broadcast_to(p[None, None, :], (batch, 3, length))


def grid_positions(h: int, w: int) -> jnp.ndarray:
    """Integer (row, col) of a row-major h x w patch grid: int32[h*w, 2]."""
    rows, cols = jnp.meshgrid(jnp.arange(h, dtype=jnp.int32), jnp.arange(w, dtype=jnp.int32), indexing="ij")
    return jnp.stack([rows.reshape(-1), cols.reshape(-1)], axis=-1)


def rope_2d_cos_sin(rows_cols: jnp.ndarray, head_dim: int, base: float = 100.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Angle tables of the CroCo 2-D RoPE (Pi3 decoders).

    Args:
      rows_cols: int[N, 2] patch (row, col).
      head_dim: Dh, a multiple of 4.
    Returns:
      cos, sin: float32[N, Dh] laid out as [row half (Dh/2) | col half (Dh/2)], each half in
      rotate_half layout of its own. Use with `apply_rotary_2d`.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    quarter = head_dim // 4
    inv_freq = base ** (-jnp.arange(0, quarter, dtype=jnp.float32) * 2.0 / (head_dim // 2))  # [Dh/4]
    halves = []
    for axis in range(2):
        ang = rows_cols[:, axis].astype(jnp.float32)[:, None] * inv_freq  # [N, Dh/4]
        halves.append(jnp.concatenate([ang, ang], axis=-1))  # [N, Dh/2]
    angles = jnp.concatenate(halves, axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rotary_2d(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Applies the CroCo 2-D RoPE to `x: float[..., N, H, Dh]` with tables `float[N, Dh]`.

    The row half and the column half are rotated independently (rotate_half within each half).
    """
    dtype = x.dtype
    xf = x.astype(jnp.float32)
    c = cos[:, None, :]
    s = sin[:, None, :]
    x_row, x_col = jnp.split(xf, 2, axis=-1)
    c_row, c_col = jnp.split(c, 2, axis=-1)
    s_row, s_col = jnp.split(s, 2, axis=-1)
    out = jnp.concatenate([x_row * c_row + rotate_half(x_row) * s_row,
                           x_col * c_col + rotate_half(x_col) * s_col], axis=-1)
    return out.astype(dtype)


def vision_rope_cos_sin(rows_cols: jnp.ndarray, head_dim: int, theta: float = 10000.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Angle tables of the Qwen2-VL vision RoPE.

    Args:
      rows_cols: int[N, 2] patch (row, col) in the order the ViT sees its patches (2x2-merge order).
      head_dim: Dh, a multiple of 4.
    Returns:
      cos, sin: float32[N, Dh]: angles [row (Dh/4), col (Dh/4)] repeated over both halves; use with
      `apply_rotary` (after adding a batch axis) or `apply_rotary_flat`.
    """
    quarter = head_dim // 4
    inv_freq = theta ** (-jnp.arange(0, quarter, dtype=jnp.float32) * 2.0 / (head_dim // 2))  # [Dh/4]
    rc = rows_cols.astype(jnp.float32)
    angles = jnp.concatenate([rc[:, 0:1] * inv_freq, rc[:, 1:2] * inv_freq], axis=-1)  # [N, Dh/2]
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)
