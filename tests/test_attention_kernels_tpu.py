"""The Pallas TPU kernel (`tpu_flash`): exact against the XLA reference, skips dead tiles, compiles for TPUs.

On this CPU-only machine the kernel runs interpreted (the same kernel body, grid, block specs and
scalar prefetch, executed step by step): mostly with Pallas' HLO interpreter, and twice in Pallas'
TPU interpret mode, which also simulates VMEM/SMEM (uninitialised scratch reads NaN, out-of-bounds
reads raise). `libtpu` (the tpu-aot extra) compiles it for real TPU chips ahead of time, which runs
Mosaic's whole lowering and layout checks.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu
from model_batches import make_batch, random_mask_info, standard_batch

from g2vlm_jax.model.attention import attention
from g2vlm_jax.model.mask import MaskInfo, build_mask
from g2vlm_jax.model.kernels import tpu_flash

HERE = pathlib.Path(__file__).resolve().parent
MODES = [("global", None), ("frame", None), ("block_causal", None), ("mixed", 0), ("mixed", 1)]


def _normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape, np.float32))


def _out_and_grads(kernel, q, k, v, w, q_info, mode, layer, key_info=None, block_size=128):
    """(out, d(sum(out * w))/d(q, k, v)) of one kernel, jitted with traced metadata and layer.

    kernel: 'xla' (the reference); 'tpu_flash' (Pallas' HLO interpreter: plain XLA loops over the
    grid, ~5x faster here); 'tpu_flash/tpu_interpret' (Pallas' TPU interpret mode: simulated VMEM and
    SMEM, uninitialised memory filled with NaN, out-of-bounds reads raise)."""
    def run(q, k, v, w, q_info, key_info, layer):
        key = q_info if key_info is None else key_info
        if kernel == "tpu_flash":
            f = lambda *x: tpu_flash.tpu_flash_attention(*x, q_info, key, geo_mode=mode, layer_idx=layer,
                                                         block_size=block_size, interpret=True)
        else:
            f = lambda *x: attention(*x, q_info, geo_mode=mode, layer_idx=layer, key_info=key_info,
                                     kernel=kernel.split("/")[0], block_size=block_size)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(w)

    layer = None if layer is None else jnp.int32(layer)
    if kernel == "tpu_flash/tpu_interpret":
        with pltpu.force_tpu_interpret_mode():
            return jax.jit(run)(q, k, v, w, q_info, key_info, layer)
    return jax.jit(run)(q, k, v, w, q_info, key_info, layer)


def _assert_close(got, ref, atol):
    for name, a, b in zip(("out", "dq", "dk", "dv"), jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=atol, err_msg=name)


@pytest.mark.parametrize("mode, layer", MODES)
def test_tpu_flash_matches_xla_on_random_multi_block_rows(mode, layer):
    """Random metadata, L = 300 (three 128-blocks after padding to 384), GQA 6/2, forward and gradients."""
    rng = np.random.default_rng(1)
    info = jax.tree.map(jnp.asarray, random_mask_info(rng, 300, rows=2))
    q, k, v, w = (_normal(rng, 2, 300, h, 16) for h in (6, 2, 2, 6))
    ref = _out_and_grads("xla", q, k, v, w, info, mode, layer)
    _assert_close(_out_and_grads("tpu_flash", q, k, v, w, info, mode, layer), ref, atol=1e-5)


def test_tpu_flash_on_packed_rows_zeroes_padding():
    """A packed batch (two documents, a semantic image, padding slots) in one block."""
    batch = standard_batch(num_rows=2, views=3)
    info = MaskInfo.from_batch(batch)
    rng = np.random.default_rng(2)
    q, k, v, w = (_normal(rng, 2, info.length, h, 8) for h in (4, 2, 2, 4))
    ref = _out_and_grads("xla", q, k, v, w, info, "global", None)
    got = _out_and_grads("tpu_flash/tpu_interpret", q, k, v, w, info, "global", None)
    _assert_close(got, ref, atol=1e-5)
    padding = np.asarray(batch.document_ids) == 0
    assert padding.any() and np.all(np.asarray(got[0])[padding] == 0) and np.all(np.asarray(got[1][0])[padding] == 0)


def test_tpu_flash_decoding_queries_against_longer_keys():
    """5 new queries against a 260-slot cache (key_info), as in KV-cache decoding."""
    rng = np.random.default_rng(3)
    key_info = jax.tree.map(jnp.asarray, random_mask_info(rng, 260, rows=2))
    q_info = key_info.slice(200, 205)
    q, w = _normal(rng, 2, 5, 4, 16), _normal(rng, 2, 5, 4, 16)
    k, v = _normal(rng, 2, 260, 2, 16), _normal(rng, 2, 260, 2, 16)
    ref = _out_and_grads("xla", q, k, v, w, q_info, "block_causal", None, key_info=key_info)
    _assert_close(_out_and_grads("tpu_flash", q, k, v, w, q_info, "block_causal", None, key_info=key_info),
                  ref, atol=1e-5)


def test_tpu_flash_bfloat16_close_to_fp32_reference():
    rng = np.random.default_rng(4)
    info = jax.tree.map(jnp.asarray, random_mask_info(rng, 256))
    q, k, v = (_normal(rng, 1, 256, h, 128) for h in (2, 1, 1))
    ref = attention(q, k, v, info, geo_mode="global", kernel="xla")
    with pltpu.force_tpu_interpret_mode():
        got = jax.jit(lambda *x: attention(*x, info, geo_mode="global", kernel="tpu_flash"))(
            *(x.astype(jnp.bfloat16) for x in (q, k, v)))
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(ref), atol=3e-2)


@pytest.mark.parametrize("mode", ["global", "frame"])
def test_tpu_flash_exact_on_dead_masked_and_full_tiles(mode):
    """Rows of two samples of 2 frames of 8x16 patches; 128 semantic slots, so each frame fills one
    128-slot block: tiles inside one sample's frames (global) or inside one frame (frame) are FULL
    (no per-pair rule), tiles across samples (and across frames, in frame mode) DEAD, the text
    tiles MASKED; all exact."""
    sample = [("text", 3), ("geo",), ("answer", 2)]
    batch = make_batch([[sample, sample], [sample]], views=2, geo_hw=(112, 224), num_sem_images=0, sem_len=128)
    info = MaskInfo.from_batch(batch)
    plan = tpu_flash._Plan(mode, 128, 128, 4, 2)
    padded = tpu_flash.tiles.pad_info(info, -(-info.length // 128) * 128)
    state = np.asarray(tpu_flash._tables(padded, padded, plan, jnp.int32(0))[0])
    assert {tpu_flash.DEAD, tpu_flash.MASKED, tpu_flash.FULL} <= set(state.ravel().tolist())
    rng = np.random.default_rng(6)
    q, k, v, w = (_normal(rng, 2, info.length, h, 16) for h in (4, 2, 2, 4))
    ref = _out_and_grads("xla", q, k, v, w, info, mode, None)
    kernel = "tpu_flash/tpu_interpret" if mode == "global" else "tpu_flash"
    _assert_close(_out_and_grads(kernel, q, k, v, w, info, mode, None), ref, atol=1e-5)


def test_dead_tiles_are_skipped_and_reuse_the_last_block():
    """Three documents in one row: off-diagonal tiles are dead; their fetch index repeats a live block."""
    length, block = 384, 128
    doc = np.repeat(np.arange(1, 4), block)[None].astype(np.int32)
    info = MaskInfo(seq_order=np.arange(length, dtype=np.int32)[None], document_ids=doc,
                    split_ids=doc, split_full=np.zeros((1, length), bool), geo_frame=np.full((1, length), -1, np.int32))
    plan = tpu_flash._Plan("global", block, block, 2, 1)
    state, fetch_k, fetch_q = (np.asarray(t)[0] for t in tpu_flash._tables(info, info, plan, jnp.int32(0)))
    exact = np.asarray(build_mask(info, info, "global"))[0].reshape(3, block, 3, block).any(axis=(1, 3))
    np.testing.assert_array_equal(state != tpu_flash.DEAD, exact)
    # Causal documents: only the diagonal tiles live, each half masked (never FULL).
    np.testing.assert_array_equal(state, np.eye(3, dtype=np.int32) * tpu_flash.MASKED)
    # Row i fetches key block i for every step (dead steps repeat the live one: no new copy).
    np.testing.assert_array_equal(fetch_k, np.repeat(np.arange(3)[:, None], 3, axis=1))
    np.testing.assert_array_equal(fetch_q, np.repeat(np.arange(3)[:, None], 3, axis=1))


def test_fetch_index_repeats_the_last_live_step():
    live = jnp.array([[0, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]], bool)
    np.testing.assert_array_equal(np.asarray(tpu_flash._fetch_index(live)),
                                  [[1, 1, 1, 1, 4, 4], [0, 0, 0, 0, 0, 0], [0, 0, 0, 0, 0, 5]])


def test_blocks_are_multiples_of_the_lane_width():
    assert tpu_flash.fit_block(64, 512) == 128
    assert tpu_flash.fit_block(528, 512) == 384  # 2 blocks of 384 (not 2 x 512)
    assert tpu_flash.fit_block(25600, 512) == 512
    assert tpu_flash.fit_block(300, 128) == 128


# ---- sharded (shard_map) on 4 fake CPU devices, in a subprocess ----------------------------------
def _sharded_worker() -> dict:
    """fsdp_tp mesh (data 1, fsdp 2, tensor 2): batch over fsdp, heads over tensor, vs one device.

    Pallas' HLO interpreter (`interpret=True`): the TPU interpret mode cannot run under shard_map.
    The reference runs on a 1-device mesh; without a bound mesh the kernel refuses a 4-device host."""
    from g2vlm_jax import sharding as sh
    from g2vlm_jax.config import MeshConfig

    rng = np.random.default_rng(5)
    info = jax.tree.map(jnp.asarray, random_mask_info(rng, 200, rows=2))
    q, k, v, w = (_normal(rng, 2, 200, h, 16) for h in (4, 2, 2, 4))

    def out_and_grads(q, k, v, w):
        f = lambda *x: tpu_flash.tpu_flash_attention(*x, info, info, geo_mode="global", interpret=True)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(w)

    with pytest.raises(RuntimeError, match="outside a sharded program on a host with 4 devices"):
        jax.jit(out_and_grads)(q, k, v, w)
    one = sh.make_mesh(MeshConfig(preset="dp", data=1, fsdp=1, tensor=1), jax.devices()[:1])
    ref = sh.jit_sharded(out_and_grads, one, "dp")(q, k, v, w)
    mesh = sh.make_mesh(MeshConfig(preset="fsdp_tp", data=1, fsdp=2, tensor=2))
    got = sh.jit_sharded(out_and_grads, mesh, "fsdp_tp")(q, k, v, w)
    xla = attention(q, k, v, info, geo_mode="global", kernel="xla")
    got_host, ref_host = jax.device_get(got), jax.device_get(ref)  # on 4 devices and on device 0
    return {"max_abs_diff": max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(got_host),
                                                                             jax.tree.leaves(ref_host))),
            "xla_abs_diff": float(np.max(np.abs(ref_host[0] - np.asarray(xla)))),
            "out_sharding": str(got[0].sharding.spec), "devices": len(jax.devices())}


def test_tpu_flash_under_shard_map_equals_one_device():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, __file__, "--sharded-worker"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 4
    assert "fsdp" in r["out_sharding"] and "tensor" in r["out_sharding"]
    assert r["max_abs_diff"] < 1e-5 and r["xla_abs_diff"] < 1e-5


# ---- compiled for real TPU chips (libtpu, no TPU needed) -----------------------------------------
def _tpu_devices(topology: str):
    from g2vlm_jax import aot

    try:
        return aot.slice_devices(topology)
    except RuntimeError as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("shape, mode", [((1, 2048, 12, 2, 128), "global"), ((2, 384, 4, 2, 16), "mixed")],
                         ids=["2b_heads_global", "tiny_heads_mixed"])
def test_tpu_flash_compiles_for_tpu(shape, mode):
    """Forward + backward through Mosaic for a v5p chip: the 2B head layout and the tiny one."""
    b, length, hq, hkv, dh = shape
    devices = _tpu_devices("v5p:2x2x1")
    mesh = jax.sharding.Mesh(np.array(devices[:1]), ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda s, dt: jax.ShapeDtypeStruct(s, dt, sharding=replicated)
    ints = lambda: spec((b, length), jnp.int32)
    info = MaskInfo(seq_order=ints(), document_ids=ints(), split_ids=ints(), split_full=spec((b, length), jnp.bool_),
                    geo_frame=ints())

    def fwd_bwd(q, k, v, info, layer):
        f = lambda *x: attention(*x, info, geo_mode=mode, layer_idx=layer, kernel="tpu_flash")
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(out)

    compiled = jax.jit(fwd_bwd).lower(spec((b, length, hq, dh), jnp.bfloat16), spec((b, length, hkv, dh), jnp.bfloat16),
                                      spec((b, length, hkv, dh), jnp.bfloat16), info, spec((), jnp.int32)).compile()
    text = compiled.as_text()
    for kernel in ("g2vlm_tpu_flash_fwd", "g2vlm_tpu_flash_dq", "g2vlm_tpu_flash_dkv"):
        assert kernel in text, kernel
    # Memory linear in L: nothing of size L x L (2048^2 fp32 = 16 MiB per head) is materialised.
    assert compiled.memory_analysis().temp_size_in_bytes < 64 * 2 ** 20


if __name__ == "__main__" and "--sharded-worker" in sys.argv:
    print(json.dumps(_sharded_worker()))
