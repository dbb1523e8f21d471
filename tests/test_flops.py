"""Analytic FLOP counts against XLA's own counts, exact allowed-pair counts, device peaks and MFU."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_batches import standard_batch

from g2vlm_jax import flops
from g2vlm_jax.config import TextConfig, tiny_model
from g2vlm_jax.model.mask import MaskInfo, build_mask
from g2vlm_jax.model.mot import MoTLayer

TEXT = TextConfig(vocab_size=512, hidden_size=256, num_layers=1, num_heads=4, num_kv_heads=2, head_dim=64,
                  mlp_hidden=1024, mrope_sections=(8, 12, 12))


def _xla_flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_dense_mot_layer_matches_xla_cost_analysis():
    """One MoT layer, every pair allowed (the XLA kernel computes all pairs anyway): forward within 3 %,
    forward + backward (the 3x convention) within 3 %."""
    cfg = tiny_model(text=TEXT, attention_kernel="xla")
    graph, state = nnx.split(MoTLayer(cfg, rngs=nnx.Rngs(0)))
    b, lu, lg = 2, 32, 96
    length = lu + lg
    ones = np.ones((b, length), np.int32)
    info = MaskInfo(seq_order=np.tile(np.arange(length, dtype=np.int32), (b, 1)), document_ids=ones, split_ids=ones,
                    split_full=ones.astype(bool), geo_frame=-ones)
    xu, xg, cos = jnp.ones((b, lu, 256)), jnp.ones((b, lg, 256)), jnp.ones((b, length, 64))

    def forward(state, xu, xg):
        return nnx.merge(graph, state)(xu, xg, cos, cos, info)

    def loss(state, xu, xg):
        hu, hg = forward(state, xu, xg)
        return jnp.sum(hu) + jnp.sum(hg)

    analytic = b * length * flops.expert_token_flops(TEXT) + b * length * length * flops.attention_pair_flops(TEXT)
    assert _xla_flops(forward, state, xu, xg) == pytest.approx(analytic, rel=0.03)
    assert _xla_flops(jax.grad(loss, argnums=(0, 1, 2)), state, xu, xg) == pytest.approx(3 * analytic, rel=0.03)


def test_encoder_block_formula_matches_xla():
    """The pre-LN encoder block term used for ViT, DINO and the head decoders (qkv, proj, MLP, attention)."""
    tokens, width, mlp, heads = 96, 128, 512, 4
    rng = np.random.default_rng(0)
    w = {name: jnp.asarray(rng.standard_normal(shape, np.float32)) for name, shape in
         (("qkv", (width, 3 * width)), ("proj", (width, width)), ("fc1", (width, mlp)), ("fc2", (mlp, width)))}

    def block(w, x):
        q, k, v = jnp.split(jax.nn.standardize(x) @ w["qkv"], 3, axis=-1)
        split = lambda a: a.reshape(tokens, heads, width // heads)
        p = jax.nn.softmax(jnp.einsum("qhd,khd->hqk", split(q), split(k)), axis=-1)
        x = x + jnp.einsum("hqk,khd->qhd", p, split(v)).reshape(tokens, width) @ w["proj"]
        return x + jax.nn.gelu(jax.nn.standardize(x) @ w["fc1"]) @ w["fc2"]

    got = _xla_flops(block, w, jnp.ones((tokens, width)))
    assert got == pytest.approx(flops._encoder_block_flops(tokens, width, mlp), rel=0.03)


MODES = [("global", None), ("frame", None), ("block_causal", None), ("mixed", 0), ("mixed", 1)]


@pytest.mark.parametrize("mode, layer", MODES)
def test_pair_counts_are_exact(mode, layer):
    """The representative-token count equals summing build_mask over the whole row, per query expert."""
    batch = standard_batch(num_rows=2, views=3)
    info, lu = MaskInfo.from_batch(batch), batch.num_sem_tokens
    mask = np.asarray(build_mask(info, info, mode, layer))
    want = (int(mask[:, :lu].sum()), int(mask[:, lu:].sum()))
    assert all(flops._pairs_by_groups(flops._row(info, r), lu, mode, layer) is not None for r in range(2))
    assert flops.count_allowed_pairs(info, lu, mode, layer) == want
    assert want[0] > 0 and want[1] > 0


def test_pair_counts_fall_back_on_rows_outside_the_layout():
    """A row whose text split is not contiguous in reading order takes the dense path, still exact."""
    batch = standard_batch(num_rows=1, views=2)
    info, lu = MaskInfo.from_batch(batch), batch.num_sem_tokens
    order = np.asarray(info.seq_order).copy()
    order[0, [0, 5]] = order[0, [5, 0]]  # swap a prefix-text token with a frame marker
    info = dataclasses.replace(info, seq_order=order)
    assert flops._pairs_by_groups(flops._row(info, 0), lu, "global", None) is None
    mask = np.asarray(build_mask(info, info, "global"))
    assert flops.count_allowed_pairs(info, lu, "global") == (int(mask[:, :lu].sum()), int(mask[:, lu:].sum()))


def test_step_flops_parts_and_freezing():
    batch = standard_batch(num_rows=2, views=3)
    cfg = tiny_model(geo_attention="frame")
    got = flops.step_flops(cfg, batch)
    t = cfg.text
    frames = int(np.asarray(batch.sample_valid).sum()) * 3
    assert got.forward["dino"] == frames * flops.dino_frame_flops(cfg.dino, (28, 28))
    assert got.forward["lm_head"] == float(np.asarray(batch.loss_mask).sum()) * 2 * t.hidden_size * t.vocab_size
    sem, geo = flops.count_allowed_pairs(MaskInfo.from_batch(batch), batch.num_sem_tokens, "frame")
    assert got.forward["attention_geometry_queries"] == geo * t.num_layers * flops.attention_pair_flops(t)
    assert got.forward["attention_semantic_queries"] == sem * t.num_layers * flops.attention_pair_flops(t)
    assert got.train_total == pytest.approx(got.forward_total * 3 - 2 * (got.forward["vit"] + got.forward["dino"]))
    frozen = flops.step_flops(dataclasses.replace(cfg, freeze_und=True, freeze_recon=True), batch)
    assert frozen.train_total == pytest.approx(frozen.forward_total)
    assert flops.step_flops(dataclasses.replace(cfg, use_vit=False), batch).forward["vit"] == 0.0


def test_mixed_mode_counts_both_parities():
    batch = standard_batch(num_rows=1, views=3)
    counts = {}
    for mode in ("mixed", "frame", "global"):
        counts[mode] = flops.step_flops(tiny_model(geo_attention=mode), batch).forward["attention_geometry_queries"]
    assert counts["mixed"] == pytest.approx((counts["frame"] + counts["global"]) / 2)  # 2 layers: one of each
    assert counts["frame"] < counts["global"]


def test_heads_flops_from_an_explicit_matmul_list():
    """`heads_frame_flops` re-derived from SPEC 1.5's list of matmuls for one 28x28 frame (n = 4)."""
    cfg = tiny_model()
    d, n, h = cfg.text.hidden_size, 4, cfg.heads
    f = 4 * d
    block = [(n, d, 3 * d), (n, d, d), (n, d, f), (n, f, d), ("attn", n, n, d)]
    cross = [(n, d, d), (n, d, d), (n, d, d), (n, d, d), ("attn", n, n, d)]
    matmuls = 3 * h.decoder_layers * block + h.decoder_layers * cross
    matmuls += [(n, d, h.point_dim), (n, d, h.camera_dim), (n, d, h.point_dim)]  # linear_out of the 3 decoders
    matmuls += [(n, h.point_dim, 3 * 196), (n, h.point_dim, 3 * 196)]  # local and global point heads
    c = h.camera_dim
    matmuls += 6 * [(n, c, c)] + [(1, c, c), (1, c, c), (1, c, 3), (1, c, 9)]  # camera head
    total = sum(2 * m[1] * m[2] * m[3] * 2 if m[0] == "attn" else 2 * m[0] * m[1] * m[2] for m in matmuls)
    assert flops.heads_frame_flops(cfg, (28, 28)) == total


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12), ("TPU v6 lite", 918e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("NVIDIA A100-SXM4-40GB", 312e12),
])
def test_peak_table(kind, peak):
    assert flops.peak_flops(kind) == peak


def test_mfu_and_its_errors():
    assert flops.mfu(2e12, 2.0, 4, 1e12) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="cpu"):
        flops.peak_flops("cpu")
    with pytest.raises(ValueError, match="step_seconds"):
        flops.mfu(1.0, 0.0, 1, 1e12)
    assert flops.measure_matmul_flops(size=64, repeats=1) > 0


@pytest.mark.parametrize("mode", ["global", "frame", "block_causal", "mixed"])
def test_step_flops_run_on_the_host(mode):
    """The loop counts every step's FLOPs while the device runs the step: no device dispatch (a host ->
    device transfer would raise under the guard), and the numpy mask equals the jnp one."""
    batch = jax.tree.map(np.asarray, standard_batch(num_rows=2, views=3))
    info = MaskInfo.from_batch(batch)
    with jax.transfer_guard("disallow"):
        flops.step_flops(tiny_model(geo_attention=mode), batch)
        host = build_mask(info, info, mode, 1, xp=np)
    assert isinstance(host, np.ndarray)
    np.testing.assert_array_equal(host, np.asarray(build_mask(info, info, mode, 1)))
