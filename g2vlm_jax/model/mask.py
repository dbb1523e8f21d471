"""Attention mask metadata and the one mask rule of the shared MoT self-attention.

Every MoT layer runs ONE softmax over the semantic and geometry tokens of a row together (SPEC 1).
Which (query, key) pairs may interact is a pure function of per-token metadata carried by the
packed batch (`g2vlm_jax/batch.py`): reading order, document, split, and geometry frame. Kernels
(model/kernels/, dispatched by model/attention.py) consume that metadata, never a mask built by
the caller, so each kernel can evaluate the rule in whatever blocked form it needs; this module
sits below them and imports none of them.

The rule (SPEC 1.4), for a query token q and a key token k of one row:

    allowed = same document (document_ids > 0)
              AND (  seq_order[k] <= seq_order[q]                    # causal in reading order
                  OR split_ids[k] == split_ids[q] AND split_full[q]  # inside one image block
                  OR geometry extra (mode) )
              AND NOT geometry block (mode)

    mode          extra                                   block
    global        geo_frame[q] >= 0 and geo_frame[k] >= 0  -
    block_causal  0 <= geo_frame[k] <= geo_frame[q]        -
    frame         -                                       geo_frame[q] >= 0, geo_frame[k] >= 0,
                                                          geo_frame[k] != geo_frame[q]
    mixed         `frame` in even layers (0, 2, ...), `global` in odd layers; the layer index decides
                  (a Python int, or a traced int inside `lax.scan` over layers).

`frame` needs the block term: frames are laid out one after another in reading order, so the causal
clause alone would let frame j see frames 0..j-1 (that is `block_causal`). SPEC 1.4 defines `frame`
as "its own frame only (plus earlier text)", so a geometry-frame query is cut off from every other
frame's tokens (markers included) even when they come earlier. Text after the frames is not a
geometry-frame token and attends to all of them causally in every mode.

Worked example (tokens listed in reading order; the real rows are stored expert-grouped, which does
not matter here because the rule only reads metadata). One row with two documents and padding:

    token        t0  s0  g0  e0  s1  g1  e1  t1  u0  pd
    document      1   1   1   1   1   1   1   1   2   0
    split         1   2   2   2   3   3   3   4   5   0
    split_full    .   F   F   F   F   F   F   .   .   .
    geo_frame    -1   0   0   0   1   1   1  -1  -1  -1

t0 = text prefix, s/e = image start/end markers of geometry frames 0 and 1, g0/g1 = their geometry
tokens (one patch each here), t1 = trailing text, u0 = a second document, pd = padding.
Rows are queries, columns keys; `1` = allowed.

  global                           frame                            block_causal
      t0 s0 g0 e0 s1 g1 e1 t1 u0 pd    t0 s0 g0 e0 s1 g1 e1 t1 u0 pd    t0 s0 g0 e0 s1 g1 e1 t1 u0 pd
  t0   1  .  .  .  .  .  .  .  .  .     1  .  .  .  .  .  .  .  .  .     1  .  .  .  .  .  .  .  .  .
  s0   1  1  1  1  1  1  1  .  .  .     1  1  1  1  .  .  .  .  .  .     1  1  1  1  .  .  .  .  .  .
  g0   1  1  1  1  1  1  1  .  .  .     1  1  1  1  .  .  .  .  .  .     1  1  1  1  .  .  .  .  .  .
  e0   1  1  1  1  1  1  1  .  .  .     1  1  1  1  .  .  .  .  .  .     1  1  1  1  .  .  .  .  .  .
  s1   1  1  1  1  1  1  1  .  .  .     1  .  .  .  1  1  1  .  .  .     1  1  1  1  1  1  1  .  .  .
  g1   1  1  1  1  1  1  1  .  .  .     1  .  .  .  1  1  1  .  .  .     1  1  1  1  1  1  1  .  .  .
  e1   1  1  1  1  1  1  1  .  .  .     1  .  .  .  1  1  1  .  .  .     1  1  1  1  1  1  1  .  .  .
  t1   1  1  1  1  1  1  1  1  .  .     1  1  1  1  1  1  1  1  .  .     1  1  1  1  1  1  1  1  .  .
  u0   .  .  .  .  .  .  .  .  1  .     .  .  .  .  .  .  .  .  1  .     .  .  .  .  .  .  .  .  1  .
  pd   .  .  .  .  .  .  .  .  .  .     .  .  .  .  .  .  .  .  .  .     .  .  .  .  .  .  .  .  .  .

`mixed` is the `frame` table in layers 0, 2, 4, ... and the `global` table in layers 1, 3, 5, ...
A padding query (last row) has no allowed key; `attention` returns 0 for it, never NaN.

KV-cache decoding reuses the same rule with different query and key metadata (`key_info`): the
query side is the new tokens, the key side is the cache plus the new tokens.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from g2vlm_jax.config import GEO_MODES, GeoMode


@struct.dataclass
class MaskInfo:
    """Per-token attention metadata of one side (queries or keys) of an attention call.

    All fields are int32[B, L] except `split_full: bool[B, L]`; their meaning is that of the same
    fields of `PackedBatch` (g2vlm_jax/batch.py).
    """

    seq_order: jax.Array
    document_ids: jax.Array
    split_ids: jax.Array
    split_full: jax.Array
    geo_frame: jax.Array

    @classmethod
    def from_batch(cls, batch) -> "MaskInfo":
        """The metadata of every slot of a `PackedBatch` row."""
        return cls(seq_order=batch.seq_order, document_ids=batch.document_ids, split_ids=batch.split_ids,
                   split_full=batch.split_full, geo_frame=batch.geo_frame)

    def slice(self, start: int, stop: int) -> "MaskInfo":
        """Metadata of slots [start, stop) (e.g. the query side of a decoding step)."""
        return jax.tree.map(lambda a: a[:, start:stop], self)

    @property
    def length(self) -> int:
        return self.seq_order.shape[1]


def check_geo_mode(geo_mode: str, layer_idx) -> None:
    if geo_mode not in GEO_MODES:
        raise ValueError(f"geo_attention mode {geo_mode!r} is unknown; allowed values are {list(GEO_MODES)}")
    if geo_mode == "mixed" and layer_idx is None:
        raise ValueError("geo_attention 'mixed' alternates per layer: pass layer_idx (even -> frame, odd -> global)")


def build_mask(q_info: MaskInfo, k_info: MaskInfo, geo_mode: GeoMode, layer_idx=None, xp=jnp) -> jax.Array:
    """The attention rule of the module docstring as a dense mask.

    Args:
      q_info: query metadata, fields [B, Lq].
      k_info: key metadata, fields [B, Lk].
      geo_mode: 'global' | 'frame' | 'block_causal' | 'mixed' (then `layer_idx` is required).
      layer_idx: int or traced int32 scalar; only read in 'mixed' mode.
      xp: the array module: jax.numpy, or numpy to evaluate host metadata on the host (flops.py).
    Returns:
      bool[B, Lq, Lk], True where query q may attend to key k.
    """
    check_geo_mode(geo_mode, layer_idx)
    return mask_rule(jax.tree.map(lambda a: a[:, :, None], q_info),  # queries as columns
                     jax.tree.map(lambda a: a[:, None, :], k_info),  # keys as rows
                     geo_mode, layer_idx, xp)


def mask_rule(q: MaskInfo, k: MaskInfo, geo_mode: GeoMode, layer_idx=None, xp=jnp) -> jax.Array:
    """The rule itself, on query and key metadata laid out to broadcast against each other.

    `build_mask` passes fields [B, Lq, 1] and [B, 1, Lk]; a kernel may pass one tile's columns
    [bq, 1] and rows [1, bk]. Every kernel evaluates the rule through this function.
    Returns the broadcast boolean mask.
    """
    same_doc = (q.document_ids == k.document_ids) & (q.document_ids > 0)
    causal = k.seq_order <= q.seq_order
    same_full = (q.split_ids == k.split_ids) & q.split_full
    base = causal | same_full
    gq, gk = q.geo_frame, k.geo_frame
    both_geo = (gq >= 0) & (gk >= 0)

    global_mask = same_doc & (base | both_geo)
    frame_mask = same_doc & base & ~(both_geo & (gk != gq))
    if geo_mode == "global":
        return global_mask
    if geo_mode == "frame":
        return frame_mask
    if geo_mode == "block_causal":
        return same_doc & (base | ((gk >= 0) & (gk <= gq)))
    # mixed: the parity of the layer picks the table, for Python and traced indices alike. Written as
    # boolean algebra on an int comparison (not `where` between two masks, nor `%`): the TPU kernel
    # evaluates this function too, and Mosaic can neither select between boolean vectors nor lower sign().
    if xp is jnp:
        parity = jax.lax.rem(jnp.asarray(layer_idx, jnp.int32), 2)
    else:  # host numpy (layer indices are >= 0, where rem and % agree)
        parity = xp.asarray(layer_idx, xp.int32) % 2
    odd = xp.broadcast_to(parity, both_geo.shape) == 1
    return same_doc & (base | (both_geo & odd)) & ~(both_geo & (gk != gq) & ~odd)
