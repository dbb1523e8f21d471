"""The native CPU attention kernel (model/kernels/cpu_fused.{py,cc}): the XLA reference's function, forward;
the reference's own gradient; what 'auto' runs on CPU; a clear fallback when it cannot be built."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_batches import random_mask_info, standard_batch

from g2vlm_jax.model import attention as attention_lib
from g2vlm_jax.model import encoder_layers
from g2vlm_jax.model.attention import attention, select_kernel
from g2vlm_jax.model.kernels import cpu_fused
from g2vlm_jax.model.kernels.full_rows import full_rows_attention
from g2vlm_jax.model.mask import MaskInfo

MODES = [("global", None), ("frame", None), ("block_causal", None), ("mixed", 0), ("mixed", 1)]

pytestmark = pytest.mark.skipif(cpu_fused.unavailable_reason() is not None,
                                reason=f"native kernel not built here: {cpu_fused.unavailable_reason()}")


def _qkv(rows, lq, lk, heads, dh, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(2 * rng.standard_normal(shape, np.float32))
    return normal(rows, lq, heads[0], dh), normal(rows, lk, heads[1], dh), normal(rows, lk, heads[1], dh)


def _info(rng, length, rows):
    return jax.tree.map(jnp.asarray, random_mask_info(rng, length, rows))


def _fused_and_xla(q, k, v, info, key_info, mode, layer):
    run = lambda kernel: jax.jit(lambda q, k, v, i, ki, layer: attention(
        q, k, v, i, geo_mode=mode, layer_idx=layer, key_info=ki, kernel=kernel))(
        q, k, v, info, key_info, None if layer is None else jnp.int32(layer))
    return np.asarray(run("cpu_fused")), np.asarray(run("xla"))


@pytest.mark.parametrize("mode, layer", MODES)
def test_forward_matches_xla_on_random_metadata(mode, layer):
    """Structured random metadata (documents, padding, frames, shuffled reading order: tiles of every kind),
    GQA 6/2, lengths that are no multiple of the kernel's 96 x 128 tiles, and queries != keys (decoding)."""
    rng = np.random.default_rng(1)
    q, k, v = _qkv(2, 300, 300, (6, 2), 64)
    info = _info(rng, 300, 2)
    fused, ref = _fused_and_xla(q, k, v, info, info, mode, layer)
    np.testing.assert_allclose(fused, ref, atol=2e-5 * np.abs(ref).max())
    padding = np.asarray(info.document_ids) == 0  # queries with no allowed key give exactly 0, never NaN
    assert padding.any() and (fused[padding] == 0).all()
    key_info = MaskInfo(*(a[:, :190] for a in jax.tree.leaves(info)))  # the first 190 slots as the keys
    fused, ref = _fused_and_xla(q[:, 150:], k[:, :190], v[:, :190], MaskInfo(*(a[:, 150:] for a in jax.tree.leaves(info))),
                                key_info, mode, layer)
    np.testing.assert_allclose(fused, ref, atol=2e-5 * np.abs(ref).max())


@pytest.mark.parametrize("dh, heads", [(32, (4, 4)), (128, (8, 2))])
def test_forward_matches_xla_on_a_packed_batch(dh, heads):
    """The metadata of real packed rows (two documents, text around frames, a semantic image), other head dims."""
    batch = standard_batch(num_rows=2, views=3)
    info = MaskInfo.from_batch(batch)
    length = info.length
    q, k, v = _qkv(2, length, length, heads, dh, seed=2)
    for mode, layer in MODES:
        fused, ref = _fused_and_xla(q, k, v, info, info, mode, layer)
        np.testing.assert_allclose(fused, ref, atol=2e-5 * np.abs(ref).max(), err_msg=f"{mode} {layer}")


def test_gradient_is_the_reference_kernels():
    """Differentiated, the call is the reference kernel's forward and backward: bit-identical gradients, so
    training computes what it computed before the native kernel."""
    rng = np.random.default_rng(3)
    for length in (200, 700):  # the reference is 'xla' up to 512^2 pairs a row, 'blockwise' above
        q, k, v = _qkv(1, length, length, (4, 2), 64, seed=length)
        info = _info(rng, length, 1)
        reference = attention_lib.reference_kernel(q, k)

        def grads(kernel):
            loss = lambda q, k, v, layer: jnp.sum(jnp.sin(attention(q, k, v, info, geo_mode="mixed", layer_idx=layer,
                                                                    kernel=kernel)))
            return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v, jnp.int32(1))

        for name, a, b in zip("qkv", grads("cpu_fused"), grads(reference)):
            assert np.array_equal(np.asarray(a), np.asarray(b)), f"d{name} differs from {reference}'s at L={length}"


def test_traced_layer_index_inside_scan():
    """'mixed' reads the parity of a traced layer index (the MoT stack scans over layers)."""
    rng = np.random.default_rng(4)
    q, k, v = _qkv(1, 260, 260, (4, 2), 64, seed=4)
    info = _info(rng, 260, 1)
    _, outs = jax.jit(lambda q, k, v: jax.lax.scan(
        lambda c, i: (c, attention(q, k, v, info, geo_mode="mixed", layer_idx=i, kernel="cpu_fused")), 0,
        jnp.arange(2)))(q, k, v)
    for layer in (0, 1):
        ref = attention(q, k, v, info, geo_mode="mixed", layer_idx=layer, kernel="xla")
        np.testing.assert_allclose(np.asarray(outs[layer]), np.asarray(ref), atol=2e-5 * float(jnp.abs(ref).max()))


def test_encoder_attention_without_a_mask():
    """The encoders' and Pi3 decoders' full attention (no mask): full_rows' function, and its gradient."""
    q, k, v = _qkv(3, 530, 530, (3, 3), 64, seed=5)
    with encoder_layers.model_kernel("cpu_fused"):
        fused = jax.jit(encoder_layers.attention)(q, k, v)
        grads = jax.jit(jax.grad(lambda q: jnp.sum(encoder_layers.attention(q, k, v) ** 2)))(q)
    ref = full_rows_attention(q, k, v)
    np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), atol=2e-5 * float(jnp.abs(ref).max()))
    ref_grads = jax.jit(jax.grad(lambda q: jnp.sum(full_rows_attention(q, k, v) ** 2)))(q)
    assert np.array_equal(np.asarray(grads), np.asarray(ref_grads))


def test_auto_runs_it_on_one_cpu_device_for_fp32():
    fp32 = jnp.zeros((1, 300, 4, 64), jnp.float32)
    assert jax.device_count() == 1
    assert select_kernel(fp32, fp32, backend="cpu") == "cpu_fused"
    assert select_kernel(fp32.astype(jnp.bfloat16), fp32.astype(jnp.bfloat16), backend="cpu") == "xla"
    odd_dim = jnp.zeros((1, 300, 4, 20), jnp.float32)
    assert select_kernel(odd_dim, odd_dim, backend="cpu") == "xla"
    with pytest.raises(ValueError, match="cpu_fused.*head dim"):
        attention(odd_dim, odd_dim, odd_dim, _info(np.random.default_rng(0), 300, 1), geo_mode="global",
                  kernel="cpu_fused")


def test_without_it_auto_keeps_the_xla_kernels_and_says_why(monkeypatch, caplog):
    """G2VLM_CPU_FUSED=0 (as a machine without a compiler): 'auto' runs xla / blockwise, one warning names the
    reason, and asking for the kernel by name is an error that says what to do."""
    monkeypatch.setenv("G2VLM_CPU_FUSED", "0")
    cpu_fused.unavailable_reason.cache_clear()
    cpu_fused._warn_once.cache_clear()
    try:
        small, long = jnp.zeros((1, 256, 4, 64)), jnp.zeros((1, 1024, 4, 64))
        with caplog.at_level("WARNING"):
            assert select_kernel(small, small, backend="cpu") == "xla"
            assert select_kernel(long, long, backend="cpu") == "blockwise"
        assert [r.getMessage() for r in caplog.records if "fused CPU kernel" in r.getMessage()] == [
            "attention: the fused CPU kernel is not used (disabled by G2VLM_CPU_FUSED=0); the XLA kernels run "
            "instead, slower"]
        with pytest.raises(ValueError, match="'cpu_fused' cannot run: disabled by G2VLM_CPU_FUSED=0; use kernel='auto'"):
            attention(small, small, small, _info(np.random.default_rng(0), 256, 1), geo_mode="global",
                      kernel="cpu_fused")
    finally:
        monkeypatch.delenv("G2VLM_CPU_FUSED")
        cpu_fused.unavailable_reason.cache_clear()
    assert cpu_fused.available()


def test_build_is_cached_and_a_failed_build_is_reported(tmp_path, monkeypatch):
    """The library is compiled once per machine into the kernel cache (a second build reuses the file); a
    compiler that fails gives a reason naming it instead of an exception at trace time."""
    monkeypatch.setenv("G2VLM_KERNEL_CACHE", str(tmp_path))
    compiler = os.environ.get("CXX") or "g++"
    lib = cpu_fused._build(compiler)
    assert lib.parent == tmp_path and lib.stat().st_size > 0
    mtime = lib.stat().st_mtime_ns
    assert cpu_fused._build(compiler) == lib and lib.stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir()] == [lib.name]  # no temporary file left behind
    monkeypatch.setenv("CXX", "false")
    monkeypatch.setenv("G2VLM_KERNEL_CACHE", str(tmp_path / "other"))
    cpu_fused.unavailable_reason.cache_clear()
    try:
        reason = cpu_fused.unavailable_reason()
        assert reason is not None and "false failed on cpu_fused.cc" in reason
        assert not any((tmp_path / "other").iterdir())
    finally:
        monkeypatch.delenv("CXX")
        monkeypatch.delenv("G2VLM_KERNEL_CACHE")
        cpu_fused.unavailable_reason.cache_clear()
    assert cpu_fused.available()
