"""Pi3 decoders and heads: golden vs the official torch modules, rotations, pixel shuffle, frame isolation.

tests/golden/encoders/heads_golden.npz comes from the official Pi3TransformerDecoder /
Pi3ContextTransformerDecoder / Pi3LinearPts3d / Pi3CameraHead with random weights, wired as
G2VLM's forward wires them (D = 32, 2 heads, 2 layers, point/camera dim 32, grid 2x3, B = V = 2).
"""
import json
import pathlib

import jax
import jax.numpy as jnp

from g2vlm_jax import geometry
import numpy as np
import pytest
from flax import nnx

import g2vlm_jax  # noqa: F401  (package-level flax settings)
from g2vlm_jax.config import HeadsConfig, ModelConfig, TextConfig, tiny_model
from g2vlm_jax.model import encoder_layers, heads

GOLDEN = pathlib.Path(__file__).parent / "golden" / "encoders"


def _golden_config(**heads_overrides):
    text = TextConfig(vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16,
                      mlp_hidden=64, mrope_sections=(2, 3, 3))
    return tiny_model(text=text, heads=HeadsConfig(decoder_layers=2, decoder_heads=2, point_dim=32, camera_dim=32,
                                                   **heads_overrides))


@nnx.jit(static_argnames=("grid", "with_global"))
def _run(module, tokens, grid, with_global=True):
    return module(tokens, grid, with_global=with_global)


@pytest.fixture(scope="module")
def golden_heads():
    g = np.load(GOLDEN / "heads_golden.npz")
    weights = {k[2:]: g[k] for k in g.files if k.startswith("w:")}
    # Built abstractly (no random init): every parameter comes from the official weights.
    model = nnx.eval_shape(lambda: heads.GeometryHeads(_golden_config(), rngs=nnx.Rngs(0)))
    consumed = heads.load_official_weights(model, weights)
    assert sorted(consumed) == sorted(weights)
    return model, g


def test_heads_match_official_golden(golden_heads):
    model, g = golden_heads
    out = _run(model, jnp.asarray(g["tokens"]), (2, 3))
    assert set(out) == {"local_points", "camera_poses", "world_points", "global_points"}
    for name in out:
        ref = g[f"out:{name}"]
        assert out[name].shape == ref.shape and out[name].dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(out[name]), ref, rtol=1e-4, atol=1e-4, err_msg=name)


def test_heads_shapes_tiny_config_and_options():
    cfg = tiny_model(heads=HeadsConfig(decoder_layers=2, decoder_heads=4, point_dim=32, camera_dim=32,
                                       confidence=True))
    model = nnx.eval_shape(lambda: heads.GeometryHeads(cfg, rngs=nnx.Rngs(0)))
    tokens = jax.ShapeDtypeStruct((1, 3, 2 * 2, cfg.text.hidden_size), jnp.float32)
    out = nnx.eval_shape(lambda m, t: m(t, (2, 2), with_global=False), model, tokens)
    assert {k: v.shape for k, v in out.items()} == {
        "local_points": (1, 3, 28, 28, 3), "world_points": (1, 3, 28, 28, 3), "camera_poses": (1, 3, 4, 4),
        "confidence": (1, 3, 28, 28)}
    assert all(v.dtype == jnp.float32 for v in out.values())
    with pytest.raises(ValueError, match="h\\*w=6"):
        model(jnp.zeros((1, 3, 4, cfg.text.hidden_size)), (2, 3))
    with pytest.raises(ValueError, match="D=64"):
        model(jnp.zeros((1, 3, 4, 32)), (2, 2))


def test_world_points_are_c2w_times_local(golden_heads):
    model, g = golden_heads
    out = _run(model, jnp.asarray(g["tokens"]), (2, 3))
    pose, local = np.asarray(out["camera_poses"], np.float64), np.asarray(out["local_points"], np.float64)
    world = np.einsum("bvij,bvhwj->bvhwi", pose[..., :3, :3], local) + pose[:, :, None, None, :3, 3]
    np.testing.assert_allclose(np.asarray(out["world_points"]), world, rtol=1e-5, atol=1e-4)
    bottom = np.asarray(out["camera_poses"][..., 3, :])
    np.testing.assert_array_equal(bottom, np.broadcast_to([0, 0, 0, 1.0], (2, 2, 4)))


def test_frames_and_samples_do_not_mix(golden_heads):
    """Per-frame decoders; the global decoder sees its own frame and frame 0 of its own sample only."""
    model, g = golden_heads
    tokens = np.array(g["tokens"])
    a = _run(model, jnp.asarray(tokens), (2, 3))
    changed = tokens.copy()
    changed[0, 1] += np.random.default_rng(1).normal(size=changed[0, 1].shape)  # sample 0, frame 1
    b = _run(model, jnp.asarray(changed), (2, 3))
    for name in ("local_points", "camera_poses", "global_points"):
        np.testing.assert_array_equal(np.asarray(a[name][0, 0]), np.asarray(b[name][0, 0]), err_msg=name)
        np.testing.assert_array_equal(np.asarray(a[name][1]), np.asarray(b[name][1]), err_msg=name)
        assert np.abs(np.asarray(a[name][0, 1] - b[name][0, 1])).max() > 1e-5, name
    changed = tokens.copy()
    # Frame 0 is the global decoder's context for every frame of sample 0.
    changed[0, 0] += np.random.default_rng(2).normal(size=changed[0, 0].shape)
    c = _run(model, jnp.asarray(changed), (2, 3))
    np.testing.assert_array_equal(np.asarray(a["local_points"][0, 1]), np.asarray(c["local_points"][0, 1]))
    assert np.abs(np.asarray(a["global_points"][0, 1] - c["global_points"][0, 1])).max() > 1e-5


def _assert_proper(rot, tol=1e-5):
    rot = np.asarray(rot, np.float64)
    eye = np.broadcast_to(np.eye(3), rot.shape)
    np.testing.assert_allclose(np.swapaxes(rot, -1, -2) @ rot, eye, atol=tol)
    np.testing.assert_allclose(np.linalg.det(rot), 1.0, atol=tol)


def test_rotation_from_9d_is_always_proper():
    rng = np.random.default_rng(0)
    m = rng.normal(size=(4000, 9)) * rng.choice([1e-3, 1.0, 1e3], size=(4000, 1))
    special = np.array([np.zeros(9), np.eye(3).ravel(), -np.eye(3).ravel(), np.diag([1.0, 1.0, -1.0]).ravel(),
                        np.ones(9), [1.0, 0, 0, 1.0, 0, 0, 0, 0, 1.0], [0, 0, 0, 0, 0, 0, 0, 0, 1.0]])
    rot = geometry.rotation_from_9d(jnp.asarray(np.concatenate([m, special]), jnp.float32))
    _assert_proper(rot)
    # A rotation maps to itself; a reflection-free orthogonal input is kept.
    q, _ = np.linalg.qr(rng.normal(size=(16, 3, 3)))
    q = q * np.sign(np.linalg.det(q))[:, None, None]
    np.testing.assert_allclose(np.asarray(geometry.rotation_from_9d(jnp.asarray(q.reshape(16, 9), jnp.float32))), q,
                               atol=1e-5)


@pytest.mark.parametrize("seed", range(5))
def test_camera_head_returns_proper_rotations(seed):
    head = heads.CameraHead(8, rngs=nnx.Rngs(seed))
    feats = jnp.asarray(np.random.default_rng(seed).normal(size=(64, 6, 8)) * 10 ** (seed - 2), jnp.float32)
    poses = np.asarray(head(feats))
    _assert_proper(poses[:, :3, :3])
    np.testing.assert_array_equal(poses[:, 3], np.broadcast_to([0, 0, 0, 1.0], (64, 4)))


def test_pixel_shuffle_layout():
    h, w, c, p = 2, 3, 3, 14
    for y, x, ch, dy, dx in [(0, 0, 0, 0, 0), (1, 2, 2, 13, 5), (0, 1, 1, 7, 13), (1, 0, 2, 0, 9)]:
        feat = np.zeros((1, h * w, c * p * p), np.float32)
        feat[0, y * w + x, ch * p * p + dy * p + dx] = 1.0
        out = np.asarray(heads.pixel_shuffle(jnp.asarray(feat), h, w, c, p))
        assert out.shape == (1, h * p, w * p, c)
        assert out[0, y * p + dy, x * p + dx, ch] == 1.0 and out.sum() == 1.0


def test_linear_pts3d_projects_then_shuffles():
    """Official weight row c*196 + dy*14 + dx of point_head.proj writes pixel (y*14+dy, x*14+dx), channel c."""
    head = heads.LinearPts3d(4, 3, 14, rngs=nnx.Rngs(0))
    weight = np.zeros((3 * 196, 4), np.float32)  # torch layout [out, in]
    weight[2 * 196 + 5 * 14 + 11, 3] = 2.0
    encoder_layers.load_official(head, {"proj.weight": weight, "proj.bias": np.zeros(3 * 196, np.float32)})
    tokens = np.zeros((1, 2 * 2, 4), np.float32)
    tokens[0, 1 * 2 + 0, 3] = 1.5  # token (y=1, x=0)
    out = np.asarray(head(jnp.asarray(tokens), 2, 2))
    assert out[0, 14 + 5, 0 + 11, 2] == 3.0 and np.count_nonzero(out) == 1


def test_heads_2b_parameters_match_official():
    cfg = ModelConfig()
    model = nnx.eval_shape(lambda: heads.GeometryHeads(cfg, rngs=nnx.Rngs(0)))
    count = sum(int(np.prod(v.get_value().shape)) for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param)))
    dino2llm = 1024 * 1536 + 1536
    assert count == 479_467_684
    assert abs(count - (0.481e9 - dino2llm)) / (0.481e9 - dino2llm) < 0.005
    table = json.loads((GOLDEN / "encoders_official_shapes_2b.json").read_text())
    official = {k: tuple(v) for k, v in table.items() if not k.startswith(("vit_model.", "dino_model."))}
    ours = encoder_layers.official_param_map(model)
    assert set(ours) == set(official)
    for key, (path, var) in ours.items():
        assert var.get_value().shape == encoder_layers.official_shape(path, var.get_value().shape, official[key]), key
        names = var.get_metadata()["out_sharding"]
        assert len(names) == len(var.get_value().shape) and set(names) <= {None, "enc_embed", "enc_heads", "enc_mlp"}


@nnx.jit
def _outputs_and_token_grad(model, tokens):
    def loss(t):
        out = model(t, (2, 3))
        return out["world_points"].sum(), out
    return jax.grad(loss, has_aux=True)(tokens)


def test_heads_bfloat16_decoders_keep_fp32_outputs(golden_heads):
    _, g = golden_heads
    weights = {k[2:]: g[k] for k in g.files if k.startswith("w:")}
    model = nnx.eval_shape(lambda: heads.GeometryHeads(_golden_config(), rngs=nnx.Rngs(0), dtype=jnp.bfloat16))
    heads.load_official_weights(model, weights)
    grads, out = _outputs_and_token_grad(model, jnp.asarray(g["tokens"]))
    assert all(v.dtype == jnp.float32 for v in out.values())
    _assert_proper(np.asarray(out["camera_poses"])[..., :3, :3])
    np.testing.assert_allclose(np.asarray(out["global_points"]), g["out:global_points"], rtol=0.1, atol=0.1)
    assert np.all(np.isfinite(np.asarray(grads)))


def test_encoder_attention_follows_the_model_kernel(monkeypatch):
    """The encoders and heads use the model's `attention_kernel` while G2VLM traces them: with the TPU's kernel
    (what `g2vlm aot` compiles) they run XLA's fused attention, never a CPU kernel, so the AOT program is the
    TPU's; with 'blockwise' / 'xla', and outside a model on this CPU, the whole-row kernel (no mask to evaluate)."""
    rng = np.random.default_rng(1)
    q, k, v = (jnp.asarray(rng.standard_normal((2, n, 4, 16)), jnp.float32) for n in (600, 600, 600))
    want = jax.nn.dot_product_attention(q, k, v)
    calls = []
    real = encoder_layers.full_rows_attention
    monkeypatch.setattr(encoder_layers, "full_rows_attention", lambda *a: calls.append(1) or real(*a))
    with encoder_layers.model_kernel("tpu_flash"):
        got = encoder_layers.attention(q, k, v)
    assert calls == []
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    for kernel in ("blockwise", "xla"):
        with encoder_layers.model_kernel(kernel):
            got = encoder_layers.attention(q, k, v)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    assert len(calls) == 2
    encoder_layers.attention(q, k, v)  # outside a model: 'auto' for this (CPU) backend
    assert len(calls) == 3
