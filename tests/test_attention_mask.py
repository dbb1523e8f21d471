"""The packed-row attention mask (worked examples per geo_attention mode) and the attention entry point."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_batches import standard_batch

from g2vlm_jax.batch import PAD_ORDER
from g2vlm_jax.model import mask as mask_lib
from g2vlm_jax.model.attention import attention
from g2vlm_jax.model.mask import MaskInfo, build_mask

# The docstring's example row, in reading order: text prefix, geometry frames 0 and 1 with their
# start/end markers, trailing text, a second document, padding.
NAMES = "t0 s0 g0 e0 s1 g1 e1 t1 u0 pd".split()
DOC = [1, 1, 1, 1, 1, 1, 1, 1, 2, 0]
SPLIT = [1, 2, 2, 2, 3, 3, 3, 4, 5, 0]
FULL = [0, 1, 1, 1, 1, 1, 1, 0, 0, 0]
FRAME = [-1, 0, 0, 0, 1, 1, 1, -1, -1, -1]
# Stored expert-grouped like a real row: semantic slots first, the geometry tokens g0, g1 last.
SLOT_ORDER = [NAMES.index(n) for n in "t0 s0 e0 s1 e1 t1 u0 pd g0 g1".split()]

EXPECTED = {  # rows = queries, columns = keys, reading order (hand-derived from SPEC 1.4)
    "global": """
        1 . . . . . . . . .
        1 1 1 1 1 1 1 . . .
        1 1 1 1 1 1 1 . . .
        1 1 1 1 1 1 1 . . .
        1 1 1 1 1 1 1 . . .
        1 1 1 1 1 1 1 . . .
        1 1 1 1 1 1 1 . . .
        1 1 1 1 1 1 1 1 . .
        . . . . . . . . 1 .
        . . . . . . . . . .""",
    "frame": """
        1 . . . . . . . . .
        1 1 1 1 . . . . . .
        1 1 1 1 . . . . . .
        1 1 1 1 . . . . . .
        1 . . . 1 1 1 . . .
        1 . . . 1 1 1 . . .
        1 . . . 1 1 1 . . .
        1 1 1 1 1 1 1 1 . .
        . . . . . . . . 1 .
        . . . . . . . . . .""",
    "block_causal": """
        1 . . . . . . . . .
        1 1 1 1 . . . . . .
        1 1 1 1 . . . . . .
        1 1 1 1 . . . . . .
        1 1 1 1 1 1 1 . . .
        1 1 1 1 1 1 1 . . .
        1 1 1 1 1 1 1 . . .
        1 1 1 1 1 1 1 1 . .
        . . . . . . . . 1 .
        . . . . . . . . . .""",
}


def _table(text: str) -> np.ndarray:
    return np.array([[c == "1" for c in line.split()] for line in text.strip().splitlines()])


def _example_info() -> MaskInfo:
    order = [i if DOC[i] else PAD_ORDER for i in range(len(NAMES))]
    cols = lambda a: np.asarray(a)[SLOT_ORDER][None]
    return MaskInfo(seq_order=cols(order).astype(np.int32), document_ids=cols(DOC).astype(np.int32),
                    split_ids=cols(SPLIT).astype(np.int32), split_full=cols(FULL).astype(bool),
                    geo_frame=cols(FRAME).astype(np.int32))


def _reading_order(mask_slots: np.ndarray) -> np.ndarray:
    """[Ls, Ls] mask over storage slots -> [L, L] in reading order."""
    out = np.zeros_like(mask_slots)
    out[np.ix_(SLOT_ORDER, SLOT_ORDER)] = mask_slots
    return out


def _docstring_tables() -> dict[str, np.ndarray]:
    """Parses the three side-by-side tables of the mask module docstring (model/mask.py)."""
    lines = mask_lib.__doc__.splitlines()
    head = next(i for i, l in enumerate(lines) if l.split()[:3] == ["global", "frame", "block_causal"])
    rows = [lines[head + 2 + r].split() for r in range(len(NAMES))]
    assert [r[0] for r in rows] == NAMES and all(len(r) == 1 + 3 * len(NAMES) for r in rows)
    n = len(NAMES)
    return {mode: np.array([[c == "1" for c in r[1 + m * n: 1 + (m + 1) * n]] for r in rows])
            for m, mode in enumerate(("global", "frame", "block_causal"))}


@pytest.mark.parametrize("mode", ["global", "frame", "block_causal"])
def test_worked_example(mode):
    info = _example_info()
    got = _reading_order(np.asarray(build_mask(info, info, mode))[0])
    np.testing.assert_array_equal(got, _table(EXPECTED[mode]), err_msg=f"mode {mode}")
    np.testing.assert_array_equal(_docstring_tables()[mode], _table(EXPECTED[mode]), err_msg="docstring table")


def test_mixed_alternates_by_layer_python_and_traced():
    info = _example_info()
    traced = jax.jit(lambda i: build_mask(info, info, "mixed", layer_idx=i))
    for layer in range(4):
        want = _table(EXPECTED["global" if layer % 2 else "frame"])
        np.testing.assert_array_equal(_reading_order(np.asarray(build_mask(info, info, "mixed", layer))[0]), want)
        np.testing.assert_array_equal(_reading_order(np.asarray(traced(jnp.int32(layer)))[0]), want)


def _rule(meta, q, k, mode) -> bool:
    """SPEC 1.4 for one (query, key) pair, written independently of build_mask."""
    doc, order, split, full, frame = meta
    if doc[q] == 0 or doc[q] != doc[k]:
        return False
    gq, gk = frame[q], frame[k]
    if mode == "frame" and gq >= 0 and gk >= 0:
        return gq == gk  # a geometry-frame query sees its own frame only
    if mode == "global" and gq >= 0 and gk >= 0:
        return True
    if mode == "block_causal" and 0 <= gk <= gq:
        return True
    return order[k] <= order[q] or (split[k] == split[q] and full[q])


@pytest.mark.parametrize("mode", ["global", "frame", "block_causal"])
def test_mask_matches_pairwise_rule_on_packed_rows(mode):
    batch = standard_batch(num_rows=2, views=3)
    info = MaskInfo.from_batch(batch)
    got = np.asarray(build_mask(info, info, mode))
    for b in range(2):
        meta = [np.asarray(a)[b] for a in (batch.document_ids, batch.seq_order, batch.split_ids, batch.split_full,
                                           batch.geo_frame)]
        length = len(meta[0])
        want = np.array([[_rule(meta, q, k, mode) for k in range(length)] for q in range(length)])
        np.testing.assert_array_equal(got[b], want)


def test_key_side_metadata_for_decoding():
    """Queries = the last 3 tokens, keys = the whole row: the mask is the matching block of the full mask."""
    batch = standard_batch(num_rows=1)
    info = MaskInfo.from_batch(batch)
    full = np.asarray(build_mask(info, info, "global"))
    part = np.asarray(build_mask(info.slice(17, 20), info, "global"))
    np.testing.assert_array_equal(part, full[:, 17:20])


def _reference_attention(q, k, v, mask):
    """Repeat K/V heads, -inf masking, softmax; rows without keys -> 0."""
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    logits = np.where(mask[:, None], logits, -np.inf)
    with np.errstate(invalid="ignore"):
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p = p / p.sum(-1, keepdims=True)
    p = np.nan_to_num(p)
    return np.einsum("bhqk,bkhd->bqhd", p, v)


def test_attention_matches_reference_and_padding_rows_are_zero():
    batch = standard_batch(num_rows=2)
    info = MaskInfo.from_batch(batch)
    l = batch.token_ids.shape[1]
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (2, l, 4, 8))
    k = jax.random.normal(kk, (2, l, 2, 8))
    v = jax.random.normal(kv, (2, l, 2, 8))
    out = np.asarray(attention(q, k, v, info, geo_mode="global", kernel="xla"))
    mask = np.asarray(build_mask(info, info, "global"))
    np.testing.assert_allclose(out, _reference_attention(*map(np.asarray, (q, k, v)), mask), atol=2e-6)
    padding = np.asarray(batch.document_ids) == 0
    assert padding.any()
    assert np.all(out[padding] == 0.0)
    grads = jax.grad(lambda *a: jnp.sum(attention(*a, info, geo_mode="global") ** 2), argnums=(0, 1, 2))(q, k, v)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)
    assert np.all(np.asarray(grads[0])[padding] == 0.0)


def test_bf16_inputs_keep_dtype_and_stay_close():
    batch = standard_batch(num_rows=1)
    info = MaskInfo.from_batch(batch)
    l = batch.token_ids.shape[1]
    q, k, v = (jax.random.normal(key, (1, l, 2, 8)) for key in jax.random.split(jax.random.key(1), 3))
    ref = attention(q, k, v, info, geo_mode="frame")
    out = attention(*(a.astype(jnp.bfloat16) for a in (q, k, v)), info, geo_mode="frame")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref), atol=5e-2)


@pytest.mark.parametrize("kwargs, message", [
    (dict(geo_mode="diagonal"), "geo_attention mode"),
    (dict(geo_mode="mixed"), "layer_idx"),
    (dict(geo_mode="global", kernel="flash9"), "attention kernel"),
])
def test_bad_options_raise(kwargs, message):
    info = _example_info()
    x = jnp.zeros((1, 10, 2, 4))
    with pytest.raises(ValueError, match=message):
        attention(x, x, x, info, **kwargs)


def test_bad_shapes_raise():
    info = _example_info()
    with pytest.raises(ValueError, match="GQA"):
        attention(jnp.zeros((1, 10, 3, 4)), jnp.zeros((1, 10, 2, 4)), jnp.zeros((1, 10, 2, 4)), info, geo_mode="global")
    with pytest.raises(ValueError, match="metadata lengths"):
        x = jnp.zeros((1, 9, 2, 4))
        attention(x, x, x, info, geo_mode="global")


def test_every_mode_differs_on_the_example():
    info = _example_info()
    masks = {m: np.asarray(build_mask(info, info, m)) for m in ("global", "frame", "block_causal")}
    for a, b in itertools.combinations(masks, 2):
        assert not np.array_equal(masks[a], masks[b]), (a, b)
