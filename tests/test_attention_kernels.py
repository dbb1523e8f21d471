"""Attention kernels agree with the XLA reference (forward and gradients), skip empty tiles, stay memory linear."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_batches import make_batch, random_mask_info, standard_batch

from g2vlm_jax.config import ATTENTION_KERNELS
from g2vlm_jax.model.attention import attention, select_kernel
from g2vlm_jax.model.mask import MaskInfo, build_mask
from g2vlm_jax.model.kernels import cudnn
from g2vlm_jax.model.kernels.blockwise import (_prepare, blockwise_tile_counts, fit_block, full_blocks,
                                                live_blocks)
from g2vlm_jax.model.kernels.tiles import block_fully_allowed, block_may_attend, pad_info, summarize

MODES = [("global", None), ("frame", None), ("block_causal", None), ("mixed", 0), ("mixed", 1)]


def _qkv(length, key_length=None, seed=0, heads=(4, 2), dh=8):
    """Random q, k, v and an output cotangent w (numpy: no per-shape compiles of jax.random)."""
    key_length = key_length or length
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    q = normal(2, length, heads[0], dh)
    return q, normal(2, key_length, heads[1], dh), normal(2, key_length, heads[1], dh), normal(*q.shape)


@functools.lru_cache(maxsize=None)
def _compiled(kernel, mode, block_size):
    """Jitted (q, k, v, w, info, key_info, layer) -> (out, d(sum(out * w))/d(q, k, v)).

    Metadata and layer are traced arguments, as in the model (constants would make XLA fold the mask
    at compile time); cached so that 'mixed' layers 0 and 1 share one compile."""
    def run(q, k, v, w, info, key_info, layer):
        f = lambda *x: attention(*x, info, geo_mode=mode, layer_idx=layer, key_info=key_info, kernel=kernel,
                                 block_size=block_size)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(w)

    return jax.jit(run)


def _out_and_grads(kernel, q, k, v, w, info, mode, layer, key_info=None, block_size=24):
    return _compiled(kernel, mode, block_size)(q, k, v, w, info, key_info, None if layer is None else jnp.int32(layer))


def _assert_close(out, grads, ref_out, ref_grads):
    """Output and dq/dk/dv equal the reference to 1e-5."""
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), atol=1e-5)
    for name, g, r in zip("qkv", grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5, err_msg=f"d{name}")


def test_xla_kernel_gradient_equals_autodiff_of_the_plain_softmax():
    """The dense reference's hand-written backward (flash form, `attention._xla_attention`) against autodiff of
    a softmax written the plain way: GQA 4/2, a random mask, and a row with no allowed key (zeros, no NaN)."""
    from g2vlm_jax.model.attention import _xla_attention

    q, k, v, w = _qkv(40, key_length=48)
    rng = np.random.default_rng(1)
    mask = rng.random((2, 40, 48)) < 0.6
    mask[0, 5] = False  # a padding row
    mask = jnp.asarray(mask)

    def plain(q, k, v):
        kr, vr = jnp.repeat(k, 2, axis=2), jnp.repeat(v, 2, axis=2)  # query head h reads K/V head h // 2
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, kr) / jnp.sqrt(8.0)
        p = jax.nn.softmax(jnp.where(mask[:, None], logits, -jnp.inf), axis=-1, where=mask[:, None])
        p = jnp.where(mask[:, None], p, 0.0)
        return jnp.einsum("bhqk,bkhd->bqhd", p, vr)

    out, vjp = jax.vjp(lambda *x: _xla_attention(*x, mask), q, k, v)
    ref_out, ref_vjp = jax.vjp(plain, q, k, v)
    _assert_close(out, vjp(w), ref_out, ref_vjp(w))
    assert np.abs(np.asarray(vjp(w)[0])[0, 5]).max() == 0.0 and np.abs(np.asarray(out)[0, 5]).max() == 0.0


@pytest.mark.parametrize("mode, layer", MODES)
def test_blockwise_matches_xla_forward_and_gradients(mode, layer):
    """Packed rows (2 documents, padding, text before/after frames, a semantic image), GQA 4/2,
    L = 64 not a multiple of the block (24)."""
    batch = standard_batch(num_rows=2, views=3)
    info = MaskInfo.from_batch(batch)
    q, k, v, w = _qkv(batch.token_ids.shape[1])
    ref_out, ref_grads = _out_and_grads("xla", q, k, v, w, info, mode, layer)
    out, grads = _out_and_grads("blockwise", q, k, v, w, info, mode, layer)
    _assert_close(out, grads, ref_out, ref_grads)
    padding = np.asarray(batch.document_ids) == 0
    assert padding.any() and np.all(np.asarray(out)[padding] == 0.0)
    assert np.all(np.asarray(grads[0])[padding] == 0.0)


@pytest.mark.parametrize("mode, layer", [("global", None), ("frame", None), ("mixed", 1)])
def test_blockwise_full_tiles_match_xla_forward_and_gradients(mode, layer):
    """At 4-slot blocks the standard rows have dead, masked and full tiles (every pair allowed: the forward
    skips the mask there), so all three paths are checked against XLA, forward and gradients."""
    batch = standard_batch(num_rows=2, views=3)
    info = MaskInfo.from_batch(batch)
    q, k, v, w = _qkv(batch.token_ids.shape[1])
    *_, q_pad, k_pad, layer_arr, plan = _prepare(q, k, v, info, info, mode, layer, 4)
    live, full = live_blocks(q_pad, k_pad, plan, layer_arr), full_blocks(q_pad, k_pad, plan, layer_arr)
    assert 0 < int(full.sum()) < int(live.sum()) < live.size  # full, masked and dead tiles all occur
    ref_out, ref_grads = _out_and_grads("xla", q, k, v, w, info, mode, layer)
    out, grads = _out_and_grads("blockwise", q, k, v, w, info, mode, layer, block_size=4)
    _assert_close(out, grads, ref_out, ref_grads)


def test_blockwise_decoding_queries_against_longer_keys():
    """Queries = 5 trailing slots, keys = the whole row (key_info): block 4 pads the queries, 24 the keys."""
    batch = standard_batch(num_rows=2)
    info = MaskInfo.from_batch(batch)
    q_info = info.slice(40, 45)
    q, k, v, w = _qkv(5, key_length=info.length)
    ref = _out_and_grads("xla", q, k, v, w, q_info, "global", None, key_info=info)
    got = _out_and_grads("blockwise", q, k, v, w, q_info, "global", None, key_info=info, block_size=4)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def _sparse_batch():
    """One row, three documents, each a prompt and two 2x2-patch frames: L = 24 semantic + 24 geometry."""
    sample = [("text", 2), ("geo",), ("answer", 2)]
    return make_batch([[sample, sample, sample]], views=2, sample_slots=3, sem_len=24, num_sem_images=0)


@pytest.mark.parametrize("mode", ["global", "frame"])
def test_blockwise_skips_empty_tiles_and_stays_exact(mode):
    batch = _sparse_batch()
    info = MaskInfo.from_batch(batch)
    q, k, v, _ = _qkv(info.length)
    q, k, v = q[:1], k[:1], v[:1]
    counts = jax.jit(lambda *a: blockwise_tile_counts(*a, geo_mode=mode, block_size=8))
    computed, total = (int(n) for n in counts(q, k, v, info, info))
    assert total == 36  # (48 slots / 8) ** 2
    dense = np.asarray(build_mask(info, info, mode))[0].reshape(6, 8, 6, 8).any(axis=(1, 3))
    assert int(computed) < total
    assert int(computed) >= int(dense.sum())  # every non-empty tile is computed
    out = jax.jit(lambda *a: attention(*a, geo_mode=mode, kernel="blockwise", block_size=8))(q, k, v, info)
    ref = attention(q, k, v, info, geo_mode=mode, kernel="xla")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("mode, layer", MODES)
def test_full_tile_bound_is_conservative(mode, layer):
    """A tile the summaries call full has every pair allowed in build_mask: random metadata (2-slot
    blocks, 40 draws) and packed rows of real layouts (4-slot blocks); the bound does fire on both."""
    rng = np.random.default_rng(0)
    cases = [(random_mask_info(rng, 24), random_mask_info(rng, 32), 2) for _ in range(40)]
    packed = MaskInfo.from_batch(standard_batch(num_rows=2, views=3))
    sparse = MaskInfo.from_batch(_sparse_batch())
    cases += [(packed, packed, 4), (sparse, sparse, 4)]
    full_random = full_packed = 0
    for n, (q_info, k_info, block) in enumerate(cases):
        q_info, k_info = pad_info(q_info, -(-q_info.length // block) * block), pad_info(k_info, -(-k_info.length // block) * block)
        mask = np.asarray(build_mask(q_info, k_info, mode, layer))
        b, lq, lk = mask.shape
        every = mask.reshape(b, lq // block, block, lk // block, block).all(axis=(2, 4))
        bound = np.asarray(block_fully_allowed(summarize(q_info, block), summarize(k_info, block), mode, layer))
        assert not np.any(bound & ~every)
        if n < 40:
            full_random += int(bound.sum())
        else:
            full_packed += int(bound.sum())
    assert full_random > 0 and full_packed > 0


@pytest.mark.parametrize("mode, layer", MODES)
def test_tile_skip_bound_is_conservative(mode, layer):
    """A tile the summaries call empty has no allowed pair in build_mask (random metadata, 40 draws)."""
    rng = np.random.default_rng(0)
    skipped = 0
    for _ in range(40):
        q_info, k_info = random_mask_info(rng, 24), random_mask_info(rng, 32)
        exact = np.asarray(build_mask(q_info, k_info, mode, layer))[0].reshape(6, 4, 8, 4).any(axis=(1, 3))
        bound = np.asarray(block_may_attend(summarize(q_info, 4), summarize(k_info, 4), mode, layer))[0]
        assert not np.any(exact & ~bound)
        skipped += int((~bound).sum())
    assert skipped > 0  # the bound does skip


@pytest.mark.parametrize("length, block, want", [(528, 512, 264), (25600, 512, 512), (100, 512, 100), (64, 24, 24),
                                                 (1040, 512, 352)])
def test_fit_block_evens_out_blocks(length, block, want):
    assert fit_block(length, block) == want


def test_padded_metadata_is_never_attended():
    info = pad_info(MaskInfo.from_batch(standard_batch(num_rows=1)), 70)
    mask = np.asarray(build_mask(info, info, "global"))[0]
    assert not mask[64:].any() and not mask[:, 64:].any()


def _temp_bytes(kernel, length):
    z = np.zeros((1, length), np.int32)
    order = np.arange(length, dtype=np.int32)[None]
    info = MaskInfo(seq_order=order, document_ids=z + 1, split_ids=z + 1, split_full=z == 0, geo_frame=z)
    q, k = jnp.zeros((1, length, 2, 16)), jnp.zeros((1, length, 1, 16))

    def loss(q, k, v):
        # Two "layers" in lax.scan with the metadata a loop constant, as in the MoT stack: JAX must
        # not hoist the per-tile masks out of the loop (that would be quadratic).
        def layer(x, _):
            return x + attention(x, k, v, info, geo_mode="global", kernel=kernel, block_size=64), None

        return jnp.sum(jax.lax.scan(layer, q, None, length=2)[0])

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, k).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear_xla_quadratic():
    """Forward + backward temp bytes (inside lax.scan) at 4x the row length: blockwise ~4x (<= 6x), XLA ~16x."""
    block = _temp_bytes("blockwise", 1024) / _temp_bytes("blockwise", 256)
    dense = _temp_bytes("xla", 1024) / _temp_bytes("xla", 256)
    assert block <= 6.0, block
    assert dense >= 12.0, dense


def test_blockwise_bf16_keeps_dtype():
    batch = standard_batch(num_rows=1)
    info = MaskInfo.from_batch(batch)
    q, k, v, _ = _qkv(info.length)
    q, k, v = q[:1], k[:1], v[:1]
    ref = attention(q, k, v, info, geo_mode="global", kernel="xla")
    run = jax.jit(lambda *a: attention(*a, geo_mode="global", kernel="blockwise", block_size=16))
    out = run(*(a.astype(jnp.bfloat16) for a in (q, k, v)), info)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=5e-2)


def test_cudnn_glue_matches_reference_with_xla_implementation():
    """The cuDNN kernel's call (mask layout, GQA, zeroed padding rows) run through jax.nn's XLA path."""
    batch = standard_batch(num_rows=2)
    info = MaskInfo.from_batch(batch)
    q, k, v, _ = _qkv(info.length)
    run = jax.jit(lambda q, k, v, info: cudnn.cudnn_attention(q, k, v, build_mask(info, info, "frame"),
                                                             implementation="xla"))
    out = run(q, k, v, info)
    ref = jax.jit(lambda *a: attention(*a, geo_mode="frame", kernel="xla"))(q, k, v, info)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_kernel_selection_per_backend():
    small = (jnp.zeros((1, 256, 4, 64), jnp.bfloat16), jnp.zeros((1, 256, 2, 64), jnp.bfloat16))
    long = (jnp.zeros((1, 4096, 4, 64), jnp.bfloat16), jnp.zeros((1, 4096, 2, 64), jnp.bfloat16))
    huge = jax.ShapeDtypeStruct((4, 32768, 4, 64), jnp.bfloat16)
    assert select_kernel(*small, backend="cpu") == "xla"
    assert select_kernel(*long, backend="cpu") == "blockwise"
    assert select_kernel(*small, backend="tpu") == "tpu_flash"
    assert select_kernel(*long, backend="gpu") == "cudnn"
    assert select_kernel(huge, huge, backend="gpu") == "blockwise"  # the dense bias would not fit
    fp32 = jnp.zeros((1, 256, 4, 64))
    assert select_kernel(fp32, fp32, backend="gpu") == "blockwise"
    odd_dim = jnp.zeros((1, 256, 4, 20), jnp.bfloat16)
    assert "head_dim" in cudnn.unsupported_reason(odd_dim, odd_dim)


@pytest.mark.parametrize("kwargs, message", [
    (dict(kernel="cudnn"), "bfloat16/float16"),
    (dict(kernel="splash"), "use kernel='tpu_flash'"),
    (dict(kernel="blockwise", block_size=0), "block_size"),
    (dict(kernel="tpu_flash", block_size=0), "block_size"),
])
def test_bad_kernel_requests_raise(kwargs, message):
    info = MaskInfo.from_batch(standard_batch(num_rows=1))
    x = jnp.zeros((1, info.length, 2, 8))
    with pytest.raises(ValueError, match=message):
        attention(x, x, x, info, geo_mode="global", **kwargs)


def test_kernels_are_listed():
    assert set(ATTENTION_KERNELS) == {"auto", "xla", "blockwise", "cpu_fused", "tpu_flash", "cudnn"}

