"""A fused attention forward for XLA:CPU: the native kernel `cpu_fused.cc`, an XLA FFI custom call.

Why: XLA:CPU runs a tile's two matmuls, its max, exp and sum as separate operations, so every logit goes
through memory about five times (docs/PERFORMANCE.md, issue #23); the native kernel keeps a 96 x 128 tile in
the cache, evaluates the mask rule of model/mask.py per tile from the metadata (whole tiles that the rule
allows or forbids are decided from per-block summaries), and runs the matmuls in register tiles. Forward
only: under differentiation the call is the reference kernel's own forward and backward (`blockwise`, `xla`
or `full_rows`), so training computes exactly what it computed before; inference (reconstruct, generation,
the evaluators) runs the native forward, which agrees with the reference to float rounding (~1e-6 relative).

Build: on first use per machine the source is compiled with the system C++ compiler (GCC: `$CXX`, else `g++`;
the source uses GCC's vector extensions) for the CPU it runs on (`-march=native`: AVX-512 or AVX2 vectors)
against the FFI headers that jaxlib ships, into
`$G2VLM_KERNEL_CACHE` (default `~/.cache/g2vlm_jax/kernels`), keyed by the source, the flags, jaxlib and the
CPU, and written under a temporary name then renamed, so concurrent processes never load half a library
(~10 s once; later processes load it in milliseconds). Without a compiler, or if the build fails, `available()`
is False, one warning says why, and `auto` keeps the XLA kernels.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile

import jax
import jax.numpy as jnp
import numpy as np

SOURCE = pathlib.Path(__file__).with_suffix(".cc")
TARGET = "g2vlm_cpu_fused_attention"
FLAGS = ("-O3", "-march=native", "-std=c++17", "-fPIC", "-shared", "-w")
HEAD_DIMS = (32, 64, 128)
# The `mode` attribute of the custom call: the mask rule per geo_attention mode (`none`: every pair allowed).
MODES = {"none": 0, "global": 1, "frame": 2, "block_causal": 3, "mixed": 4}


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("G2VLM_KERNEL_CACHE", pathlib.Path.home() / ".cache" / "g2vlm_jax" / "kernels"))


def _cpu_flags() -> str:
    """The CPU's feature flags (what -march=native compiles for), or its architecture name."""
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _build(compiler: str) -> pathlib.Path:
    """The compiled library for this source, compiler, jaxlib and CPU (built if missing)."""
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\n".join([SOURCE.read_text(), compiler, *FLAGS, jax.__version__, include,
                                    platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    lib = cache_dir() / f"cpu_fused-{key}.so"
    if lib.exists():
        return lib
    lib.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib.parent)
    os.close(fd)
    try:
        subprocess.run([compiler, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp], check=True, capture_output=True,
                       text=True, timeout=300)
        os.replace(tmp, lib)  # atomic: another process sees the whole library or none
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"{compiler} failed on {SOURCE.name}: {e.stderr.strip()[-2000:]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


@functools.lru_cache(maxsize=None)
def _register(library: pathlib.Path) -> None:
    """Loads the library and registers its handler with XLA:CPU (once per process and library)."""
    handler = ctypes.cdll.LoadLibrary(str(library)).G2vlmCpuFusedAttention
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")


@functools.lru_cache(maxsize=None)
def unavailable_reason() -> str | None:
    """None when the native kernel is registered with XLA:CPU (built on first call), else why not."""
    if os.environ.get("G2VLM_CPU_FUSED", "1") == "0":
        return "disabled by G2VLM_CPU_FUSED=0"
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        return "no C++ compiler found (install g++ or set CXX)"
    try:
        _register(_build(compiler))
    except (OSError, RuntimeError, subprocess.TimeoutExpired, AttributeError) as e:
        return f"the native kernel could not be built or loaded: {e}"
    return None


def available() -> bool:
    """Whether `fused_attention` can run here; warns once (with the reason) when it cannot."""
    reason = unavailable_reason()
    if reason is not None:
        _warn_once(reason)
    return reason is None


@functools.lru_cache(maxsize=None)
def _warn_once(reason: str) -> None:
    logging.warning("attention: the fused CPU kernel is not used (%s); the XLA kernels run instead, slower", reason)


def supports(q: jax.Array) -> bool:
    """Whether the kernel takes these operands: fp32 with a head dimension it is compiled for."""
    return q.dtype == jnp.float32 and q.shape[-1] in HEAD_DIMS


def _metadata(info, batch: int) -> jax.Array:
    """int32[5, B, L]: the five MaskInfo fields in the kernel's order; without a mask an empty int32[5, B, 0]
    (the kernel reads no metadata in mode 'none', so nothing is built or copied on the encoders' path)."""
    if info is None:
        return jnp.zeros((5, batch, 0), jnp.int32)
    return jnp.stack([info.seq_order, info.document_ids, info.split_ids, info.split_full.astype(jnp.int32),
                      info.geo_frame]).astype(jnp.int32)


def _native(mode: int, q, k, v, q_info, k_info, layer):
    qmeta = _metadata(q_info, q.shape[0])
    kmeta = _metadata(k_info, k.shape[0])
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q, k, v, qmeta, kmeta, jnp.asarray(layer, jnp.int32), mode=np.int64(mode))


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused(mode: int, reference, q, k, v, q_info, k_info, layer):
    return _native(mode, q, k, v, q_info, k_info, layer)


def _fused_fwd(mode: int, reference, q, k, v, q_info, k_info, layer):
    # Differentiated: the reference's own forward, whose backward the residual (a jax.vjp closure) holds.
    out, vjp = jax.vjp(lambda q, k, v: reference(q, k, v, q_info, k_info, layer), q, k, v)
    return out, vjp


def _fused_bwd(mode: int, reference, vjp, dout):
    return (*vjp(dout), None, None, None)  # no cotangent for the integer metadata and layer index


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_info=None, k_info=None, layer=0, *,
                    geo_mode: str = "none", reference) -> jax.Array:
    """Softmax attention (scale Dh^-0.5) with the mask rule of `geo_mode` ('none': every pair of a row).

    q: float32[B, Lq, Hq, Dh]; k, v: float32[B, Lk, Hkv, Dh] (Hq a multiple of Hkv); q_info / k_info: MaskInfo
    of the queries / keys ([B, Lq] / [B, Lk]; None with 'none'); layer: the layer index ('mixed' reads its
    parity). reference(q, k, v, q_info, k_info, layer) -> the same output: the differentiable kernel whose
    forward and backward run under differentiation (a module-level function or a partial of one, no arrays
    bound). Returns float32[B, Lq, Hq, Dh]; 0 for a query with no allowed key.
    """
    return _fused(MODES[geo_mode], reference, q, k, v, q_info, k_info, layer)
