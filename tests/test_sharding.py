"""Mesh construction, logical-axis rules, and the tiny model sharded on 8 fake CPU devices.

The multi-device part needs `XLA_FLAGS=--xla_force_host_platform_device_count=8` *before* jax is
imported, but the pytest process has imported jax already (one device, shared with every other test
file). So this file re-runs itself in a subprocess with the flag set (`python tests/test_sharding.py
--worker`); the worker computes every number on 8 devices and prints it as JSON, and the tests below
assert on it. Nothing leaks into the other test files, and it works the same under pytest-xdist.
"""
import dataclasses
import json
import logging
import os
import pathlib
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType, PartitionSpec as P

from g2vlm_jax import sharding as sh
from g2vlm_jax.config import MeshConfig, tiny_model

HERE = pathlib.Path(__file__).resolve().parent
PRESET_MESHES = {"dp": dict(data=8, fsdp=1, tensor=1), "fsdp": dict(data=2, fsdp=-1, tensor=1),
                 "fsdp_tp": dict(data=2, fsdp=2, tensor=2)}


# ---- single process ------------------------------------------------------------------------------
def test_mesh_shape_fills_and_rejects():
    assert sh.mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == (2, 2, 2)
    assert sh.mesh_shape(MeshConfig(data=1, fsdp=-1, tensor=1), 8) == (1, 8, 1)
    assert sh.mesh_shape(MeshConfig(data=8, fsdp=1, tensor=1), 8) == (8, 1, 1)
    with pytest.raises(ValueError, match="do not divide the 8 devices"):
        sh.mesh_shape(MeshConfig(data=3, fsdp=-1, tensor=1), 8)
    with pytest.raises(ValueError, match="needs 4 devices but 8 are available"):
        sh.mesh_shape(MeshConfig(data=2, fsdp=2, tensor=1), 8)


def test_make_mesh_uses_auto_axes():
    mesh = sh.make_mesh(MeshConfig(data=1, fsdp=-1, tensor=1))
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 1, "fsdp": len(jax.devices()), "tensor": 1}
    assert tuple(mesh.axis_types) == (AxisType.Auto,) * 3


@pytest.mark.parametrize("preset, names, want", [
    ("dp", ("layers", "embed", "heads"), P(None, None, None)),
    ("fsdp", ("layers", "embed", "heads"), P(None, "fsdp", None)),
    ("fsdp_tp", ("layers", "embed", "heads"), P(None, "fsdp", "tensor")),
    ("fsdp_tp", ("heads", "embed"), P("tensor", "fsdp")),
    ("fsdp_tp", ("vocab", "embed"), P("tensor", "fsdp")),
    ("fsdp_tp", ("enc_embed", "enc_mlp"), P("fsdp", "tensor")),
    ("fsdp_tp", ("norm",), P(None)),
    ("fsdp", ("batch", "length", "embed"), P(("data", "fsdp"), None, None)),  # 'fsdp' already used by batch
    ("dp", ("batch", "length", "embed"), P(("data", "fsdp"), None, None)),
])
def test_logical_to_spec(preset, names, want):
    assert sh.logical_to_spec(names, sh.rules_for(preset)) == want


def test_unknown_names_and_presets_are_errors():
    with pytest.raises(ValueError, match="unknown logical axis name"):
        sh.logical_to_spec(("embd",), sh.rules_for("fsdp"))
    with pytest.raises(ValueError, match="unknown logical axis names"):
        sh.logical("embed", "hidden")
    with pytest.raises(ValueError, match="sharding preset"):
        sh.rules_for("zero3")


def test_indivisible_dimension_falls_back_to_replication(caplog):
    mesh = types.SimpleNamespace(shape={"data": 1, "fsdp": 8, "tensor": 2})  # fit_spec only reads sizes
    with caplog.at_level(logging.INFO, logger="g2vlm_jax.sharding"):
        spec = sh.fit_spec(P("fsdp", "tensor"), (6, 64), mesh, what="some/param")
    assert spec == P(None, "tensor")
    assert "some/param" in caplog.text and "not divisible" in caplog.text


def test_constrain_is_a_no_op_without_rules():
    x = jnp.ones((2, 3, 4))
    assert sh.constrain(x, ("batch", "length", "embed")) is x


def test_rules_are_bound_to_the_jitted_program():
    """jit_sharded traces under its mesh and preset wherever it is lowered or called; plain jit does not."""
    mesh = sh.make_mesh(MeshConfig(preset="dp", data=1, fsdp=1, tensor=1))
    seen = []

    def fn(x):
        seen.append(sh.bound_mesh())
        return sh.constrain(x * 2, ("batch", "length", "embed"))

    x = jnp.ones((2, 3, 4))
    program = sh.jit_sharded(fn, mesh, "dp")
    text = program.lower(x).as_text()
    assert "sharding_constraint" in text and "jit_fn" in text
    assert "sharding_constraint" not in jax.jit(fn).lower(x).as_text()
    assert seen == [mesh, None] and sh.bound_mesh() is None
    np.testing.assert_array_equal(program(x), 2 * x)
    with pytest.raises(ValueError, match="sharding preset 'zero3' is unknown"):
        sh.jit_sharded(fn, mesh, "zero3")


def test_mesh_of_single_device_arrays_is_a_one_device_mesh():
    mesh = sh.mesh_of({"w": jnp.ones(3)})
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 1} and list(mesh.devices.flat) == [jax.devices()[0]]


# ---- 8 fake devices (subprocess) -------------------------------------------------------------------
def _small_cfg():
    """The tiny config with one-block encoders and decoders (keeps the 8-device compiles short)."""
    base = tiny_model()
    return tiny_model(vit=dataclasses.replace(base.vit, num_layers=1), dino=dataclasses.replace(base.dino, num_layers=1),
                      heads=dataclasses.replace(base.heads, decoder_layers=1))


def _loss(model, batch):
    """A simple sum of token-mean CE and masked MSE of the local points against the GT world points."""
    out = model(batch)
    lu = batch.num_sem_tokens
    logp = jax.nn.log_softmax(out.logits, axis=-1)
    nll = -jnp.take_along_axis(logp, batch.labels[:, :lu, None], axis=-1)[..., 0]
    ce = jnp.sum(nll * batch.loss_mask[:, :lu]) / jnp.sum(batch.loss_mask)
    err = jnp.sum((out.geometry["local_points"] - batch.gt_world_points) ** 2, axis=-1)
    return ce + jnp.sum(err * batch.gt_valid) / jnp.sum(batch.gt_valid)


def _spec_list(spec, ndim):
    entries = list(spec) + [None] * (ndim - len(spec))
    return [list(e) if isinstance(e, tuple) else e for e in entries]


def _worker() -> dict:
    from model_batches import FAST_COMPILE, standard_batch

    from g2vlm_jax.model.g2vlm import G2VLM

    assert len(jax.devices()) == 8, jax.devices()
    cfg = _small_cfg()
    ctor = lambda: G2VLM(cfg, rngs=nnx.Rngs(0))
    batch = standard_batch(num_rows=8, views=2)
    loss_and_grad = lambda graphdef: jax.value_and_grad(lambda st, b: _loss(nnx.merge(graphdef, st), b))
    step = lambda graphdef, mesh, preset: sh.jit_sharded(loss_and_grad(graphdef), mesh, preset,
                                                         compiler_options=FAST_COMPILE)
    grad_norm = lambda g: float(jnp.sqrt(sum(jnp.sum(x.astype(jnp.float32) ** 2) for x in jax.tree.leaves(g))))
    results, host_state, graphdef = {}, None, None
    for preset in ("fsdp_tp", "fsdp", "dp"):  # fsdp_tp first: it is created by create_sharded_model
        mesh = sh.make_mesh(MeshConfig(preset=preset, **PRESET_MESHES[preset]))
        if host_state is None:
            model = sh.create_sharded_model(ctor, mesh, preset)
            graphdef, state = nnx.split(model)
            host_state = jax.device_get(state)
        else:
            state = jax.device_put(host_state, sh.param_shardings(host_state, mesh, preset))
        expected = sh.param_shardings(state, mesh, preset)
        specs, mismatched = {}, []
        for (path, var), (_, want) in zip(nnx.to_flat_state(state), nnx.to_flat_state(expected)):
            got = var.get_value().sharding
            name = "/".join(map(str, path))
            specs[name] = _spec_list(got.spec, var.get_value().ndim)
            if not got.is_equivalent_to(want.get_value(), var.get_value().ndim):
                mismatched.append(name)
        loss, grads = step(graphdef, mesh, preset)(state, sh.shard_batch(batch, mesh))
        results[preset] = dict(loss=float(loss), grad_norm=grad_norm(grads), specs=specs, mismatched=mismatched,
                               mesh=dict(mesh.shape), batch_spec=_spec_list(sh.batch_sharding(mesh).spec, 2))
    ref_loss, ref_grads = jax.jit(loss_and_grad(graphdef), compiler_options=FAST_COMPILE)(host_state, batch)  # one device
    results["single"] = dict(loss=float(ref_loss), grad_norm=grad_norm(ref_grads))
    return results


@pytest.fixture(scope="module")
def multi_device():
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(HERE.parent), str(HERE), env.get("PYTHONPATH", "")])
    proc = subprocess.run([sys.executable, str(pathlib.Path(__file__).resolve()), "--worker"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# Hand-derived from the rules tables for the tiny model: D=64 (embed), q 4x16=64 (heads),
# kv 2x16=32 (kv_heads), mlp 128, vocab 512, ViT width 32 / MLP 64.
EXPECTED_SPECS = {
    "fsdp_tp": {
        "language_model/layers/self_attn/q_proj/kernel": [None, "fsdp", "tensor"],
        "language_model/layers/self_attn/q_proj_moe_geo/bias": [None, "tensor"],
        "language_model/layers/self_attn/k_proj/kernel": [None, "fsdp", "tensor"],
        "language_model/layers/self_attn/o_proj_moe_geo/kernel": [None, "tensor", "fsdp"],
        "language_model/layers/mlp/down_proj/kernel": [None, "tensor", "fsdp"],
        "language_model/layers/ls1/gamma": [None, None],
        "language_model/norm_moe_geo/weight": [None],
        "embed_tokens/weight": ["tensor", "fsdp"],
        "lm_head/kernel": ["fsdp", "tensor"],
        "dino2llm/kernel": ["fsdp", None],  # (enc_embed, embed): 'fsdp' taken by the first dimension
    },
    "fsdp": {
        "language_model/layers/self_attn/q_proj/kernel": [None, "fsdp", None],
        "language_model/layers/mlp_moe_geo/up_proj/kernel": [None, "fsdp", None],
        "embed_tokens/weight": [None, "fsdp"],
        "lm_head/kernel": ["fsdp", None],
        "language_model/norm/weight": [None],
    },
    "dp": {
        "language_model/layers/self_attn/q_proj/kernel": [None, None, None],
        "embed_tokens/weight": [None, None],
        "lm_head/kernel": [None, None],
    },
}


@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_presets_shard_parameters_by_the_rules(multi_device, preset):
    r = multi_device[preset]
    assert r["mismatched"] == []
    assert r["batch_spec"][0] == ["data", "fsdp"]
    for name, spec in EXPECTED_SPECS[preset].items():
        assert r["specs"][name] == spec, name
    sharded = [n for n, s in r["specs"].items() if any(e is not None for e in s)]
    if preset == "dp":
        assert sharded == []
    else:  # encoders and heads are sharded too (their enc_* names)
        assert any(n.startswith("vit_model/") for n in sharded) and any(n.startswith("heads/") for n in sharded)
    if preset == "fsdp_tp":
        assert any("tensor" in json.dumps(r["specs"][n]) for n in sharded if n.startswith("dino_model/"))


@pytest.mark.parametrize("preset", ["dp", "fsdp", "fsdp_tp"])
def test_sharded_loss_and_gradients_equal_single_device(multi_device, preset):
    r, ref = multi_device[preset], multi_device["single"]
    assert np.isfinite(r["loss"]) and r["grad_norm"] > 0
    np.testing.assert_allclose(r["loss"], ref["loss"], rtol=1e-5)
    np.testing.assert_allclose(r["grad_norm"], ref["grad_norm"], rtol=1e-4)


if __name__ == "__main__" and "--worker" in sys.argv:
    print(json.dumps(_worker()))
