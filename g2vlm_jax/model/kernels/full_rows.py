"""Full softmax attention (every query sees every key of its row) in tiles of whole key rows: the
attention of the encoders (DINO, ViT) and Pi3 decoders wherever no fused kernel runs them
(`encoder_layers.attention`: CPU, and GPUs outside cuDNN's rules).

Those layers attend within one frame or image (Lk ~ 1,000 at 518 px), so a whole row of keys fits a
tile: each tile is an exact softmax (max, exp, sum over all keys at once), with no running max and
rescaled accumulator as in the online softmax of `blockwise`, no mask (nothing to forbid), and no
per-tile branch. Measured on this 2-core CPU, fp32, head dim 64 (median ms, before -> after, before =
the blockwise kernel on all-allowed metadata, dense masked XLA below 512^2 pairs):
    DINO,  2 frames of 518x392 (B 2, L 1,041, 3 heads)      23.5 -> 13.8
    DINO,  8 frames of 518x392 (B 8, L 1,041, 3 heads)     100.7 -> 55.2
    Pi3,   8 frames of 518x392 (B 8, L 1,036, 6 heads)     196.1 -> 117.5
    Pi3,   8 frames of 252x196 (B 8, L 252, 6 heads)        18.9 -> 6.0 (the dense kernel's mask was 2/3 of it)
The MoT stack's global attention (L ~ 8,000, a mask rule) stays with `blockwise`: whole-row tiles were
no faster there (L = 8,320, 6/2 heads: 674 ms blockwise, 669-1,305 ms whole rows with 64-512 queries).

Tiles: a group of `rows` batch rows x `bq` queries x all Lk keys, at most `tile_logits` logits (4 Mi fp32
= 16 MiB by default; 2-4 Mi were fastest above, where a tile stays near the cache; smaller tiles pay
per-operation overhead, larger ones spill). Batch rows are grouped rather than all taken into every
tile: with 8 frames every tile would read the keys of all 8 (B 8, L 1,036, 6 heads: 169 ms vs 118 ms).
One tile covering everything is plain dense attention; several run in `lax.map`, each tile under
`jax.checkpoint`, so the backward pass keeps the inputs and recomputes a tile's probabilities: memory
stays bounded by the tile in both passes.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from g2vlm_jax.model.kernels.blockwise import fit_block

TILE_LOGITS = 1 << 22  # logits per tile (fp32: 16 MiB)


def tile_shape(batch: int, lq: int, lk: int, heads: int, tile_logits: int = TILE_LOGITS) -> tuple[int, int, int]:
    """(rows, bq, nq): batch rows per tile (a divisor of `batch`), queries per tile, query blocks per row.

    bq * heads * lk <= tile_logits unless a single query row is already larger; the query blocks are
    made even (`fit_block`), so the padding of the last block stays small.
    """
    bq = fit_block(lq, max(1, tile_logits // (heads * lk)))
    nq = -(-lq // bq)
    rows = max(1, min(batch, tile_logits // (heads * lk * bq)))
    while batch % rows:
        rows -= 1
    return rows, bq, nq


def _softmax_rows(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """One tile. q: [R, H, bq, Dh], k/v: [R, H, Lk, Dh] -> fp32 [R, H, bq, Dh].

    The row max is taken before scaling (max(s) * scale == max(s * scale) exactly) and the scale is
    applied inside the exp, so no pass over the tile writes the scaled logits.
    """
    scale = 1.0 / jnp.sqrt(jnp.float32(q.shape[-1]))
    s = jnp.einsum("rhqd,rhkd->rhqk", q, k, preferred_element_type=jnp.float32)
    p = jnp.exp((s - jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))) * scale)
    out = jnp.einsum("rhqk,rhkd->rhqd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out / jnp.sum(p, axis=-1, keepdims=True)


def full_rows_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, tile_logits: int = TILE_LOGITS) -> jax.Array:
    """Softmax attention over every key of the row, scale Dh^-0.5.

    q: float[B, Lq, H, Dh], k, v: float[B, Lk, H, Dh] -> float[B, Lq, H, Dh] in q's dtype.
    """
    b, lq, h, dh = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, dh):
        raise ValueError(f"full_rows_attention: q {q.shape}, k {k.shape}, v {v.shape}: need k == v shapes "
                         "[B, Lk, H, Dh] with q's B, H and Dh")
    lk = k.shape[1]
    rows, bq, nq = tile_shape(b, lq, lk, h, tile_logits)
    groups = b // rows
    kh = jnp.moveaxis(k, 2, 1).reshape(groups, rows, h, lk, dh)  # head-major: contiguous [Lk, Dh] panels
    vh = jnp.moveaxis(v, 2, 1).reshape(groups, rows, h, lk, dh)
    qp = jnp.pad(q, ((0, 0), (0, nq * bq - lq), (0, 0), (0, 0)))  # padded queries are sliced off below
    # [groups, rows, nq, bq, H, Dh] -> tiles [groups * nq, rows, H, bq, Dh] (group-major, as kh/vh)
    qt = qp.reshape(groups, rows, nq, bq, h, dh).transpose(0, 2, 1, 4, 3, 5).reshape(groups * nq, rows, h, bq, dh)
    if groups * nq == 1:
        out = _softmax_rows(qt[0], kh[0], vh[0])[None]
    else:
        @jax.checkpoint
        def tile(args):
            qi, t = args
            return _softmax_rows(qi, kh[t // nq], vh[t // nq])

        out = jax.lax.map(tile, (qt, jnp.arange(groups * nq)))
    out = out.reshape(groups, nq, rows, h, bq, dh).transpose(0, 2, 1, 4, 3, 5).reshape(b, nq * bq, h, dh)
    return out[:, :lq].astype(q.dtype)
