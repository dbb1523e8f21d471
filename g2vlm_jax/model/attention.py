"""The shared MoT self-attention: one kernel-agnostic entry point over the mask rule of model/mask.py.

(The encoders' and Pi3 decoders' full attention has no mask to evaluate: `encoder_layers.attention`
runs it with XLA's fused attention on TPU/GPU and `kernels/full_rows.py` elsewhere.)

Every MoT layer runs ONE softmax over the semantic and geometry tokens of a row together (SPEC 1).
Which (query, key) pairs may interact is decided by `mask.mask_rule` on per-token metadata
(`mask.MaskInfo`, worked tables in model/mask.py); every kernel below evaluates that rule.

Kernels (`kernel=`; all compute the same function through `mask_rule`; tests/test_attention_kernels*.py
check it)
------------------------------------------------------------------------------------------
    xla        dense fp32 logits [B, Hq, Lq, Lk] and the `build_mask` mask: the reference; memory
               quadratic in the row length.
    blockwise  flash-style online softmax in pure JAX (model/kernels/blockwise.py): memory linear,
               skips tiles the rule fully masks, custom flash backward. Any backend.
    cpu_fused  a native fused flash forward for XLA:CPU (model/kernels/cpu_fused.{py,cc}, built on first
               use with the system C++ compiler): matmuls, mask rule, exp and row sums per cache-sized
               tile; memory linear. Differentiated, it is `reference_kernel`'s forward and backward (so
               training computes what it did before). CPU only, fp32, head dim 32/64/128, one device.
    tpu_flash  Pallas (Mosaic) flash attention for TPUs (model/kernels/tpu_flash.py): the rule is
               evaluated per tile in VMEM from the same metadata, dead tiles skip both the matmuls
               and their K/V copies, flash backward in two kernels. TPU only (CPU tests run it in
               Pallas' TPU interpret mode).
    cudnn      cuDNN fused attention with the mask as a dense bf16 bias (model/kernels/cudnn.py):
               GPU only, bf16/fp16 only; the bias is quadratic (2 bytes per pair).
    auto       per backend, decided at trace time by `select_kernel`:
                 cpu  cpu_fused where it runs (`cpu_fused.available()`, fp32, one device), else
                      `reference_kernel`: xla while Lq * Lk <= CPU_DENSE_MAX_PAIRS (one default tile:
                      same arithmetic, faster compile), blockwise above (faster and memory linear);
                 gpu  cudnn when its shape/dtype rules hold and the bias fits
                      kernels.cudnn.MAX_BIAS_BYTES, else blockwise;
                 tpu  tpu_flash. (Splash attention cannot express this rule: its masks are static
                      numpy masks fixed at trace time plus segment-id equality, while ours depend on
                      where text, markers and frames sit in each packed row; 'splash' is an error
                      that points here.)
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from g2vlm_jax.config import ATTENTION_KERNELS, GeoMode
from g2vlm_jax.model.kernels import cpu_fused, cudnn
from g2vlm_jax.model.kernels.blockwise import blockwise_attention
from g2vlm_jax.model.kernels.tpu_flash import tpu_flash_attention
from g2vlm_jax.model.mask import MaskInfo, build_mask, check_geo_mode

DEFAULT_BLOCK_SIZE = 512  # = ModelConfig.attention_block_size default
# auto on CPU: the dense XLA kernel up to one default tile of (query, key) pairs per row. There both
# kernels do the same arithmetic and XLA compiles ~2x faster; above it blockwise was measured faster
# on CPU (fwd+bwd, 4 heads x 32: L=1024 0.32 s vs 0.56 s, L=2048 0.60 s vs 1.61 s) and is memory linear.
CPU_DENSE_MAX_PAIRS = DEFAULT_BLOCK_SIZE * DEFAULT_BLOCK_SIZE
TPU_KERNEL = "tpu_flash"  # what 'auto' runs on TPUs (also what `g2vlm aot` compiles)


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
      kernel: 'auto' | 'xla' | 'blockwise' | 'cpu_fused' | 'tpu_flash' | 'cudnn' (see the module docstring).
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
    name = select_kernel(q, k) if kernel == "auto" else kernel
    if name in ("xla", "blockwise"):
        return _reference(q, k, v, mask_info, key_info, layer_idx, kernel=name, geo_mode=geo_mode,
                          block_size=block_size)
    if name == "cpu_fused":
        reason = cpu_fused.unavailable_reason() or (None if cpu_fused.supports(q) else
                                                    f"it takes fp32 with head dim in {cpu_fused.HEAD_DIMS}")
        if reason is not None:
            raise ValueError(f"attention kernel 'cpu_fused' cannot run: {reason}; use kernel='auto'")
        reference = functools.partial(_reference, kernel=reference_kernel(q, k), geo_mode=geo_mode,
                                      block_size=block_size)
        return cpu_fused.fused_attention(q, k, v, mask_info, key_info, 0 if layer_idx is None else layer_idx,
                                         geo_mode=geo_mode, reference=reference)
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
    raise ValueError(f"attention kernel {kernel!r} is not available; choose one of {list(ATTENTION_KERNELS)}")


def _reference(q, k, v, mask_info, key_info, layer_idx, *, kernel: str, geo_mode: GeoMode, block_size: int):
    """The XLA kernels 'xla' and 'blockwise' (also what `cpu_fused` differentiates through)."""
    layer_idx = layer_idx if geo_mode == "mixed" else None
    if kernel == "xla":
        return _xla_attention(q, k, v, build_mask(mask_info, key_info, geo_mode, layer_idx))
    return blockwise_attention(q, k, v, mask_info, key_info, geo_mode=geo_mode, layer_idx=layer_idx,
                               block_size=block_size)


def reference_kernel(q: jax.Array, k: jax.Array) -> str:
    """The XLA kernel for these shapes on CPU: dense up to CPU_DENSE_MAX_PAIRS pairs a row, blockwise above."""
    return "xla" if q.shape[1] * k.shape[1] <= CPU_DENSE_MAX_PAIRS else "blockwise"


def cpu_fused_runs(q: jax.Array) -> bool:
    """Whether 'auto' runs the native CPU kernel on q: built here, fp32 with its head dims, and one device (a
    custom call is opaque to the SPMD partitioner, which would gather its operands on every device)."""
    return cpu_fused.supports(q) and jax.device_count() == 1 and cpu_fused.available()


def select_kernel(q: jax.Array, k: jax.Array, backend: str | None = None) -> str:
    """The kernel 'auto' runs for these shapes on `backend` (default: JAX's default backend)."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        return "cpu_fused" if cpu_fused_runs(q) else reference_kernel(q, k)
    if backend in ("gpu", "cuda") and cudnn.unsupported_reason(q, k) is None \
            and cudnn.bias_bytes(q, k) <= cudnn.MAX_BIAS_BYTES:
        return "cudnn"
    if backend == "tpu":
        return TPU_KERNEL
    return "blockwise"


def _dense_probabilities(q: jax.Array, k: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax probabilities fp32 [B, Hkv, G, Lq, Lk] of q [B, Lq, Hq, Dh] against k [B, Lk, Hkv, Dh] under
    mask bool[B, Lq, Lk]; a row with no allowed key is all zeros."""
    b, lq, hq, dh = q.shape
    hkv = k.shape[2]
    qg = q.reshape(b, lq, hkv, hq // hkv, dh)  # query heads grouped by the K/V head they read
    logits = jnp.einsum("bqhgd,bkhd->bhgqk", qg, k, preferred_element_type=jnp.float32)
    logits = logits * (1.0 / jnp.sqrt(jnp.float32(dh)))
    m = mask[:, None, None, :, :]
    logits = jnp.where(m, logits, jnp.finfo(jnp.float32).min)
    # Softmax by hand so that a row with no allowed key yields zeros: its max is finfo.min, every
    # exp is then multiplied by the mask, and its (zero) denominator is replaced by 1.
    p = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True)) * m
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def _dense_output(p: jax.Array, v: jax.Array, q: jax.Array) -> jax.Array:
    """Probabilities p [B, Hkv, G, Lq, Lk] applied to v [B, Lk, Hkv, Dh] -> [B, Lq, Hq, Dh] in q's dtype."""
    out = jnp.einsum("bhgqk,bkhd->bqhgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(q.shape).astype(q.dtype)


@jax.custom_vjp
def _xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Reference kernel: dense logits in fp32, K/V heads shared by their query group (no repeat).

    q: [B, Lq, Hq, Dh], k/v: [B, Lk, Hkv, Dh], mask: bool[B, Lq, Lk] -> [B, Lq, Hq, Dh].
    The backward is the softmax gradient in the flash-attention form, dS = P (dP - rowsum(dO O)): its row
    sums run over Dh values instead of Lk probabilities (autodiff's rowsum(dP P) was the largest item of the
    tiny train step's profile: XLA:CPU ran that [Lq, Lk] reduction at ~7 ns an element). Checked against
    autodiff of the plain softmax in tests/test_attention_kernels.py.
    """
    return _dense_output(_dense_probabilities(q, k, mask), v, q)


def _xla_attention_fwd(q, k, v, mask):
    p = _dense_probabilities(q, k, mask)
    out = _dense_output(p, v, q)
    return out, (q, k, v, p, out)


def _xla_attention_bwd(residuals, dout):
    q, k, v, p, out = residuals
    b, lq, hq, dh = q.shape
    hkv = k.shape[2]
    grouped = (b, lq, hkv, hq // hkv, dh)
    qg, dog = q.reshape(grouped).astype(jnp.float32), dout.reshape(grouped).astype(jnp.float32)
    delta = jnp.einsum("bqhgd,bqhgd->bhgq", dog, out.reshape(grouped).astype(jnp.float32))  # rowsum(dO O)
    dp = jnp.einsum("bqhgd,bkhd->bhgqk", dog, v, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None]) * (1.0 / jnp.sqrt(jnp.float32(dh)))
    dq = jnp.einsum("bhgqk,bkhd->bqhgd", ds, k, preferred_element_type=jnp.float32).reshape(q.shape)
    dk = jnp.einsum("bhgqk,bqhgd->bkhd", ds, qg, preferred_element_type=jnp.float32)
    dv = jnp.einsum("bhgqk,bqhgd->bkhd", p, dog, preferred_element_type=jnp.float32)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_xla_attention.defvjp(_xla_attention_fwd, _xla_attention_bwd)
