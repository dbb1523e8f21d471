"""The whole-row kernel of the encoders and Pi3 decoders (`kernels/full_rows.py`): exact against XLA's
dense attention (forward and gradients) in every tiling, tiles within their logit budget, memory linear."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2vlm_jax.model.kernels.full_rows import full_rows_attention, tile_shape


def _qkv(batch, lq, lk, heads=3, dh=16, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.standard_normal(shape, np.float32))
    return normal(batch, lq, heads, dh), normal(batch, lk, heads, dh), normal(batch, lk, heads, dh), \
        normal(batch, lq, heads, dh)


def _out_and_grads(attend, q, k, v, w):
    out, vjp = jax.vjp(attend, q, k, v)
    return out, vjp(w)


# (batch, lq, lk, tile_logits): one tile; query blocks with a padded last block; a cross-attention with
# more queries than keys; batch rows grouped two and three to a tile; one query row over the budget.
CASES = [(2, 40, 40, 1 << 22), (2, 130, 130, 3 * 130 * 24), (2, 300, 70, 3 * 70 * 64),
         (6, 50, 50, 2 * 3 * 50 * 50), (6, 50, 50, 3 * 3 * 50 * 50), (1, 20, 90, 100)]


@pytest.mark.parametrize("batch, lq, lk, tile_logits", CASES)
def test_full_rows_matches_dense_attention_forward_and_gradients(batch, lq, lk, tile_logits):
    q, k, v, w = _qkv(batch, lq, lk)
    got_out, got_grads = jax.jit(lambda *x: _out_and_grads(
        lambda *a: full_rows_attention(*a, tile_logits=tile_logits), *x))(q, k, v, w)
    ref_out, ref_grads = jax.jit(lambda *x: _out_and_grads(jax.nn.dot_product_attention, *x))(q, k, v, w)
    np.testing.assert_allclose(np.asarray(got_out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
    for name, g, r in zip("qkv", got_grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-5, err_msg=f"d{name}")


@pytest.mark.parametrize("batch, lq, lk, heads, tile_logits, want", [
    (8, 1041, 1041, 3, 1 << 22, (1, 1041, 1)),   # DINO, 8 frames of 518x392: a frame a tile
    (8, 1036, 1036, 6, 1 << 22, (1, 520, 2)),    # Pi3 decoders: half a frame a tile (even blocks, x8)
    (8, 252, 252, 6, 1 << 22, (8, 252, 1)),      # 8 frames of 252x196: all in one tile
    (6, 50, 50, 3, 3 * 4 * 50 * 50, (3, 50, 1)),  # 4 rows would fit; the largest divisor of 6 below is 3
    (1, 20, 90, 3, 100, (1, 1, 20)),             # one query row is over the budget: one query a tile
])
def test_tile_shape_keeps_the_budget(batch, lq, lk, heads, tile_logits, want):
    rows, bq, nq = tile_shape(batch, lq, lk, heads, tile_logits)
    assert (rows, bq, nq) == want
    assert batch % rows == 0 and nq * bq >= lq and (nq - 1) * bq < lq
    assert rows * heads * bq * lk <= max(tile_logits, heads * lk)


def test_full_rows_bf16_keeps_dtype():
    q, k, v, _ = _qkv(2, 64, 64)
    out = full_rows_attention(*(x.astype(jnp.bfloat16) for x in (q, k, v)), tile_logits=3 * 64 * 16)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(jax.nn.dot_product_attention(q, k, v)),
                               atol=0.05)


def _temp_bytes(length, tile_logits):
    q, k, v, w = _qkv(1, length, length, heads=2, dh=16)
    loss = lambda q, k, v: jnp.sum(full_rows_attention(q, k, v, tile_logits=tile_logits) * w)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_full_rows_memory_is_bounded_by_the_tile():
    """Forward + backward temporaries at 4x the length with a fixed tile budget grow ~4x (linear: the tiles are
    recomputed in the backward pass, not stored), where dense attention's grow 16x."""
    ratio = _temp_bytes(2048, 1 << 16) / _temp_bytes(512, 1 << 16)
    assert ratio <= 6.0, ratio


def test_full_rows_rejects_mismatched_shapes():
    q, k, v, _ = _qkv(2, 8, 8)
    with pytest.raises(ValueError, match="need k == v shapes"):
        full_rows_attention(q, k[:, :, :2], v[:, :, :2])
