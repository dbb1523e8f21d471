"""Building blocks shared by the semantic encoder (vit.py), the geometry encoder (dino.py) and the
Pi3 decoders/heads (heads.py): parameter constructors with logical axis names, plain attention,
activations, and the loader of official PyTorch weights.

Logical axis names (Flax 0.12 stores them in the Variable metadata key `out_sharding`, read with
`param.out_sharding`; g2vlm_jax/sharding.py maps them to mesh axes):
    enc_embed   encoder / decoder width (ViT 1280, DINO 1024, Pi3 decoders D)
    enc_heads   fused q/k/v or attention width
    enc_mlp     MLP hidden width
    embed       backbone width D, where an encoder parameter produces it (the ViT merger output)
    None        small or odd axes (patch pixels, 3/9/12-wide outputs, the camera head)
Initialisation: weights and learned tokens normal(std 0.02) (not truncated), biases 0, norm scales 1.

Official weight names are derived from our parameter paths (`official_key`):
    path elements joined with '.', list indices as numbers;
    a submodule named `name_N` is the official `nn.Sequential` entry `name.N` (merger `mlp_0` -> `mlp.0`);
    `kernel` -> `weight`, stored transposed: torch keeps [out, in, *kernel]; ours is
    [in * prod(kernel), out] = `w.reshape(out, -1).T` (a Linear is the 2-D case; the ViT Conv3d and the
    DINO Conv2d patch projections flatten their (c, [t,] ky, kx) input in that order);
    LayerNorm `scale` -> `weight`; every other parameter (`bias`, tokens, LayerScale) is copied as is.
"""
from __future__ import annotations

import contextlib
import contextvars
import re
from typing import Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from g2vlm_jax.model.attention import select_kernel
from g2vlm_jax.model.kernels import cpu_fused
from g2vlm_jax.model.kernels.full_rows import full_rows_attention

INIT_STD = 0.02


def dense(din: int, dout: int, names: tuple, *, rngs: nnx.Rngs, dtype, param_dtype,
          use_bias: bool = True) -> nnx.Linear:
    """A Linear whose kernel [din, dout] carries `names` and whose bias carries `(names[1],)`."""
    return nnx.Linear(
        din, dout, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        kernel_init=nnx.with_partitioning(nnx.initializers.normal(INIT_STD), names),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (names[1],)))


def layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype, param_dtype,
               name: str | None = "enc_embed") -> nnx.LayerNorm:
    """LayerNorm (statistics in fp32) with scale 1 and bias 0."""
    return nnx.LayerNorm(
        dim, epsilon=eps, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
        scale_init=nnx.with_partitioning(nnx.initializers.ones_init(), (name,)),
        bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(), (name,)))


def normal_param(rngs: nnx.Rngs, shape: tuple[int, ...], names: tuple, param_dtype, std: float = INIT_STD) -> nnx.Param:
    """A learned tensor (tokens, position embeddings) initialised normal(std, 0.02 by default)."""
    init = nnx.with_partitioning(nnx.initializers.normal(std), names)
    return nnx.Param(init(rngs.params(), shape, param_dtype))


# The model's `attention_kernel` while G2VLM traces its encoders and heads (`model_kernel`); 'auto' elsewhere.
_MODEL_KERNEL: contextvars.ContextVar[str] = contextvars.ContextVar("model_attention_kernel", default="auto")


@contextlib.contextmanager
def model_kernel(kernel: str):
    """Runs the encoders and Pi3 heads traced inside with the model's `attention_kernel` (G2VLM.__call__),
    so that a program compiled ahead of time for a TPU (`g2vlm aot` sets the kernel to the TPU's) is the
    program a TPU runs, not the one the tracing CPU would pick."""
    token = _MODEL_KERNEL.set(kernel)
    try:
        yield
    finally:
        _MODEL_KERNEL.reset(token)


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """Full (non-causal) softmax attention, scale Dh^-0.5.

    q: float[B, Lq, H, Dh], k, v: float[B, Lk, H, Dh] -> float[B, Lq, H, Dh]. Every batch row attends
    only within itself, which is how the encoders keep attention inside one image / one frame.
    The kernel follows the model's (`model_kernel`; 'auto' resolved by `select_kernel` for the running
    backend): where that is the TPU's or GPU's mask kernel ('tpu_flash' / 'cudnn') XLA's fused
    dot-product attention, which needs no mask; 'cpu_fused' the native CPU kernel without a mask (under
    differentiation: full_rows); elsewhere (CPU; 'xla' / 'blockwise') whole-row tiles
    without a mask (`kernels/full_rows.py`: exact, memory bounded by the tile, 1.5-3x faster on CPU
    than the MoT kernels on all-allowed metadata).
    """
    kernel = _MODEL_KERNEL.get()
    name = select_kernel(q, k) if kernel == "auto" else kernel
    if name in ("tpu_flash", "cudnn"):
        return jax.nn.dot_product_attention(q, k, v)
    if name == "cpu_fused":  # the native kernel without a mask; differentiated, full_rows
        return cpu_fused.fused_attention(q, k, v, reference=_full_rows_reference)
    return full_rows_attention(q, k, v)


def _full_rows_reference(q, k, v, q_info, k_info, layer):
    """`full_rows_attention` with the metadata arguments of a `cpu_fused` reference (none here)."""
    return full_rows_attention(q, k, v)


def gelu(x: jax.Array) -> jax.Array:
    """Exact (erf) GELU, torch's nn.GELU()."""
    return jax.nn.gelu(x, approximate=False)


def quick_gelu(x: jax.Array) -> jax.Array:
    """x * sigmoid(1.702 x), the Qwen2-VL ViT MLP activation."""
    return x * jax.nn.sigmoid(1.702 * x)


# --------------------------------------------------------------------------------------------------
# Official weights
# --------------------------------------------------------------------------------------------------
_SEQUENTIAL = re.compile(r"^(.+)_(\d+)$")


def official_key(path: Iterable) -> str:
    """Official checkpoint name of one of our parameter paths (see the module docstring)."""
    parts = [str(p) for p in path]
    out = []
    for i, p in enumerate(parts):
        last = i == len(parts) - 1
        if last and p in ("kernel", "scale"):
            out.append("weight")
            continue
        m = _SEQUENTIAL.match(p) if not last else None
        out.append(f"{m.group(1)}.{m.group(2)}" if m else p)
    return ".".join(out)


def _to_ours(path: tuple, value: np.ndarray) -> np.ndarray:
    if str(path[-1]) == "kernel":
        return value.reshape(value.shape[0], -1).T
    return value


def official_param_map(module: nnx.Module, prefix: str = "") -> dict[str, tuple[tuple, nnx.Param]]:
    """{official name: (our path, our Param)} for every parameter of `module`."""
    out = {}
    for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param)):
        out[prefix + official_key(path)] = (tuple(path), var)
    return out


def official_shape(path: tuple, our_shape: tuple[int, ...], official: tuple[int, ...]) -> tuple[int, ...]:
    """Our shape that the official tensor of shape `official` becomes (for shape checks)."""
    if str(path[-1]) == "kernel":
        return (int(np.prod(official[1:])), official[0])
    return tuple(official)


def load_official(module: nnx.Module, state_dict: Mapping[str, np.ndarray], prefix: str = "",
                  ignore: Iterable[str] = ()) -> list[str]:
    """Copies official weights (`prefix` + official name -> array) into `module` in place.

    Every parameter of `module` must be present with the right shape; official keys under one of
    the module's top-level names that nothing consumes are an error too (unless listed in `ignore`,
    names relative to `prefix`), so a renamed or missing layer cannot pass silently.
    `module` may be abstract (built under `nnx.eval_shape`): a converter then never pays for a
    random initialisation. Returns the consumed keys.
    """
    mapping = official_param_map(module, prefix)
    for key, (path, var) in mapping.items():
        if key not in state_dict:
            raise ValueError(f"official weight {key!r} (for our parameter {'.'.join(map(str, path))}) is missing "
                             "from the state dict; pass the full checkpoint and the right prefix")
        value = _to_ours(path, np.asarray(state_dict[key]))
        current = var.get_value()
        if value.shape != current.shape:
            raise ValueError(f"official weight {key!r} has shape {np.shape(state_dict[key])}, which maps to "
                             f"{value.shape}, but our parameter has shape {current.shape}; the config does not "
                             "match the checkpoint")
        var.set_value(jnp.asarray(value, dtype=current.dtype))
    roots = {k[len(prefix):].split(".")[0] for k in mapping}
    ignored = {prefix + n for n in ignore}
    unused = [k for k in state_dict if k.startswith(prefix) and k[len(prefix):].split(".")[0] in roots
              and k not in mapping and k not in ignored]
    if unused:
        raise ValueError(f"official weights {sorted(unused)[:8]} have no counterpart in {type(module).__name__}; "
                         "the config does not match the checkpoint")
    return sorted(mapping)
