"""The whole G2VLM model: parameter budget and official shapes (2B), input placement, outputs,
view-permutation equivariance in 'global' mode, and activation-level freezing."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_batches import fast_jit, make_batch, permute_frames, standard_batch

from g2vlm_jax.config import g2vlm_2b_model, tiny_model
from g2vlm_jax.model.g2vlm import G2VLM, official_backbone_params, parameter_counts
from g2vlm_jax.core.optim import param_group


# ---- 2B budget and shapes (abstract: nothing is allocated) ---------------------------------------
def test_2b_parameter_counts_match_spec():
    counts = parameter_counts(g2vlm_2b_model())
    spec = {"one_expert": 1.310e9, "llm": 3.088e9, "vit": 0.665e9, "dino": 0.304e9, "heads": 0.481e9, "total": 4.54e9}
    for part, want in spec.items():
        assert abs(counts[part] - want) / want < 0.005, (part, counts[part], want)
    # Exact, from the Qwen2-VL-2B shapes: per layer q/k/v (+bias), o, QK norms, SwiGLU, 2 RMSNorms.
    d, q, kv, f, dh, layers, vocab = 1536, 12 * 128, 2 * 128, 8960, 128, 28, 151936
    per_layer = (d * q + q) + 2 * (d * kv + kv) + q * d + 2 * dh + 3 * d * f + 2 * d
    assert counts["one_expert"] == layers * per_layer + d
    assert counts["llm"] == 2 * (layers * per_layer + d) + layers * 2 * d + 2 * vocab * d  # + ls1/ls2
    assert counts["total"] == sum(counts[p] for p in ("llm", "vit", "dino", "heads"))


def _official_shapes_2b() -> dict[str, tuple[int, ...]]:
    """torch shapes of the official backbone tensors ([out, in] for Linear), from Qwen2-VL-2B + G2VLM."""
    d, q, kv, f, dh, vocab = 1536, 1536, 256, 8960, 128, 151936
    shapes = {"language_model.model.embed_tokens.weight": (vocab, d), "language_model.lm_head.weight": (vocab, d),
              "language_model.model.norm.weight": (d,), "language_model.model.norm_moe_geo.weight": (d,),
              "dino2llm.weight": (d, 1024), "dino2llm.bias": (d,)}
    per_layer = {"self_attn.q_proj{}.weight": (q, d), "self_attn.q_proj{}.bias": (q,),
                 "self_attn.k_proj{}.weight": (kv, d), "self_attn.k_proj{}.bias": (kv,),
                 "self_attn.v_proj{}.weight": (kv, d), "self_attn.v_proj{}.bias": (kv,),
                 "self_attn.o_proj{}.weight": (d, q), "self_attn.q_norm{}.weight": (dh,),
                 "self_attn.k_norm{}.weight": (dh,), "mlp{}.gate_proj.weight": (f, d), "mlp{}.up_proj.weight": (f, d),
                 "mlp{}.down_proj.weight": (d, f), "input_layernorm{}.weight": (d,),
                 "post_attention_layernorm{}.weight": (d,)}
    for i in range(28):
        for name, shape in per_layer.items():
            for sfx in ("", "_moe_geo"):
                shapes[f"language_model.model.layers.{i}.{name.format(sfx)}"] = shape
        shapes[f"language_model.model.layers.{i}.ls1.gamma"] = (d,)
        shapes[f"language_model.model.layers.{i}.ls2.gamma"] = (d,)
    return shapes


def test_2b_backbone_shapes_equal_official_after_transposes():
    cfg = g2vlm_2b_model()
    model = nnx.eval_shape(lambda: G2VLM(cfg, rngs=nnx.Rngs(0)))
    ours = {tuple(map(str, p)): v.get_value().shape for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    official = _official_shapes_2b()
    table = official_backbone_params(cfg)
    assert sorted(name for _, _, name, _ in table) == sorted(official)
    backbone = {p for p in ours if p[0] in ("embed_tokens", "lm_head", "language_model", "dino2llm")}
    assert backbone == {path for path, _, _, _ in table}  # every backbone tensor is mapped, none twice
    for path, layer, name, transposed in table:
        shape = ours[path][1:] if layer is not None else ours[path]
        assert ours[path][0] == cfg.text.num_layers or layer is None
        assert tuple(shape[::-1] if transposed else shape) == official[name], (path, name)


# ---- the tiny model: random parameters drawn on the host (no init program to compile) -------------
@functools.lru_cache(maxsize=None)
def _tiny_state():
    """Every parameter random and away from any special init value (dino2llm non-zero, LayerScale and
    norm scales ~1): a model in which every path carries signal. Shared by all config variants."""
    cfg = tiny_model()
    abstract = nnx.state(nnx.eval_shape(lambda: G2VLM(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    rng = np.random.default_rng(0)

    def draw(path, var):
        shape = var.get_value().shape
        if len(shape) == 1 or (len(shape) == 2 and "layers" in map(str, path)):  # norms, biases, LayerScale
            value = 1.0 + 0.3 * rng.standard_normal(shape)
        else:
            value = 0.5 * rng.standard_normal(shape) / np.sqrt(shape[-2] if len(shape) > 1 else 1.0)
        return var.replace(jnp.asarray(value, jnp.float32))

    return nnx.map_state(draw, abstract)


def _model(**overrides) -> G2VLM:
    cfg = tiny_model(**overrides)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: G2VLM(cfg, rngs=nnx.Rngs(0))))
    return nnx.merge(graphdef, _tiny_state())


@functools.partial(fast_jit, static_argnums=(0, 3, 4))
def _forward(graphdef, state, batch, logits=True, geometry=True):
    return nnx.merge(graphdef, state)(batch, compute_logits=logits, compute_geometry=geometry)


def _run(model, batch, **kw):
    return _forward(*nnx.split(model), batch, kw.get("logits", True), kw.get("geometry", True))


def test_dino2llm_starts_at_zero():
    """SPEC 1.3: geometry tokens enter the LLM as exactly 0 at init (only dino2llm is computed here)."""
    cfg = tiny_model()
    state = jax.jit(lambda: nnx.split(G2VLM(cfg, rngs=nnx.Rngs(0)).dino2llm)[1])()
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree.leaves(state))


def test_forward_outputs_shapes_and_switches():
    batch = standard_batch()
    model = _model()
    out = _run(model, batch)
    b, lu, s, v, (hh, ww) = 2, batch.num_sem_tokens, 2, 3, batch.geo_images.shape[3:5]
    assert out.logits.shape == (b, lu, 512) and out.logits.dtype == jnp.float32
    assert out.hidden_states.shape == (b, lu, 64) and out.geo_hidden_states.shape == (b, batch.num_geo_tokens, 64)
    assert out.geometry["camera_poses"].shape == (b, s, v, 4, 4)
    for name in ("local_points", "world_points", "global_points"):
        assert out.geometry[name].shape == (b, s, v, hh, ww, 3)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(out))
    np.testing.assert_allclose(out.logits, jnp.einsum("bld,dv->blv", out.hidden_states, model.lm_head.kernel[...]),
                               rtol=1e-5, atol=1e-5)
    lean = _run(model, batch, logits=False, geometry=False)
    assert lean.logits is None and lean.geometry is None
    np.testing.assert_allclose(lean.hidden_states, out.hidden_states, atol=1e-6)


def test_semantic_and_geometry_inputs_land_in_their_slots():
    # Row 1's semantic image is present in the arrays but invalid: its tokens must not be written.
    batch = make_batch([[[("text", 2), ("sem",), ("geo",), ("answer", 2)]], [[("text", 3), ("geo",)]]], views=2,
                       sample_slots=1, sem_len=16)
    model = _model()

    @nnx.jit
    def pieces(m, bt):
        vit = m.vit_model(bt.sem_images[0])  # [1, Ts, D]
        frames = m.dino2llm(m.dino_model(bt.geo_images[1, 0]))  # [V, h*w, D]
        return m.embed_semantic(bt), m.embed_geometry(bt), vit, frames

    xu, xg, vit, frames = map(np.asarray, pieces(model, batch))
    lu, (h, w) = batch.num_sem_tokens, batch.geo_grid
    text = np.asarray(model.embed_tokens.weight[...])[np.asarray(batch.token_ids[:, :lu])]
    vit_slots = np.asarray(batch.token_type[:, :lu]) == 2
    np.testing.assert_allclose(xu[~vit_slots], text[~vit_slots], atol=1e-6)
    np.testing.assert_allclose(xu[0, np.asarray(batch.sem_token_pos[0, 0])], vit[0], atol=1e-5)
    assert not vit_slots[1].any() and not batch.sem_image_valid[1, 0]
    for v, i, j in [(0, 0, 0), (1, 0, 1), (1, 1, 0)]:
        slot = ((0 * 2 + v) * h + i) * w + j  # sample 0, frame v, patch (i, j)
        assert batch.token_type[1, lu + slot] == 3
        np.testing.assert_allclose(xg[1, slot], frames[v, i * w + j], atol=1e-5)


def test_use_vit_false_rejects_semantic_images():
    model = nnx.eval_shape(lambda: G2VLM(tiny_model(use_vit=False), rngs=nnx.Rngs(0)))
    assert not hasattr(model, "vit_model")
    with pytest.raises(ValueError, match="use_vit"):
        jax.eval_shape(lambda bt: model(bt), standard_batch())


def test_global_mode_is_equivariant_to_permuting_views():
    """Relabelling views 1..V-1 (frame 0 fixed; each frame keeps its tokens' positions) permutes
    every geometry output the same way: cross-frame attention in 'global' mode has no frame order."""
    batch = standard_batch(views=3)
    perm = [0, 2, 1]
    model = _model(geo_attention="global")
    out = _run(model, batch).geometry
    moved = _run(model, permute_frames(batch, perm)).geometry
    valid = np.asarray(batch.sample_valid)
    for name, value in out.items():
        np.testing.assert_allclose(np.asarray(moved[name])[valid], np.asarray(value)[:, :, perm][valid],
                                   rtol=1e-4, atol=1e-4, err_msg=name)
    assert not np.allclose(np.asarray(out["local_points"])[:, :, 1], np.asarray(out["local_points"])[:, :, 2])


def _ce(logits, batch):
    lu = logits.shape[1]
    logp = jax.nn.log_softmax(logits, axis=-1)
    picked = jnp.take_along_axis(logp, batch.labels[:, :lu, None], axis=-1)[..., 0]
    return -jnp.sum(picked * batch.loss_mask[:, :lu])


def _geometry_loss(geometry):
    return sum(jnp.sum(jnp.sin(geometry[k])) for k in ("local_points", "camera_poses", "global_points"))


@pytest.mark.parametrize("flag, groups, loss", [
    ("freeze_und", ("semantic", "embed"), "geometry"),
    ("freeze_recon", ("geometry", "dino2llm"), "ce"),
])
def test_freezing_blocks_every_gradient_into_the_frozen_expert(flag, groups, loss):
    """freeze_und: a geometry-only loss gives exactly zero gradient to every semantic-expert weight and
    the token embeddings; freeze_recon: the CE gives exactly zero gradient to every geometry-expert
    weight and dino2llm. The other expert still learns."""
    batch = standard_batch()
    model = _model(**{flag: True})
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def objective(p):
        m = nnx.merge(graphdef, p, rest)
        if loss == "ce":
            return _ce(m(batch, compute_geometry=False).logits, batch)
        return _geometry_loss(m(batch, compute_logits=False).geometry)

    grads = fast_jit(jax.grad(objective))(params)
    frozen = live = 0
    for path, g in nnx.to_flat_state(grads):
        g = np.asarray(g)
        if param_group(path) in groups:
            assert np.all(g == 0), path
            frozen += 1
        elif param_group(path) in (("geometry", "heads") if loss == "geometry" else ("semantic", "lm_head")):
            live += int(np.any(g != 0))
    assert frozen >= 16 and live >= 16, (frozen, live)
