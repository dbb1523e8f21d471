"""Flash-style blockwise attention in pure JAX: memory linear in the row length, sparse blocks skipped.

For each query block, an online softmax runs over the key blocks (FlashAttention-2 recurrence, fp32
running max / sum / accumulator), so nothing of size Lq x Lk is ever materialised: the largest
temporaries are one [B, Hkv, G, bq, bk] logit tile and the O(L) inputs, outputs and accumulators.
The backward pass is a hand-written flash backward (`jax.custom_vjp`): it keeps only q, k, v, the
output and the per-query log-sum-exp, and recomputes each tile's probabilities, so it is memory
linear too.

GQA without repeating K/V: queries are viewed as [B, L, Hkv, G, Dh] (G = Hq / Hkv query heads per
K/V head) and every einsum contracts against the [B, L, Hkv, Dh] keys/values directly.

The mask rule is never re-implemented here. Per tile, the exact element mask is
`mask.build_mask` evaluated on the tile's metadata slices. Separately, per-block *summaries* of
the metadata give a conservative test "may any pair of this block pair be allowed?"
(`tiles.block_may_attend`, shared with the TPU kernel); a tile that fails it is skipped with
`lax.cond` (no FLOPs). The skip decision is taken per tile for the
whole batch (a tile runs if any row needs it), so the batch axis stays a plain parallel axis that
sharding can split; the [nq, nk] table of decisions is computed once per call.

Lengths that are not a multiple of the block are padded internally with padding metadata
(document 0), which the rule never allows; a query with no allowed key gets output 0 and zero
gradients, never NaN.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from g2vlm_jax.model.mask import MaskInfo, build_mask, check_geo_mode
from g2vlm_jax.model.kernels.tiles import block_fully_allowed, block_may_attend, pad_info, pad_length, summarize


# --------------------------------------------------------------------------------------------------
# The kernel
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts of one call (hashable: a non-differentiable argument of the custom VJP)."""

    geo_mode: str
    block_q: int
    block_k: int


def _tile(x: jax.Array, i) -> jax.Array:
    """Block i of a [B, n, block, ...] array (dynamic index)."""
    return jax.lax.dynamic_index_in_dim(x, i, axis=1, keepdims=False)


def _blocks(x: jax.Array, block: int) -> jax.Array:
    """[B, L, ...] -> [B, L / block, block, ...]."""
    return x.reshape(x.shape[0], x.shape[1] // block, block, *x.shape[2:])


def _tile_mask(q_info, k_info, i, j, plan: _Plan, layer) -> jax.Array:
    """Exact mask of tile (i, j) from `build_mask`, broadcast over heads: bool[B, 1, 1, bq, bk]."""
    qi = jax.tree.map(lambda a: _tile(_blocks(a, plan.block_q), i), q_info)
    kj = jax.tree.map(lambda a: _tile(_blocks(a, plan.block_k), j), k_info)
    return build_mask(qi, kj, plan.geo_mode, layer)[:, None, None]


def _logits(qi: jax.Array, kj: jax.Array) -> jax.Array:
    """qi: [B, bq, Hkv, G, Dh], kj: [B, bk, Hkv, Dh] -> scaled fp32 logits [B, Hkv, G, bq, bk]."""
    s = jnp.einsum("bqhgd,bkhd->bhgqk", qi, kj, preferred_element_type=jnp.float32)
    return s * (1.0 / jnp.sqrt(jnp.float32(qi.shape[-1])))


def live_blocks(q_info: MaskInfo, k_info: MaskInfo, plan: _Plan, layer) -> jax.Array:
    """bool[nq, nk]: tile (i, j) must be computed for at least one row of the batch."""
    live = block_may_attend(summarize(q_info, plan.block_q), summarize(k_info, plan.block_k), plan.geo_mode, layer)
    return jnp.any(live, axis=0)


def _tie_to_data(q, q_info, k_info, layer):
    """The metadata passed through an optimization barrier together with q.

    Inside `lax.scan` over layers the metadata is a loop constant, and JAX's scan partial evaluation
    hoists every residual that depends only on loop constants out of the loop: here, the exact mask
    of every tile ([nq, nk, bq, bk] in total), which would make memory quadratic again. Tying the
    metadata to q (a per-layer value) keeps the masks inside the loops, one tile at a time.
    """
    _, q_info, k_info, layer = jax.lax.optimization_barrier((q, q_info, k_info, layer))
    return q_info, k_info, layer


def full_blocks(q_info: MaskInfo, k_info: MaskInfo, plan: _Plan, layer) -> jax.Array:
    """bool[nq, nk]: every pair of tile (i, j) is allowed in every row (the tile needs no mask)."""
    full = block_fully_allowed(summarize(q_info, plan.block_q), summarize(k_info, plan.block_k), plan.geo_mode, layer)
    return jnp.all(full, axis=0)


def _head_major(x: jax.Array, block: int) -> jax.Array:
    """[B, L, Hkv, (G,) Dh] -> [L / block, B, Hkv, (G,) block, Dh]: per-tile matmuls need no transposes."""
    b, length = x.shape[:2]
    x = x.reshape(b, length // block, block, *x.shape[2:])
    return jnp.moveaxis(jnp.moveaxis(x, 1, 0), 2, -2)


def _forward(q, k, v, q_info, k_info, layer, plan: _Plan):
    """Online-softmax forward on padded inputs.

    q: [B, Lq, Hkv, G, Dh], k/v: [B, Lk, Hkv, Dh] (lengths multiples of the blocks).
    Returns out [B, Lq, Hkv, G, Dh] fp32, lse [nq, B, Hkv, G, bq] fp32 (-inf for queries without an
    allowed key) and the number of tiles actually computed (int32 scalar).

    Why head-major tiles: q/k/v are transposed once to [n, B, Hkv, (G,) block, Dh], so every tile's two
    matmuls read contiguous [block, Dh] panels; slicing [B, block, Hkv, G, Dh] tiles and contracting them
    made XLA transpose q, k and v inside the loop, on every tile (2.5x slower on CPU at L = 8312).
    Tiles whose every pair is allowed (`full_blocks`: all geometry-to-geometry tiles of a
    reconstruction) skip the mask evaluation.
    """
    q_info, k_info, layer = _tie_to_data(q, q_info, k_info, layer)
    qh, kh, vh = _head_major(q, plan.block_q), _head_major(k, plan.block_k), _head_major(v, plan.block_k)
    nq, b, hkv, g, bq, dh = qh.shape
    live, full = live_blocks(q_info, k_info, plan, layer), full_blocks(q_info, k_info, plan, layer)
    scale = 1.0 / jnp.sqrt(jnp.float32(dh))

    def query_block(count, i):
        qi = qh[i]

        def update(state, j, masked: bool):
            m, l, acc, n = state
            # Unscaled logits: the row max is taken before scaling (max(s) * scale == max(s * scale) exactly,
            # rounding being monotone) and the scale is applied inside the exp, so no pass over the tile
            # writes the scaled logits.
            s = jnp.einsum("bhgqd,bhkd->bhgqk", qi, kh[j], preferred_element_type=jnp.float32)
            if masked:
                s = jnp.where(_tile_mask(q_info, k_info, i, j, plan, layer), s, -jnp.inf)
            m_new = jnp.maximum(m, jnp.max(s, axis=-1) * scale)
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)  # no allowed key yet: exp(-inf - 0) = 0
            p = jnp.exp(s * scale - m_safe[..., None])
            alpha = jnp.exp(m - m_safe)
            pv = jnp.einsum("bhgqk,bhkd->bhgqd", p.astype(v.dtype), vh[j], preferred_element_type=jnp.float32)
            return m_new, alpha * l + jnp.sum(p, axis=-1), acc * alpha[..., None] + pv, n + 1

        def step(j, state):
            branch = jnp.where(live[i, j], jnp.where(full[i, j], 2, 1), 0)
            return jax.lax.switch(branch, [lambda s: s, lambda s: update(s, j, True),
                                           lambda s: update(s, j, False)], state)

        init = (jnp.full((b, hkv, g, bq), -jnp.inf), jnp.zeros((b, hkv, g, bq)),
                jnp.zeros((b, hkv, g, bq, dh)), count)
        m, l, acc, count = jax.lax.fori_loop(0, kh.shape[0], step, init)
        out = acc / jnp.where(l > 0, l, 1.0)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        return count, (out, lse)

    count, (out, lse) = jax.lax.scan(query_block, jnp.int32(0), jnp.arange(nq))
    out = jnp.moveaxis(out, (0, 4), (1, 2))  # [nq, B, Hkv, G, bq, Dh] -> [B, nq, bq, Hkv, G, Dh]
    return out.reshape(q.shape), lse, count


def _tile_grads(qi, kj, vj, doi, lse_i, delta_i, mask):
    """Flash backward of one tile: (dq_i [B, bq, Hkv, G, Dh], dk_j, dv_j [B, bk, Hkv, Dh]) in fp32.

    lse_i, delta_i: [B, Hkv, G, bq]; mask: bool[B, 1, 1, bq, bk].
    """
    scale = 1.0 / jnp.sqrt(jnp.float32(qi.shape[-1]))
    lse_safe = jnp.where(jnp.isfinite(lse_i), lse_i, 0.0)
    p = jnp.where(mask, jnp.exp(_logits(qi, kj) - lse_safe[..., None]), 0.0)
    dv = jnp.einsum("bhgqk,bqhgd->bkhd", p.astype(doi.dtype), doi, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bqhgd,bkhd->bhgqk", doi, vj, preferred_element_type=jnp.float32)
    ds = (p * (dp - delta_i[..., None]) * scale).astype(qi.dtype)
    dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, kj, preferred_element_type=jnp.float32)
    dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qi, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _backward(q, k, v, out, lse, dout, q_info, k_info, layer, plan: _Plan):
    """dq, dk, dv (fp32, padded shapes) by recomputing each live tile; key blocks outermost."""
    q_info, k_info, layer = _tie_to_data(dout, q_info, k_info, layer)
    qb, kb, vb = _blocks(q, plan.block_q), _blocks(k, plan.block_k), _blocks(v, plan.block_k)
    dob = _blocks(dout.astype(q.dtype), plan.block_q)
    # delta = rowsum(dO * O): [B, nq, bq, Hkv, G] -> [nq, B, Hkv, G, bq] to match lse.
    delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    delta = jnp.moveaxis(_blocks(delta, plan.block_q), (1, 2), (0, 4))
    live = live_blocks(q_info, k_info, plan, layer)
    nq = qb.shape[1]

    def key_block(dq, j):
        kj, vj = _tile(kb, j), _tile(vb, j)

        def step(i, carry):
            dq, dk, dv = carry

            def grads(_):
                mask = _tile_mask(q_info, k_info, i, j, plan, layer)
                return _tile_grads(_tile(qb, i), kj, vj, _tile(dob, i), lse[i], delta[i], mask)

            def skip(_):
                return jnp.zeros(qb.shape[:1] + qb.shape[2:]), jnp.zeros_like(dk), jnp.zeros_like(dv)

            dq_i, dk_j, dv_j = jax.lax.cond(live[i, j], grads, skip, None)
            dq = jax.lax.dynamic_update_index_in_dim(dq, _tile(dq, i) + dq_i, i, axis=1)
            return dq, dk + dk_j, dv + dv_j

        zeros_kv = jnp.zeros(kj.shape, jnp.float32)
        dq, dk, dv = jax.lax.fori_loop(0, nq, step, (dq, zeros_kv, zeros_kv))
        return dq, (dk, dv)

    dq, (dk, dv) = jax.lax.scan(key_block, jnp.zeros(qb.shape, jnp.float32), jnp.arange(kb.shape[1]))
    return dq.reshape(q.shape), jnp.moveaxis(dk, 0, 1).reshape(k.shape), jnp.moveaxis(dv, 0, 1).reshape(v.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, q_info, k_info, layer, plan: _Plan):
    out, _, _ = _forward(q, k, v, q_info, k_info, layer, plan)
    return out.astype(q.dtype)


def _flash_fwd(q, k, v, q_info, k_info, layer, plan: _Plan):
    out, lse, _ = _forward(q, k, v, q_info, k_info, layer, plan)
    out = out.astype(q.dtype)  # the residual is the output the caller sees (as in FlashAttention)
    return out, (q, k, v, out, lse, q_info, k_info, layer)


def _flash_bwd(plan: _Plan, residuals, dout):
    q, k, v, out, lse, q_info, k_info, layer = residuals
    dq, dk, dv = _backward(q, k, v, out, lse, dout, q_info, k_info, layer, plan)
    # Metadata and the layer index are integers: no cotangent (None = symbolic zero).
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------
def fit_block(length: int, block_size: int) -> int:
    """The block actually used for a side of `length` slots: as many blocks as `block_size` needs, made
    as even as possible (rounded up to a multiple of 8), so padding stays small: 528 slots with
    block_size 512 run as 2 blocks of 264, not 2 blocks of 512."""
    if length <= block_size:
        return length
    n = -(-length // block_size)
    return min(block_size, -(-(-(-length // n)) // 8) * 8)


def _prepare(q, k, v, q_info, k_info, geo_mode, layer_idx, block_size):
    """Validates, pads to whole blocks and groups query heads; returns the padded arguments of `_flash`."""
    check_geo_mode(geo_mode, layer_idx)
    if block_size <= 0:
        raise ValueError(f"blockwise attention: block_size must be positive, got {block_size}")
    b, lq, hq, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    plan = _Plan(geo_mode=geo_mode, block_q=fit_block(lq, block_size), block_k=fit_block(lk, block_size))
    lq_pad = -(-lq // plan.block_q) * plan.block_q
    lk_pad = -(-lk // plan.block_k) * plan.block_k
    qg = pad_length(q, lq_pad).reshape(b, lq_pad, hkv, hq // hkv, dh)
    layer = jnp.asarray(0 if layer_idx is None else layer_idx, jnp.int32)
    return (qg, pad_length(k, lk_pad), pad_length(v, lk_pad), pad_info(q_info, lq_pad), pad_info(k_info, lk_pad),
            layer, plan)


def blockwise_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_info: MaskInfo, k_info: MaskInfo, *,
                        geo_mode: str, layer_idx=None, block_size: int = 512) -> jax.Array:
    """Masked GQA attention, blockwise (see the module docstring).

    Args:
      q: float[B, Lq, Hq, Dh]; k, v: float[B, Lk, Hkv, Dh] with Hq a multiple of Hkv.
      q_info / k_info: metadata of queries [B, Lq] / keys [B, Lk].
      geo_mode, layer_idx: as in `mask.build_mask`.
      block_size: largest query/key block (see `fit_block`); any length works (padded internally).
    Returns:
      float[B, Lq, Hq, Dh] in q's dtype; 0 for a query with no allowed key.
    """
    args = _prepare(q, k, v, q_info, k_info, geo_mode, layer_idx, block_size)
    out = _flash(*args)
    return out[:, :q.shape[1]].reshape(q.shape)


def blockwise_tile_counts(q: jax.Array, k: jax.Array, v: jax.Array, q_info: MaskInfo, k_info: MaskInfo, *,
                          geo_mode: str, layer_idx=None, block_size: int = 512) -> tuple[jax.Array, int]:
    """(tiles the forward actually computed, total tiles nq * nk) for the same call (diagnostics)."""
    args = _prepare(q, k, v, q_info, k_info, geo_mode, layer_idx, block_size)
    _, _, computed = _forward(*args)
    plan = args[-1]
    return computed, (args[0].shape[1] // plan.block_q) * (args[1].shape[1] // plan.block_k)
