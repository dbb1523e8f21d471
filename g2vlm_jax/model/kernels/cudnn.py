"""cuDNN fused attention (NVIDIA GPUs) for the packed-row mask, via `jax.nn.dot_product_attention`.

What cuDNN can express (JAX 0.10.2, `implementation='cudnn'`): no mask, causal, padding by
per-row sequence lengths, a left sliding window, and an arbitrary boolean `mask` / additive `bias`
of shape [B, 1, Lq, Lk] (JAX turns a boolean mask into a bias with a large negative value). Our
rule (document, reading order through `seq_order`, full splits, geometry frames, the expert-grouped
slot order) is none of the structured masks: slot order is not reading order, and geometry frames
are bidirectional inside a causal row. So this kernel passes the exact `build_mask` result as the
dense mask. That keeps the fused flash kernel (no fp32 logits in memory) but costs one bf16
[B, Lq, Lk] bias per call, i.e. memory quadratic in the row length: `attention`'s 'auto' only picks
it while that bias stays under `MAX_BIAS_BYTES` and uses the blockwise kernel above.

With a bias, a query whose keys are all masked gets a uniform softmax instead of nothing; those
rows (padding) are set to 0 here, as every kernel must.

Not run in this project's CI (no GPU): the glue is tested on CPU by running the same call with
`implementation='xla'` (tests/test_attention_kernels.py).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

MAX_BIAS_BYTES = 1 << 30  # 'auto' uses cuDNN while B * Lq * Lk * 2 bytes of bias fit in this
MAX_HEAD_DIM = 128  # cuDNN flash: head dim <= 128 (256 on Hopper), a multiple of 8


def unsupported_reason(q: jax.Array, k: jax.Array) -> str | None:
    """Why cuDNN flash attention cannot take these inputs, or None when it can (shape/dtype rules only)."""
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return f"cuDNN fused attention needs bfloat16/float16 inputs, got {q.dtype}"
    dh = q.shape[-1]
    if dh % 8 or dh > MAX_HEAD_DIM:
        return f"cuDNN fused attention needs head_dim <= {MAX_HEAD_DIM} and a multiple of 8, got {dh}"
    if q.shape[1] % 2 or k.shape[1] % 2:
        return f"cuDNN fused attention with a mask needs even lengths, got Lq={q.shape[1]}, Lk={k.shape[1]}"
    return None


def bias_bytes(q: jax.Array, k: jax.Array) -> int:
    """Bytes of the dense bf16 bias this kernel materialises."""
    return q.shape[0] * q.shape[1] * k.shape[1] * 2


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *,
                    implementation: str = "cudnn") -> jax.Array:
    """q: [B, Lq, Hq, Dh], k/v: [B, Lk, Hkv, Dh], mask: bool[B, Lq, Lk] -> [B, Lq, Hq, Dh] in q's dtype.

    `implementation` is only changed by tests ('xla' runs the same call on CPU).
    """
    out = jax.nn.dot_product_attention(q, k, v, mask=mask[:, None], implementation=implementation)
    has_key = jnp.any(mask, axis=-1)[:, :, None, None]
    return jnp.where(has_key, out, 0).astype(q.dtype)
