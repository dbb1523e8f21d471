"""Flash attention for TPUs in Pallas (Mosaic), with the packed-row mask evaluated inside the kernel.

Why not splash attention: splash masks are numpy arrays fixed at trace time (plus segment-id
equality), while our rule depends on where text, markers and frames sit in each packed row. This
kernel takes the same per-token metadata as every other kernel (`mask.MaskInfo`) and evaluates
the one rule (`mask.mask_rule`) on each (query block, key block) tile in VMEM, so it is exact for
every `geo_attention` mode and any packing. What it shares with splash is the shape of the work:

- grid (batch, query head, query block, key block); the key-block axis is the sequential reduction,
  with the FlashAttention-2 online softmax in fp32 VMEM scratch (m, l replicated over 128 lanes);
- a per-row table of tile states (`tiles.block_may_attend` / `tiles.block_fully_allowed` on
  per-block metadata summaries) is prefetched into SMEM: a dead tile runs no matmul, and its K/V
  block index repeats the last live one so the pipeline issues no DMA for it (splash's "data_next"
  trick); a tile whose every pair is allowed (most tiles inside one sample's geometry frames under
  `global`) skips the per-pair rule;
- GQA without repeating K/V: query head h reads K/V head h // G;
- a flash backward in two kernels: dq (grid as the forward) and dk/dv (grid (batch, K/V head, key
  block, group member, query block): the group's query heads accumulate into one dk/dv tile).

Layouts (TPU tiles are 8 sublanes x 128 lanes): q, k, v, o as [B, H, L, Dh] (head-major); the
metadata as int32[B, L, 8] (the five fields in lanes 0..4, read as tile columns) and int32[B, 8, L]
(fields in sublanes, read as tile rows), so the rule broadcasts one side's columns against the
other's rows. The forward tile has queries down ([bq, bk]); the backward tiles have keys down
([bk, bq]), so that the per-query log-sum-exp and delta = rowsum(dO * O) are rows that broadcast
over sublanes: they travel as fp32 [B, H, 8, L] (one value per query, 8 equal sublanes), never
lane-replicated [L, 128] arrays.

Blocks are multiples of 128 (lengths are padded with padding metadata, which the rule never allows);
a query with no allowed key gets output 0 and zero gradients.

Sharding: `pallas_call` has no SPMD partitioning rule, so the call always runs under `shard_map` on
the mesh of the program being traced (`sharding.jit_sharded`, `sharding.bound_mesh`), with the
batch over ('data', 'fsdp') and the heads over 'tensor' where both head counts divide; each device
then runs the kernel on its own rows and heads. Traced outside such a program on a host with
several devices it raises: XLA would otherwise gather every operand onto each device.

Runs on TPU; on CPU only in Pallas' TPU interpret mode (`pltpu.force_tpu_interpret_mode()`, used by
the tests). `g2vlm aot` (g2vlm_jax/aot.py) compiles it for real TPU slices on a CPU host.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.model.mask import MaskInfo, check_geo_mode, mask_rule
from g2vlm_jax.model.kernels import tiles

LANES = 128
SUBLANES = 8
META_FIELDS = ("seq_order", "document_ids", "split_ids", "split_full", "geo_frame")
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)  # finite: exp(MASK_VALUE - m) is 0, never NaN
NO_KEY_LSE = 1e30  # log-sum-exp of a query without an allowed key: exp(s - NO_KEY_LSE) = 0
_NT = (((1,), (1,)), ((), ()))  # a @ b.T
_NN = (((1,), (0,)), ((), ()))  # a @ b
_TN = (((0,), (0,)), ((), ()))  # a.T @ b


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Static facts of one call (hashable: a non-differentiable argument of the custom VJP)."""

    geo_mode: str
    block_q: int
    block_k: int
    num_q_heads: int
    num_kv_heads: int
    interpret: bool = False  # Pallas' HLO interpreter instead of Mosaic (CPU tests, see tpu_flash_attention)


# --------------------------------------------------------------------------------------------------
# Blocks, metadata layouts and the tile tables
# --------------------------------------------------------------------------------------------------
def fit_block(length: int, block_size: int) -> int:
    """Block for a side of `length` slots: as few blocks as `block_size` allows, each a multiple of 128."""
    n = -(-length // max(block_size, LANES))
    return -(-(-(-length // n)) // LANES) * LANES


def _meta_columns(info: MaskInfo) -> jax.Array:
    """int32[B, L, 8]: the five metadata fields of each slot in lanes 0..4 (read as tile columns)."""
    cols = [getattr(info, f).astype(jnp.int32) for f in META_FIELDS]
    cols += [jnp.zeros_like(cols[0])] * (SUBLANES - len(cols))
    return jnp.stack(cols, axis=-1)


def _meta_rows(info: MaskInfo) -> jax.Array:
    """int32[B, 8, L]: the five metadata fields of each slot in sublanes 0..4 (read as tile rows)."""
    return jnp.swapaxes(_meta_columns(info), 1, 2)


def _tile_mask(q_meta: jax.Array, k_meta: jax.Array, geo_mode: str, layer, *, transposed: bool = False) -> jax.Array:
    """The rule on one tile, inside a kernel.

    transposed=False: q_meta [bq, 8] (columns), k_meta [8, bk] (rows) -> bool[bq, bk] (queries down).
    transposed=True:  q_meta [8, bq] (rows), k_meta [bk, 8] (columns) -> bool[bk, bq] (keys down).
    Each field is broadcast to the whole tile as int32 before the rule runs: Mosaic compares and
    combines full-tile vectors, but cannot broadcast boolean [n, 1] / [1, n] vectors.
    """
    def column(meta, n):
        return meta[:, n:n + 1]

    def row(meta, n):
        return meta[n:n + 1, :]

    (q_read, k_read) = (row, column) if transposed else (column, row)
    shape = (k_meta.shape[0], q_meta.shape[1]) if transposed else (q_meta.shape[0], k_meta.shape[1])

    def side(meta, read):
        fields = {f: jnp.broadcast_to(read(meta, n), shape) for n, f in enumerate(META_FIELDS)}
        fields["split_full"] = fields["split_full"] != 0
        return MaskInfo(**fields)

    return mask_rule(side(q_meta, q_read), side(k_meta, k_read), geo_mode, layer)


def _fetch_index(live: jax.Array) -> jax.Array:
    """int32[..., n]: for each step of the last axis, the block to have in VMEM.

    A live step fetches its own block; a dead step repeats the block of the last live step before it
    (or the first live one after it, at the start), so the pipeline sees an unchanged block index and
    skips the copy.
    """
    n = live.shape[-1]
    steps = jnp.arange(n, dtype=jnp.int32)
    last = jax.lax.cummax(jnp.where(live, steps, -1), axis=live.ndim - 1)
    first = jnp.argmax(live, axis=-1).astype(jnp.int32)[..., None]
    return jnp.where(last >= 0, last, first)


DEAD, MASKED, FULL = 0, 1, 2  # tile states in the prefetched table


def _tables(q_info: MaskInfo, k_info: MaskInfo, plan: _Plan, layer):
    """The per-row tile tables of one call, prefetched into SMEM.

    Returns (state int32[B, nq, nk]: DEAD = skip, MASKED = evaluate the rule, FULL = every pair allowed;
    key fetch int32[B, nq, nk]; query fetch int32[B, nk, nq]).
    """
    qs, ks = tiles.summarize(q_info, plan.block_q), tiles.summarize(k_info, plan.block_k)
    live = tiles.block_may_attend(qs, ks, plan.geo_mode, layer)
    full = tiles.block_fully_allowed(qs, ks, plan.geo_mode, layer)
    state = jnp.where(full, FULL, jnp.where(live, MASKED, DEAD)).astype(jnp.int32)
    return state, _fetch_index(live), _fetch_index(jnp.swapaxes(live, 1, 2))


def _lanes(x: jax.Array, width: int) -> jax.Array:
    """A lane-replicated [rows, 128] value widened (or cut) to [rows, width]."""
    reps = -(-width // LANES)
    return (jnp.tile(x, (1, reps)) if reps > 1 else x)[:, :width]


# --------------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------------
def _forward_kernel(state_ref, fetch_ref, layer_ref, q_ref, k_ref, v_ref, qm_ref, km_ref,
                    o_ref, lse_ref, m_sc, l_sc, acc_sc, *, plan: _Plan, scale: float):
    """Tile (i, j) of query head h: scores [bq, bk] with queries down; online softmax over j."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)
    dh = acc_sc.shape[-1]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    def tile(masked: bool):
        s = jax.lax.dot_general(q_ref[...], k_ref[...], _NT, preferred_element_type=jnp.float32) * scale
        if masked:
            mask = _tile_mask(qm_ref[...], km_ref[...], plan.geo_mode, layer_ref[0])
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1, keepdims=True))  # [bq, 128]
        p = jnp.exp(s - _lanes(m_next, s.shape[1]))
        if masked:  # a row with no allowed key yet has m_next = MASK_VALUE and exp(0) = 1 there
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_next)
        l_sc[...] = alpha * l_sc[...] + jnp.sum(p, axis=-1, keepdims=True)
        m_sc[...] = m_next
        pv = jax.lax.dot_general(p.astype(v_ref.dtype), v_ref[...], _NN, preferred_element_type=jnp.float32)
        acc_sc[...] = _lanes(alpha, dh) * acc_sc[...] + pv

    _by_state(state_ref[b, i, j], tile)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        l = l_sc[...]
        has_key = l > 0
        safe_l = jnp.where(has_key, l, 1.0)
        o_ref[...] = (acc_sc[...] * _lanes(jnp.where(has_key, 1.0 / safe_l, 0.0), dh)).astype(o_ref.dtype)
        lse = jnp.where(has_key, m_sc[...] + jnp.log(safe_l), NO_KEY_LSE)  # [bq, 128], lanes equal
        lse_ref[...] = jnp.transpose(lse)[:SUBLANES]  # [8, bq]: one value per query, along lanes


def _probabilities_t(q, k, qm_rows, km_cols, lse_row, layer, plan: _Plan, scale: float, masked: bool):
    """Recomputed probabilities of one tile with keys down: fp32 [bk, bq] (0 where the rule forbids).

    Keys down, so that the per-query log-sum-exp is a row ([1, bq], broadcast over sublanes) and is
    stored one value per query, not replicated over 128 lanes."""
    s = jax.lax.dot_general(k, q, _NT, preferred_element_type=jnp.float32) * scale
    p = jnp.exp(s - lse_row)
    if not masked:
        return p
    return jnp.where(_tile_mask(qm_rows, km_cols, plan.geo_mode, layer, transposed=True), p, 0.0)


def _by_state(state, tile) -> None:
    """Runs `tile(masked)` for a MASKED or FULL tile, nothing for a DEAD one."""
    pl.when(state == MASKED)(lambda: tile(True))
    pl.when(state == FULL)(lambda: tile(False))


def _dq_kernel(state_ref, fetch_ref, layer_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qm_ref, km_ref,
               dq_ref, dq_sc, *, plan: _Plan, scale: float):
    """dq of query block i, head h, reduced over key blocks j (tiles with keys down)."""
    b, i, j = pl.program_id(0), pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    def tile(masked: bool):
        k = k_ref[...]
        pt = _probabilities_t(q_ref[...], k, qm_ref[...], km_ref[...], lse_ref[0:1, :], layer_ref[0], plan, scale,
                              masked)
        dpt = jax.lax.dot_general(v_ref[...], do_ref[...], _NT, preferred_element_type=jnp.float32)
        dst = pt * (dpt - delta_ref[0:1, :]) * scale
        dq_sc[...] += jax.lax.dot_general(dst.astype(k.dtype), k, _TN, preferred_element_type=jnp.float32)

    _by_state(state_ref[b, i, j], tile)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = dq_sc[...].astype(dq_ref.dtype)


def _dkv_kernel(state_ref, fetch_ref, layer_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, qm_ref, km_ref,
                dk_ref, dv_ref, dk_sc, dv_sc, *, plan: _Plan, scale: float):
    """dk, dv of key block j, K/V head h, reduced over the group's query heads g and query blocks i."""
    b, j, g, i = pl.program_id(0), pl.program_id(2), pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    def tile(masked: bool):
        q, do = q_ref[...], do_ref[...]
        pt = _probabilities_t(q, k_ref[...], qm_ref[...], km_ref[...], lse_ref[0:1, :], layer_ref[0], plan, scale,
                              masked)
        dv_sc[...] += jax.lax.dot_general(pt.astype(do.dtype), do, _NN, preferred_element_type=jnp.float32)
        dpt = jax.lax.dot_general(v_ref[...], do, _NT, preferred_element_type=jnp.float32)
        dst = pt * (dpt - delta_ref[0:1, :]) * scale
        dk_sc[...] += jax.lax.dot_general(dst.astype(q.dtype), q, _NN, preferred_element_type=jnp.float32)

    _by_state(state_ref[b, i, j], tile)

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish():
        dk_ref[...] = dk_sc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------------
# pallas_call wrappers (all arrays padded, head-major)
# --------------------------------------------------------------------------------------------------
def _params(semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def _forward(q, k, v, meta, tables, layer, plan: _Plan):
    """q [B, Hq, Lq, Dh], k/v [B, Hkv, Lk, Dh] -> (o like q, lse fp32 [B, Hq, 8, Lq], sublanes equal)."""
    q_cols, k_rows = meta["q_cols"], meta["k_rows"]
    state, fetch_k, _ = tables
    b, hq, lq, dh = q.shape
    lk = k.shape[2]
    bq, bk, group = plan.block_q, plan.block_k, hq // plan.num_kv_heads
    q_spec = pl.BlockSpec((None, None, bq, dh), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec((None, None, bk, dh),
                           lambda b, h, i, j, state, fetch, _: (b, jax.lax.div(h, group), fetch[b, i, j], 0))
    qm_spec = pl.BlockSpec((None, bq, SUBLANES), lambda b, h, i, j, *_: (b, i, 0))
    km_spec = pl.BlockSpec((None, SUBLANES, bk), lambda b, h, i, j, state, fetch, _: (b, 0, fetch[b, i, j]))
    lse_spec = pl.BlockSpec((None, None, SUBLANES, bq), lambda b, h, i, j, *_: (b, h, 0, i))
    return pl.pallas_call(
        functools.partial(_forward_kernel, plan=plan, scale=1.0 / dh ** 0.5),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hq, lq // bq, lk // bk),
            in_specs=[q_spec, kv_spec, kv_spec, qm_spec, km_spec], out_specs=[q_spec, lse_spec],
            scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                            pltpu.VMEM((bq, dh), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, hq, SUBLANES, lq), jnp.float32)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        name="g2vlm_tpu_flash_fwd", interpret=plan.interpret,
    )(state, fetch_k, layer, q, k, v, q_cols, k_rows)


def _backward(q, k, v, do, lse, delta, meta, tables, layer, plan: _Plan):
    """(dq, dk, dv) in the input dtypes; lse/delta fp32 [B, Hq, 8, Lq] (sublanes equal)."""
    q_rows, k_cols = meta["q_rows"], meta["k_cols"]
    state, fetch_k, fetch_q = tables
    b, hq, lq, dh = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    bq, bk, group = plan.block_q, plan.block_k, hq // hkv
    nq, nk = lq // bq, lk // bk
    scale = 1.0 / dh ** 0.5
    args = (q, k, v, do, lse, delta, q_rows, k_cols)

    # dq: grid (B, Hq, nq, nk) as the forward.
    q_spec = pl.BlockSpec((None, None, bq, dh), lambda b, h, i, j, *_: (b, h, i, 0))
    row_spec = pl.BlockSpec((None, None, SUBLANES, bq), lambda b, h, i, j, *_: (b, h, 0, i))
    kv_spec = pl.BlockSpec((None, None, bk, dh),
                           lambda b, h, i, j, state, fetch, _: (b, jax.lax.div(h, group), fetch[b, i, j], 0))
    qm_spec = pl.BlockSpec((None, SUBLANES, bq), lambda b, h, i, j, *_: (b, 0, i))
    km_spec = pl.BlockSpec((None, bk, SUBLANES), lambda b, h, i, j, state, fetch, _: (b, fetch[b, i, j], 0))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, plan=plan, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hq, nq, nk),
            in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, qm_spec, km_spec],
            out_specs=q_spec, scratch_shapes=[pltpu.VMEM((bq, dh), jnp.float32)]),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary")),
        name="g2vlm_tpu_flash_dq", interpret=plan.interpret,
    )(state, fetch_k, layer, *args)

    # dk, dv: grid (B, Hkv, nk, G, nq); the group's query heads and every query block reduce into one tile.
    def q_index(b, h, j, g, i, state, fetch, _):
        return b, h * group + g, fetch[b, j, i], 0

    def q_row_index(b, h, j, g, i, state, fetch, _):
        return b, h * group + g, 0, fetch[b, j, i]

    gq_spec = pl.BlockSpec((None, None, bq, dh), q_index)
    grow_spec = pl.BlockSpec((None, None, SUBLANES, bq), q_row_index)
    own_kv_spec = pl.BlockSpec((None, None, bk, dh), lambda b, h, j, g, i, *_: (b, h, j, 0))
    gqm_spec = pl.BlockSpec((None, SUBLANES, bq), lambda b, h, j, g, i, state, fetch, _: (b, 0, fetch[b, j, i]))
    own_km_spec = pl.BlockSpec((None, bk, SUBLANES), lambda b, h, j, g, i, *_: (b, j, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, plan=plan, scale=scale),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=3, grid=(b, hkv, nk, group, nq),
            in_specs=[gq_spec, own_kv_spec, own_kv_spec, gq_spec, grow_spec, grow_spec, gqm_spec, own_km_spec],
            out_specs=[own_kv_spec, own_kv_spec],
            scratch_shapes=[pltpu.VMEM((bk, dh), jnp.float32), pltpu.VMEM((bk, dh), jnp.float32)]),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=_params(("parallel", "parallel", "parallel", "arbitrary", "arbitrary")),
        name="g2vlm_tpu_flash_dkv", interpret=plan.interpret,
    )(state, fetch_q, layer, *args)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _flash(q, k, v, meta, tables, layer, plan: _Plan):
    return _forward(q, k, v, meta, tables, layer, plan)[0]


def _flash_fwd(q, k, v, meta, tables, layer, plan: _Plan):
    o, lse = _forward(q, k, v, meta, tables, layer, plan)
    # The residual keeps one log-sum-exp per query (sublane 0), not the kernel's 8 equal sublanes.
    return o, (q, k, v, o, lse[:, :, 0], meta, tables, layer)


def _flash_bwd(plan: _Plan, residuals, do):
    q, k, v, o, lse, meta, tables, layer = residuals
    delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)

    def rows(x):  # [B, H, L] -> [B, H, 8, L], the layout the kernels read (one sublane tile)
        return jnp.broadcast_to(x[:, :, None, :], (*x.shape[:2], SUBLANES, x.shape[2]))

    dq, dk, dv = _backward(q, k, v, do.astype(q.dtype), rows(lse), rows(delta), meta, tables, layer, plan)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# --------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------
def _local_attention(q, k, v, q_info: MaskInfo, k_info: MaskInfo, layer, *, geo_mode: str, block_size: int,
                     interpret: bool):
    """The kernel on one device's rows: [B, L, H, Dh] in and out, padding and layouts handled here."""
    b, lq, hq, dh = q.shape
    lk, hkv = k.shape[1], k.shape[2]
    plan = _Plan(geo_mode=geo_mode, block_q=fit_block(lq, block_size), block_k=fit_block(lk, block_size),
                 num_q_heads=hq, num_kv_heads=hkv, interpret=interpret)
    lq_pad = -(-lq // plan.block_q) * plan.block_q
    lk_pad = -(-lk // plan.block_k) * plan.block_k
    q_info, k_info = tiles.pad_info(q_info, lq_pad), tiles.pad_info(k_info, lk_pad)

    def head_major(x, length):
        return jnp.swapaxes(tiles.pad_length(x, length), 1, 2)

    tables = _tables(q_info, k_info, plan, layer)
    # Both orientations of both sides: the forward reads queries as columns and keys as rows, the
    # backward (tiles with keys down) the other way round. Four small int32 arrays per call.
    meta = {"q_cols": _meta_columns(q_info), "k_rows": _meta_rows(k_info),
            "q_rows": _meta_rows(q_info), "k_cols": _meta_columns(k_info)}
    o = _flash(head_major(q, lq_pad), head_major(k, lk_pad), head_major(v, lk_pad), meta, tables,
               jnp.reshape(layer, (1,)), plan)
    return jnp.swapaxes(o, 1, 2)[:, :lq]


def _specs(q: jax.Array, k: jax.Array, mesh) -> tuple:
    """shard_map specs of (q, k/v, metadata): batch over data x fsdp, heads over 'tensor' when both divide."""
    batch = sharding_lib.BATCH_AXES if q.shape[0] % sharding_lib.axis_size(mesh, sharding_lib.BATCH_AXES) == 0 \
        else None
    tensor = sharding_lib.axis_size(mesh, "tensor")
    heads = "tensor" if tensor > 1 and q.shape[2] % tensor == 0 and k.shape[2] % tensor == 0 else None
    P = jax.sharding.PartitionSpec
    return P(batch, None, heads, None), P(batch, None, heads, None), P(batch, None)


def tpu_flash_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_info: MaskInfo, k_info: MaskInfo, *,
                        geo_mode: str, layer_idx=None, block_size: int = 512, interpret: bool = False) -> jax.Array:
    """Masked GQA attention as a Pallas TPU kernel (see the module docstring).

    Args:
      q: float[B, Lq, Hq, Dh]; k, v: float[B, Lk, Hkv, Dh] with Hq a multiple of Hkv.
      q_info / k_info: metadata of queries [B, Lq] / keys [B, Lk].
      geo_mode, layer_idx: as in `mask.build_mask` (layer_idx may be traced).
      block_size: largest query/key block; blocks are multiples of 128 (`fit_block`).
      interpret: run the kernels with Pallas' HLO interpreter (plain XLA loops over the grid) instead
        of compiling them with Mosaic: lets CPU tests run the sharded path, where the TPU interpret
        mode (`pltpu.force_tpu_interpret_mode`, used for everything else) cannot run under shard_map.
    Returns:
      float[B, Lq, Hq, Dh] in q's dtype; 0 for a query with no allowed key.
    """
    check_geo_mode(geo_mode, layer_idx)
    if block_size <= 0:
        raise ValueError(f"tpu_flash attention: block_size must be positive, got {block_size}")
    layer = jnp.asarray(0 if layer_idx is None else layer_idx, jnp.int32)
    local = functools.partial(_local_attention, geo_mode=geo_mode, block_size=block_size, interpret=interpret)
    mesh = sharding_lib.bound_mesh()
    if mesh is None:
        if jax.device_count() > 1:
            raise RuntimeError(
                f"tpu_flash attention traced outside a sharded program on a host with {jax.device_count()} devices: "
                "a Pallas call has no partitioning rule, so XLA would gather every operand onto each device. Build "
                "the jitted function with g2vlm_jax.sharding.jit_sharded(fn, mesh, preset)")
        return local(q, k, v, q_info, k_info, layer)
    q_spec, kv_spec, meta_spec = _specs(q, k, mesh)
    info_spec = MaskInfo(*(meta_spec,) * len(META_FIELDS))
    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, info_spec, info_spec, jax.sharding.PartitionSpec()),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_info, k_info, layer)
