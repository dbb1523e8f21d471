"""MoT layer and stack: per-expert computation, FLOPs, scan/loop/remat equivalence, freezing, init."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from model_batches import fast_jit, permute_frames, standard_batch

from g2vlm_jax.config import tiny_model
from g2vlm_jax.model.mask import MaskInfo, build_mask
from g2vlm_jax.model.mot import GEO, MoTLayer, MoTStack, official_layer_params
from g2vlm_jax.model.rope import mrope_cos_sin


def _inputs(cfg, batch, seed=0):
    """Embeddings (random table looked up by token id, random geometry features) and rope tables."""
    t = cfg.text
    lu = batch.num_sem_tokens
    k1, k2 = jax.random.split(jax.random.key(seed))
    table = jax.random.normal(k1, (t.vocab_size, t.hidden_size))
    xu = table[jnp.asarray(batch.token_ids[:, :lu])]
    b, s, v = batch.geo_images.shape[:3]
    h, w = batch.geo_grid
    xg = jax.random.normal(k2, (b, s, v, h * w, t.hidden_size))
    xg = xg * jnp.asarray(batch.sample_valid)[:, :, None, None, None]
    cos, sin = mrope_cos_sin(jnp.asarray(batch.positions), t.head_dim, t.rope_theta, t.mrope_sections)
    return xu, xg.reshape(b, -1, t.hidden_size), cos, sin, MaskInfo.from_batch(batch)


@functools.partial(fast_jit, static_argnums=0)
def _apply_split(graphdef, state, *args):
    return nnx.merge(graphdef, state)(*args)


def _apply(module, *args):
    return _apply_split(*nnx.split(module), *args)


@functools.partial(fast_jit, static_argnums=(1, 2))
def _perturb_state(state, seed, scale):
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(treedef, [a + scale * jax.random.normal(k, a.shape) * (jnp.abs(a).mean() + 0.05)
                                        for a, k in zip(leaves, keys)])


def _perturbed(module, seed=1, scale=0.3):
    """Randomises every parameter (norm weights, LayerScale, biases included) so no term is trivially 1/0."""
    nnx.update(module, _perturb_state(nnx.state(module), seed, scale))
    return module


# ---- an independent reference: the official scatter style (every token through both experts, select)
def _rms(x, w, eps):
    return w * x / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + eps)


def _rope(x, cos, sin):
    x1, x2 = jnp.split(x, 2, axis=-1)
    return x * cos[:, :, None] + jnp.concatenate([-x2, x1], -1) * sin[:, :, None]


def _reference_layer(p, x, is_geo, cos, sin, mask, cfg):
    t = cfg.text
    eps = t.rms_eps
    sel = lambda geo, sem: jnp.where(is_geo[:, :, None], geo, sem)
    both = lambda f: sel(f(GEO), f(""))
    lin = lambda h, name, sfx: h @ p["self_attn"][name + sfx]["kernel"] + (
        p["self_attn"][name + sfx]["bias"] if "bias" in p["self_attn"][name + sfx] else 0)
    h = both(lambda s: _rms(x, p["input_layernorm" + s]["weight"], eps))
    b, l, _ = x.shape
    heads = lambda a, n: a.reshape(b, l, n, t.head_dim)
    q = both(lambda s: lin(h, "q_proj", s))
    k = both(lambda s: lin(h, "k_proj", s))
    v = both(lambda s: lin(h, "v_proj", s))
    geo4 = is_geo[:, :, None, None]
    q = jnp.where(geo4, *[_rms(heads(q, t.num_heads), p["self_attn"]["q_norm" + s]["weight"], eps) for s in (GEO, "")])
    k = jnp.where(geo4, *[_rms(heads(k, t.num_kv_heads), p["self_attn"]["k_norm" + s]["weight"], eps) for s in (GEO, "")])
    q, k, v = _rope(q, cos, sin), _rope(k, cos, sin), heads(v, t.num_kv_heads)
    g = t.num_heads // t.num_kv_heads
    k, v = jnp.repeat(k, g, axis=2), jnp.repeat(v, g, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(t.head_dim)
    probs = jnp.nan_to_num(jax.nn.softmax(jnp.where(mask[:, None], logits, -jnp.inf), axis=-1))
    o = jnp.einsum("bhqk,bkhd->bqhd", probs, v).reshape(b, l, -1)
    x = x + sel(p["ls1"]["gamma"] * lin(o, "o_proj", GEO), lin(o, "o_proj", ""))

    def mlp(s, post):
        m = p["mlp" + s]
        hh = _rms(x, p[post + s]["weight"], eps)
        return (jax.nn.silu(hh @ m["gate_proj"]["kernel"]) * (hh @ m["up_proj"]["kernel"])) @ m["down_proj"]["kernel"]

    return x + sel(p["ls2"]["gamma"] * mlp(GEO, "post_attention_layernorm"), mlp("", "post_attention_layernorm"))


@pytest.mark.parametrize("mode", ["global", "frame"])
def test_layer_matches_token_routed_reference(mode):
    cfg = tiny_model(geo_attention=mode)
    (xu, xg, cos, sin, info), _ = _standard_inputs()
    layer = _perturbed(MoTLayer(cfg, rngs=nnx.Rngs(0)))
    ou, og = _apply(layer, xu, xg, cos, sin, info)
    params = nnx.to_pure_dict(nnx.state(layer))
    lu = xu.shape[1]
    x = jnp.concatenate([xu, xg], axis=1)
    is_geo = jnp.broadcast_to(jnp.arange(x.shape[1]) >= lu, x.shape[:2])
    ref = fast_jit(functools.partial(_reference_layer, cfg=cfg))(params, x, is_geo, cos, sin,
                                                                 build_mask(info, info, mode))
    np.testing.assert_allclose(np.asarray(ou), np.asarray(ref[:, :lu]), atol=2e-5, rtol=2e-5)
    np.testing.assert_allclose(np.asarray(og), np.asarray(ref[:, lu:]), atol=2e-5, rtol=2e-5)


def _flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return float((cost[0] if isinstance(cost, list) else cost)["flops"])


def test_mot_layer_flops_equal_dense_layer():
    """Each expert runs on its own slice: MoT(Lu=Lg=L/2) costs one dense layer on L tokens."""
    cfg = tiny_model()
    d, b, l = cfg.text.hidden_size, 2, 128
    layer = MoTLayer(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(layer)
    info = MaskInfo(seq_order=jnp.broadcast_to(jnp.arange(l), (b, l)), document_ids=jnp.ones((b, l), jnp.int32),
                    split_ids=jnp.ones((b, l), jnp.int32), split_full=jnp.zeros((b, l), bool),
                    geo_frame=jnp.full((b, l), -1, jnp.int32))
    cos, sin = jnp.ones((b, l, cfg.text.head_dim)), jnp.zeros((b, l, cfg.text.head_dim))
    run = lambda st, xu, xg: nnx.merge(graphdef, st)(xu, xg, cos, sin, info)
    mot = _flops(run, state, jnp.ones((b, l // 2, d)), jnp.ones((b, l // 2, d)))
    dense = _flops(run, state, jnp.ones((b, l, d)), jnp.ones((b, 0, d)))
    assert abs(mot - dense) / dense < 0.03, (mot, dense)
    # The select-after-both-experts style (the reference above) costs far more: the test can tell.
    params = nnx.to_pure_dict(state)
    is_geo = jnp.broadcast_to(jnp.arange(l) >= l // 2, (b, l))
    mask = build_mask(info, info, "global")
    naive = _flops(lambda p, x: _reference_layer(p, x, is_geo, cos, sin, mask, cfg), params, jnp.ones((b, l, d)))
    assert naive > 1.5 * mot, (naive, mot)


@functools.lru_cache(maxsize=None)
def _standard_inputs(views: int = 3):
    cfg = tiny_model()
    batch = standard_batch(views=views)
    return fast_jit(lambda bt: _inputs(cfg, bt))(batch), batch


def _stack_and_inputs(seed=0, perturb=False, **overrides):
    cfg = tiny_model(**overrides)
    stack = MoTStack(cfg, rngs=nnx.Rngs(seed))
    if perturb:
        _perturbed(stack)
    args, batch = _standard_inputs()
    return cfg, stack, args, batch


def _loss(stack, xu, xg, cos, sin, info):
    hu, hg = stack(xu, xg, cos, sin, info)
    return jnp.sum(jnp.sin(hu)) + jnp.sum(jnp.cos(hg) * hg)


def test_scan_with_remat_matches_the_plain_loop():
    """Same loss and gradients from the scanned + rematerialised stack as from the plain loop."""
    results = []
    for scan, remat in [(False, "none"), (True, "dots")]:
        _, stack, args, _ = _stack_and_inputs(scan_layers=scan, remat_policy=remat)
        graphdef, state = nnx.split(stack)
        results.append(fast_jit(jax.value_and_grad(lambda st, a: _loss(nnx.merge(graphdef, st), *a)))(state, args))
    (ref_loss, ref_grads), (loss, grads) = results
    np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
    for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def _equations(jaxpr):
    """Every equation of a jaxpr, recursing into sub-jaxprs (scan bodies, checkpoints)."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", value)
            if hasattr(inner, "eqns"):
                yield from _equations(inner)


@pytest.mark.parametrize("policy, saveable", [("full", None), ("dots", jax.checkpoint_policies.checkpoint_dots),
                                              ("dots_no_batch", jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims),
                                              ("none", "absent")])
@pytest.mark.parametrize("scan", [True, False])
def test_remat_policy_wraps_every_layer(policy, saveable, scan):
    _, stack, args, _ = _stack_and_inputs(scan_layers=scan, remat_policy=policy)
    graphdef, state = nnx.split(stack)
    jaxpr = jax.make_jaxpr(lambda st: _loss(nnx.merge(graphdef, st), *args))(state)
    remats = [e for e in _equations(jaxpr.jaxpr) if e.primitive.name in ("checkpoint", "remat2")]
    if saveable == "absent":
        assert not remats
    else:
        assert len(remats) == (1 if scan else 2)  # one scanned body, or one per looped layer
        assert all(e.params["policy"] is saveable for e in remats)


def test_mixed_is_frame_then_global_in_scan_and_loop():
    """'mixed' with 2 layers = layer 0 run in 'frame' mode, then layer 1 in 'global' mode; the scan
    (traced layer parity) and the loop (static parity) agree."""
    _, stack, (xu, xg, cos, sin, info), _ = _stack_and_inputs(geo_attention="mixed", perturb=True)
    layer_state = lambda i: jax.tree.map(lambda a: a[i], nnx.state(stack.layers))
    layer_def = lambda mode: nnx.graphdef(nnx.eval_shape(lambda: MoTLayer(tiny_model(geo_attention=mode),
                                                                          rngs=nnx.Rngs(0))))
    h = _apply(nnx.merge(layer_def("frame"), layer_state(0)), xu, xg, cos, sin, info)
    hu_g, hg_g = _apply(nnx.merge(layer_def("global"), layer_state(1)), *h, cos, sin, info)
    h = _apply(nnx.merge(layer_def("global"), layer_state(0)), xu, xg, cos, sin, info)
    _, hg_all_global = _apply(nnx.merge(layer_def("global"), layer_state(1)), *h, cos, sin, info)
    scanned = _apply(stack, xu, xg, cos, sin, info)
    looped_stack = MoTStack(tiny_model(geo_attention="mixed", scan_layers=False), rngs=nnx.Rngs(0))
    nnx.update(looped_stack, nnx.state(stack))
    looped = _apply(looped_stack, xu, xg, cos, sin, info)
    for out in (scanned, looped):
        np.testing.assert_allclose(out[0], stack.norm(hu_g), atol=1e-5)
        np.testing.assert_allclose(out[1], stack.norm_moe_geo(hg_g), atol=1e-5)
    assert not np.allclose(scanned[1], stack.norm_moe_geo(hg_all_global), atol=1e-4)


def _is_geometry_param(path) -> bool:
    return any(str(p).endswith(GEO) or str(p) in ("ls1", "ls2") for p in path)


def _jacobians(stack, args):
    """d[semantic-only loss, geometry-only loss] / (params, xu, xg): one vmapped backward pass."""
    graphdef, state = nnx.split(stack)

    def losses(st, xu, xg):
        hu, hg = nnx.merge(graphdef, st)(xu, xg, *args[2:])
        return jnp.stack([jnp.sum(jnp.sin(hu)), jnp.sum(jnp.sin(hg))])

    return fast_jit(jax.jacrev(losses, argnums=(0, 1, 2)))(state, args[0], args[1])


@pytest.mark.parametrize("flag", [None, "freeze_und", "freeze_recon"])
def test_activation_freezing_zeroes_the_frozen_expert(flag):
    """freeze_und: no gradient at all reaches the semantic expert (in particular none from a
    geometry-only loss); freeze_recon: none reaches the geometry expert (none from a CE-like loss).
    Without the flags each loss reaches the other expert through the shared attention."""
    _, stack, args, _ = _stack_and_inputs(perturb=True, **({flag: True} if flag else {}))
    params, gxu, gxg = _jacobians(stack, args)
    for loss_index, other_is_geo in ((0, True), (1, False)):
        pick = lambda g: np.asarray(g)[loss_index]
        flat = [(path, pick(v)) for path, v in nnx.to_flat_state(params)]
        other = [g for path, g in flat if _is_geometry_param(path) == other_is_geo]
        own = [g for path, g in flat if _is_geometry_param(path) != other_is_geo]
        other_frozen = flag == ("freeze_recon" if other_is_geo else "freeze_und")
        own_frozen = flag == ("freeze_und" if other_is_geo else "freeze_recon")
        assert len(other) >= 15
        assert all(np.any(g != 0) for g in own) != own_frozen  # a frozen expert gets nothing at all
        other_input = pick(gxg if other_is_geo else gxu)
        if other_frozen:
            assert all(np.all(g == 0) for g in other)
            assert np.all(other_input == 0)
        elif not own_frozen:  # everything but the other expert's final norm is reached
            assert sum(np.any(g != 0) for g in other) == len(other) - 1
            assert np.any(other_input != 0)


def test_freezing_does_not_change_the_forward_pass():
    outs = []
    for flags in ({}, {"freeze_und": True, "freeze_recon": True}):
        _, stack, args, _ = _stack_and_inputs(**flags)
        outs.append(_apply(stack, *args))
    for a, b in zip(*outs):
        np.testing.assert_array_equal(a, b)


def test_init_scratch_and_copy_semantic():
    cfg = tiny_model()
    scratch = MoTStack(cfg, rngs=nnx.Rngs(0)).layers
    assert np.allclose(scratch.ls1.gamma[...], 0.01) and np.allclose(scratch.ls2.gamma[...], 0.01)
    assert np.all(scratch.input_layernorm_moe_geo.weight[...] == 1.0)
    assert np.all(scratch.self_attn.k_norm_moe_geo.weight[...] == 1.0)
    assert np.all(scratch.self_attn.q_proj_moe_geo.bias[...] == 0.0)
    kernel = np.asarray(scratch.mlp_moe_geo.up_proj.kernel[...])
    assert abs(kernel.std() - 0.02) < 0.002
    assert not np.allclose(kernel, scratch.mlp.up_proj.kernel[...])
    copied = MoTStack(tiny_model(geo_init="copy_semantic"), rngs=nnx.Rngs(0))
    flat = dict(nnx.to_flat_state(nnx.state(copied)))
    pairs = 0
    for path, var in flat.items():
        twin = tuple(str(p).replace(GEO, "") for p in path)
        if twin != tuple(map(str, path)):
            np.testing.assert_array_equal(var[...], flat[twin][...], err_msg=str(path))
            pairs += 1
    assert pairs == 15  # per (stacked) layer: 9 attention + 3 MLP + 2 norm tensors; plus the final norm
    assert np.allclose(copied.layers.ls1.gamma[...], 0.01)


def test_param_shapes_and_names_follow_the_official_table():
    cfg = tiny_model()
    t = cfg.text
    layer = nnx.eval_shape(lambda: MoTLayer(cfg, rngs=nnx.Rngs(0)))
    ours = {tuple(map(str, p)): v.shape for p, v in nnx.to_flat_state(nnx.state(layer))}
    table = official_layer_params()
    assert sorted(ours) == sorted(path for path, _, _ in table)
    d, qw, kvw = t.hidden_size, t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
    torch_shape = {"q_proj": (qw, d), "k_proj": (kvw, d), "v_proj": (kvw, d), "o_proj": (d, qw),
                   "gate_proj": (t.mlp_hidden, d), "up_proj": (t.mlp_hidden, d), "down_proj": (d, t.mlp_hidden)}
    for path, official, transposed in table:
        leaf, module = official.split(".")[-1], official.split(".")[-2].replace(GEO, "")
        if leaf == "weight" and module in torch_shape:
            want = torch_shape[module]
        elif leaf == "bias":
            want = (torch_shape[module][0],)
        else:
            want = (t.head_dim,) if module in ("q_norm", "k_norm") else (d,)
        got = ours[path][::-1] if transposed else ours[path]
        assert tuple(got) == want, (path, official, got, want)


def test_bf16_compute_keeps_fp32_params_and_tracks_fp32():
    outs = []
    for dtype in ("float32", "bfloat16"):
        cfg, stack, (xu, xg, cos, sin, info), _ = _stack_and_inputs(compute_dtype=dtype)
        assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(nnx.state(stack)))
        dt = jnp.bfloat16 if dtype == "bfloat16" else jnp.float32
        hu, hg = _apply(stack, xu.astype(dt), xg.astype(dt), cos, sin, info)
        assert hu.dtype == dt and hg.dtype == dt
        outs.append((hu, hg))
    for a, b in zip(*outs):
        err = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
        assert err.mean() < 0.05, err.mean()


@pytest.mark.parametrize("mode, equivariant", [("global", True), ("block_causal", False)])
def test_backbone_view_permutation(mode, equivariant):
    """Relabelling views 1..V-1 (each frame keeps its own tokens' positions) permutes the geometry
    hidden states the same way and leaves text untouched, in the order-free modes."""
    cfg = tiny_model(geo_attention=mode)
    (xu, xg, cos, sin, info), batch = _standard_inputs()
    perm = [0, 2, 1]
    moved = permute_frames(batch, perm)
    stack = _perturbed(MoTStack(cfg, rngs=nnx.Rngs(0)))  # LayerScale far from 0.01: frames interact strongly
    b, s, v = batch.geo_images.shape[:3]
    xg_moved = xg.reshape(b, s, v, -1, xg.shape[-1])[:, :, perm].reshape(xg.shape)
    hu, hg = _apply(stack, xu, xg, cos, sin, info)
    xu2, _, cos2, sin2, info2 = fast_jit(lambda bt: _inputs(cfg, bt))(moved)
    hu2, hg2 = _apply(stack, xu2, xg_moved, cos2, sin2, info2)
    hg = np.asarray(hg).reshape(b, s, v, -1, hg.shape[-1])
    hg2 = np.asarray(hg2).reshape(hg.shape)
    text = (np.asarray(batch.token_type)[:, :hu.shape[1]] == 1) & (np.asarray(batch.geo_frame)[:, :hu.shape[1]] < 0)
    if equivariant:
        np.testing.assert_allclose(hg2, hg[:, :, perm], atol=2e-5)
        np.testing.assert_allclose(np.asarray(hu2)[text], np.asarray(hu)[text], atol=2e-5)
    else:
        assert not np.allclose(hg2, hg[:, :, perm], atol=1e-3)
