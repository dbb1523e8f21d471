"""Per-block summaries of the attention metadata, and the two tile bounds every blocked kernel uses.

A blocked kernel cuts a row into query blocks and key blocks; a (query block, key block) pair is a
tile. From min/max summaries of each block's metadata (document, reading order, split and frame
ids, plus "every slot is real / in a full split / a geometry token") two conservative questions
are answered per tile without looking at its pairs:

    block_may_attend      may ANY pair of the tile be allowed?   False -> the tile is skipped
    block_fully_allowed   is EVERY pair of the tile allowed?     True  -> no mask to evaluate

Both mirror `mask.mask_rule` term by term, each term replaced by an "exists" (resp. "for all")
bound over the summaries. They only need to be conservative: `block_may_attend` never says "empty"
for a tile with an allowed pair, `block_fully_allowed` never says "full" for a tile with a forbidden
pair (tests/test_attention_kernels.py checks both against `build_mask` on random metadata). Keep
them in step with `mask_rule`.

In stage-1 packs most live tiles lie inside one sample's geometry frames, which `global` attention
allows entirely: those tiles skip the per-pair rule (the TPU kernel's unmasked path).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from g2vlm_jax.batch import PAD_ORDER
from g2vlm_jax.model.mask import MaskInfo

_BIG = jnp.iinfo(jnp.int32).max
_SMALL = jnp.iinfo(jnp.int32).min


def pad_length(x: jax.Array, length: int) -> jax.Array:
    """Zero-pads axis 1 of x to `length`."""
    pad = [(0, 0)] * x.ndim
    pad[1] = (0, length - x.shape[1])
    return jnp.pad(x, pad)


def pad_info(info: MaskInfo, length: int) -> MaskInfo:
    """Metadata padded to `length` slots with padding values (document 0: never attends, never attended)."""
    n = length - info.length
    if n == 0:
        return info

    def pad(a, value):
        return jnp.pad(a, ((0, 0), (0, n)), constant_values=value)

    return MaskInfo(seq_order=pad(info.seq_order, PAD_ORDER), document_ids=pad(info.document_ids, 0),
                    split_ids=pad(info.split_ids, 0), split_full=pad(info.split_full, False),
                    geo_frame=pad(info.geo_frame, -1))


@struct.dataclass
class BlockSummary:
    """What one block of slots may contain; every field is [B, num_blocks].

    lo/hi pairs are min/max over the block's real tokens (document > 0) satisfying the field's
    condition; an empty selection gives lo = int32 max, hi = int32 min, which overlaps nothing.
    """

    valid: jax.Array  # any real token
    all_real: jax.Array  # every slot is a real token (no padding)
    doc_lo: jax.Array
    doc_hi: jax.Array
    order_lo: jax.Array
    order_hi: jax.Array
    split_lo: jax.Array
    split_hi: jax.Array
    full_lo: jax.Array  # split ids of tokens whose split is full (bidirectional)
    full_hi: jax.Array
    all_full: jax.Array  # every real token is in a full split
    geo_lo: jax.Array  # frame ids of geometry-frame tokens
    geo_hi: jax.Array
    all_geo: jax.Array  # every real token is a geometry-frame token


def summarize(info: MaskInfo, block: int) -> BlockSummary:
    """Per-block summaries of metadata whose length is a multiple of `block`."""
    b, length = info.seq_order.shape
    shape = (b, length // block, block)
    doc, order, split = (a.reshape(shape) for a in (info.document_ids, info.seq_order, info.split_ids))
    full, frame = info.split_full.reshape(shape), info.geo_frame.reshape(shape)
    real = doc > 0
    is_geo = real & (frame >= 0)

    def lo(a, sel):
        return jnp.min(jnp.where(sel, a, _BIG), axis=-1)

    def hi(a, sel):
        return jnp.max(jnp.where(sel, a, _SMALL), axis=-1)

    return BlockSummary(valid=jnp.any(real, axis=-1), all_real=jnp.all(real, axis=-1),
                        doc_lo=lo(doc, real), doc_hi=hi(doc, real),
                        order_lo=lo(order, real), order_hi=hi(order, real),
                        split_lo=lo(split, real), split_hi=hi(split, real),
                        full_lo=lo(split, real & full), full_hi=hi(split, real & full),
                        all_full=jnp.all(full | ~real, axis=-1),
                        geo_lo=lo(frame, is_geo), geo_hi=hi(frame, is_geo),
                        all_geo=jnp.all(is_geo | ~real, axis=-1))


def _overlap(a_lo, a_hi, b_lo, b_hi) -> jax.Array:
    return (a_lo <= b_hi) & (b_lo <= a_hi)


def _single(lo, hi) -> jax.Array:
    """The selection holds exactly one distinct value."""
    return lo == hi


def _pairwise(qs: BlockSummary, ks: BlockSummary):
    """Query summaries as [B, nq, 1] and key summaries as [B, 1, nk]."""
    return jax.tree.map(lambda a: a[:, :, None], qs), jax.tree.map(lambda a: a[:, None, :], ks)


def _by_mode(geo_mode: str, layer, global_, frame, block_causal) -> jax.Array:
    if geo_mode == "global":
        return global_
    if geo_mode == "frame":
        return frame
    if geo_mode == "block_causal":
        return block_causal
    return jnp.where(jnp.asarray(layer) % 2 == 1, global_, frame)  # mixed; evaluated outside kernels


def block_may_attend(qs: BlockSummary, ks: BlockSummary, geo_mode: str, layer) -> jax.Array:
    """Conservative "some (query, key) pair of this block pair may be allowed": bool[B, nq, nk]."""
    q, k = _pairwise(qs, ks)
    same_doc = q.valid & k.valid & _overlap(q.doc_lo, q.doc_hi, k.doc_lo, k.doc_hi)
    causal = k.order_lo <= q.order_hi
    same_full = _overlap(q.full_lo, q.full_hi, k.split_lo, k.split_hi)
    base = causal | same_full
    both_geo = (q.geo_lo <= q.geo_hi) & (k.geo_lo <= k.geo_hi)
    # `frame` cuts every pair of two geometry tokens of different frames: a tile is empty when all
    # its real tokens are geometry tokens and the two sides share no frame id.
    all_cut = q.all_geo & k.all_geo & ~_overlap(q.geo_lo, q.geo_hi, k.geo_lo, k.geo_hi)
    return _by_mode(geo_mode, layer,
                    global_=same_doc & (base | both_geo),
                    frame=same_doc & base & ~all_cut,
                    block_causal=same_doc & (base | (both_geo & (k.geo_lo <= q.geo_hi))))


def block_fully_allowed(qs: BlockSummary, ks: BlockSummary, geo_mode: str, layer) -> jax.Array:
    """Conservative "every (query, key) pair of this block pair is allowed": bool[B, nq, nk]."""
    q, k = _pairwise(qs, ks)
    same_doc = (q.all_real & k.all_real & _single(q.doc_lo, q.doc_hi) & _single(k.doc_lo, k.doc_hi)
                & (q.doc_lo == k.doc_lo))
    causal = k.order_hi <= q.order_lo
    same_full = (q.all_full & _single(q.split_lo, q.split_hi) & _single(k.split_lo, k.split_hi)
                 & (q.split_lo == k.split_lo))
    base = causal | same_full
    both_geo = q.all_geo & k.all_geo  # with all_real: every token on both sides is a geometry token
    q_geo, k_geo = q.geo_lo <= q.geo_hi, k.geo_lo <= k.geo_hi
    # `frame` cuts no pair when one side has no geometry token or both hold the same single frame.
    no_cut = ~q_geo | ~k_geo | (_single(q.geo_lo, q.geo_hi) & _single(k.geo_lo, k.geo_hi) & (q.geo_lo == k.geo_lo))
    return _by_mode(geo_mode, layer,
                    global_=same_doc & (base | both_geo),
                    frame=same_doc & base & no_cut,
                    block_causal=same_doc & (base | (both_geo & (k.geo_hi <= q.geo_lo))))
