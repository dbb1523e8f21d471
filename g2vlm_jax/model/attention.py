"""The shared MoT self-attention: mask metadata, the mask rule, and one kernel-agnostic entry point.

Every MoT layer runs ONE softmax over the semantic and geometry tokens of a row together (SPEC 1).
Which (query, key) pairs may interact is a pure function of per-token metadata carried by the
packed batch (`g2vlm_jax/batch.py`): reading order, document, split, and geometry frame. Kernels
(the plain XLA path here; blockwise / cuDNN / splash later) consume that metadata, never a mask
built by the caller, so each kernel can evaluate the rule in whatever blocked form it needs.

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

Kernels (`kernel=`; all compute the same function through `mask_rule`; tests/test_attention_kernels*.py
check it)
------------------------------------------------------------------------------------------
    xla        dense fp32 logits [B, Hq, Lq, Lk] and the `build_mask` mask: the reference; memory
               quadratic in the row length.
    blockwise  flash-style online softmax in pure JAX (model/kernels/blockwise.py): memory linear,
               skips tiles the rule fully masks, custom flash backward. Any backend.
    tpu_flash  Pallas (Mosaic) flash attention for TPUs (model/kernels/tpu_flash.py): the rule is
               evaluated per tile in VMEM from the same metadata, dead tiles skip both the matmuls
               and their K/V copies, flash backward in two kernels. TPU only (CPU tests run it in
               Pallas' TPU interpret mode).
    cudnn      cuDNN fused attention with the mask as a dense bf16 bias (model/kernels/cudnn.py):
               GPU only, bf16/fp16 only; the bias is quadratic (2 bytes per pair).
    auto       per backend, decided at trace time by `select_kernel`:
                 cpu  xla while Lq * Lk <= CPU_DENSE_MAX_PAIRS (one default tile: same arithmetic,
                      faster compile), blockwise above (faster and memory linear);
                 gpu  cudnn when its shape/dtype rules hold and the bias fits
                      kernels.cudnn.MAX_BIAS_BYTES, else blockwise;
                 tpu  tpu_flash. (Splash attention cannot express this rule: its masks are static
                      numpy masks fixed at trace time plus segment-id equality, while ours depend on
                      where text, markers and frames sit in each packed row; 'splash' is an error
                      that points here.)
"""
from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

GeoMode = Literal["global", "frame", "block_causal", "mixed"]
GEO_MODES: tuple[str, ...] = ("global", "frame", "block_causal", "mixed")
KERNELS: tuple[str, ...] = ("auto", "xla", "blockwise", "tpu_flash", "cudnn")
DEFAULT_BLOCK_SIZE = 512  # = ModelConfig.attention_block_size default
# auto on CPU: the dense XLA kernel up to one default tile of (query, key) pairs per row. There both
# kernels do the same arithmetic and XLA compiles ~2x faster; above it blockwise was measured faster
# on CPU (fwd+bwd, 4 heads x 32: L=1024 0.32 s vs 0.56 s, L=2048 0.60 s vs 1.61 s) and is memory linear.
CPU_DENSE_MAX_PAIRS = DEFAULT_BLOCK_SIZE * DEFAULT_BLOCK_SIZE
TPU_KERNEL = "tpu_flash"  # what 'auto' runs on TPUs (also what `g2vlm aot` compiles)


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


def build_mask(q_info: MaskInfo, k_info: MaskInfo, geo_mode: GeoMode, layer_idx=None) -> jax.Array:
    """The attention rule of the module docstring as a dense mask.

    Args:
      q_info: query metadata, fields [B, Lq].
      k_info: key metadata, fields [B, Lk].
      geo_mode: 'global' | 'frame' | 'block_causal' | 'mixed' (then `layer_idx` is required).
      layer_idx: int or traced int32 scalar; only read in 'mixed' mode.
    Returns:
      bool[B, Lq, Lk], True where query q may attend to key k.
    """
    check_geo_mode(geo_mode, layer_idx)
    return mask_rule(jax.tree.map(lambda a: a[:, :, None], q_info),  # queries as columns
                     jax.tree.map(lambda a: a[:, None, :], k_info),  # keys as rows
                     geo_mode, layer_idx)


def mask_rule(q: MaskInfo, k: MaskInfo, geo_mode: GeoMode, layer_idx=None) -> jax.Array:
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
    odd = jnp.broadcast_to(jax.lax.rem(jnp.asarray(layer_idx, jnp.int32), 2), both_geo.shape) == 1
    return same_doc & (base | (both_geo & odd)) & ~(both_geo & (gk != gq) & ~odd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask_info: MaskInfo, *, geo_mode: GeoMode,
              layer_idx=None, key_info: MaskInfo | None = None, kernel: str = "auto",
              block_size: int = DEFAULT_BLOCK_SIZE) -> jax.Array:
    """Masked multi-head attention with grouped K/V heads: the single entry point of every kernel.

    Args:
      q: float[B, Lq, Hq, Dh] (rotary already applied).
      k, v: float[B, Lk, Hkv, Dh]; Hq must be a multiple of Hkv (GQA).
      mask_info: metadata of the queries, fields [B, Lq].
      geo_mode, layer_idx: see `build_mask`.
      key_info: metadata of the keys, fields [B, Lk]; None means the keys are the queries' tokens.
      kernel: 'auto' | 'xla' | 'blockwise' | 'tpu_flash' | 'cudnn' (see the module docstring).
      block_size: query/key block of the blockwise and tpu_flash kernels (`ModelConfig.attention_block_size`).
    Returns:
      float[B, Lq, Hq, Dh] in q's dtype; a query with no allowed key (padding) gets 0.
    """
    key_info = mask_info if key_info is None else key_info
    b, lq, hq, dh = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != dh or hq % k.shape[2]:
        raise ValueError(f"attention: q {q.shape}, k {k.shape}, v {v.shape} do not form a GQA triple "
                         "(need k == v shapes [B, Lk, Hkv, Dh] with Hq a multiple of Hkv)")
    if mask_info.length != lq or key_info.length != k.shape[1]:
        raise ValueError(f"attention: metadata lengths (queries {mask_info.length}, keys {key_info.length}) "
                         f"do not match q length {lq} / k length {k.shape[1]}")
    check_geo_mode(geo_mode, layer_idx)
    # Imported here: the kernels import MaskInfo / build_mask from this module.
    from g2vlm_jax.model.kernels import cudnn
    from g2vlm_jax.model.kernels.blockwise import blockwise_attention
    from g2vlm_jax.model.kernels.tpu_flash import tpu_flash_attention

    name = select_kernel(q, k) if kernel == "auto" else kernel
    if name == "xla":
        return _xla_attention(q, k, v, build_mask(mask_info, key_info, geo_mode, layer_idx))
    if name == "blockwise":
        return blockwise_attention(q, k, v, mask_info, key_info, geo_mode=geo_mode, layer_idx=layer_idx,
                                   block_size=block_size)
    if name == "tpu_flash":
        return tpu_flash_attention(q, k, v, mask_info, key_info, geo_mode=geo_mode, layer_idx=layer_idx,
                                   block_size=block_size)
    if name == "cudnn":
        reason = cudnn.unsupported_reason(q, k)
        if reason is not None:
            raise ValueError(f"attention kernel 'cudnn': {reason}; use kernel='auto' or 'blockwise'")
        return cudnn.cudnn_attention(q, k, v, build_mask(mask_info, key_info, geo_mode, layer_idx))
    if name == "splash":
        raise ValueError("attention kernel 'splash' cannot express the packed-row mask (splash masks are static, "
                         "ours depend on each row's layout); use kernel='tpu_flash' (what 'auto' picks on TPU)")
    raise ValueError(f"attention kernel {kernel!r} is not available; choose one of {list(KERNELS)}")


def select_kernel(q: jax.Array, k: jax.Array, backend: str | None = None) -> str:
    """The kernel 'auto' runs for these shapes on `backend` (default: JAX's default backend)."""
    from g2vlm_jax.model.kernels import cudnn

    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "xla" if q.shape[1] * k.shape[1] <= CPU_DENSE_MAX_PAIRS else "blockwise"
    if backend in ("gpu", "cuda") and cudnn.unsupported_reason(q, k) is None \
            and cudnn.bias_bytes(q, k) <= cudnn.MAX_BIAS_BYTES:
        return "cudnn"
    if backend == "tpu":
        return TPU_KERNEL
    return "blockwise"


def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference kernel: dense logits in fp32, K/V heads shared by their query group (no repeat).

    q: [B, Lq, Hq, Dh], k/v: [B, Lk, Hkv, Dh], mask: bool[B, Lq, Lk] -> [B, Lq, Hq, Dh].
    """
    b, lq, hq, dh = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, lq, hkv, hq // hkv, dh)  # query heads grouped by the K/V head they read
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / jnp.sqrt(jnp.float32(dh)))
    m = mask[:, None, None, :, :]
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    # Softmax by hand so that a row with no allowed key yields zeros: its max is finfo.min, every
    # exp is then multiplied by the mask, and its (zero) denominator is replaced by 1.
    logits = logits - jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    p = jnp.exp(logits) * m
    # A row with no allowed key (padding) has denominator 0: divide by 1 there instead. Flooring the
    # denominator at `tiny` would be fine forwards, but its backward term 1/tiny² overflows and
    # 0 * inf poisons the whole gradient with NaN.
    denom = jnp.sum(p, axis=-1, keepdims=True)
    p = p / jnp.where(denom > 0, denom, 1.0)
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, lq, hq, dh).astype(q.dtype)
