"""Optimiser: parameter groups, per-stage trainable sets, schedule values, lr multipliers."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from g2vlm_jax import config as C
from g2vlm_jax.core import optim


@pytest.mark.parametrize("path,group", [
    (("language_model", "embed_tokens", "embedding"), "embed"),
    (("language_model", "lm_head", "kernel"), "lm_head"),
    (("language_model", "layers", "self_attn", "q_proj", "kernel"), "semantic"),
    (("language_model", "layers", "self_attn", "q_proj_moe_geo", "kernel"), "geometry"),
    (("language_model", "layers", "mlp_moe_geo", "up_proj", "kernel"), "geometry"),
    (("language_model", "layers", "ls1", "gamma"), "geometry"),
    (("language_model", "norm_moe_geo", "weight"), "geometry"),
    (("language_model", "norm", "weight"), "semantic"),
    (("vit_model", "blocks", 0, "attn", "qkv", "kernel"), "vit"),
    (("dino_model", "encoder", "layer", 3, "mlp", "fc1", "kernel"), "dino"),
    (("dino2llm", "kernel"), "dino2llm"),
    (("heads", "camera_head", "fc_rot", "kernel"), "heads"),
    (("point_decoder", "blocks", 0, "attn", "qkv", "kernel"), "heads"),
])
def test_param_group(path, group):
    assert optim.param_group(path) == group


def _cfg(**optim_overrides):
    cfg = C.ExperimentConfig(model=C.tiny_model())
    return dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, **optim_overrides))


def test_stage_groups_respect_frozen_encoders():
    assert optim.trainable_groups(_cfg(stage="stage1")) == ("geometry", "dino2llm", "heads")
    assert optim.trainable_groups(_cfg(stage="stage2")) == ("semantic", "embed", "lm_head")
    cfg = _cfg(stage="all")
    assert "vit" not in optim.trainable_groups(cfg) and "dino" not in optim.trainable_groups(cfg)
    unfrozen = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, freeze_vit=False, freeze_dino=False))
    assert {"vit", "dino"} <= set(optim.trainable_groups(unfrozen))
    # An unfrozen encoder trains in every stage (stage 2 alone never lists it).
    stage2 = _cfg(stage="stage2")
    vit_on = dataclasses.replace(stage2, model=dataclasses.replace(stage2.model, freeze_vit=False))
    assert optim.trainable_groups(vit_on) == ("semantic", "embed", "lm_head", "vit")
    no_vit = dataclasses.replace(vit_on, model=dataclasses.replace(vit_on.model, use_vit=False))
    assert "vit" not in optim.trainable_groups(no_vit)


def test_schedule_warmup_then_cosine_to_floor():
    cfg = _cfg(learning_rate=1e-3, min_learning_rate=1e-6, warmup_steps=10, total_steps=110)
    s = optim.LearningRateSchedule.from_config(cfg.optim)
    assert float(s(0)) == 0.0
    np.testing.assert_allclose(float(s(5)), 5e-4, rtol=1e-6)
    np.testing.assert_allclose(float(s(10)), 1e-3, rtol=1e-6)
    np.testing.assert_allclose(float(s(60)), 1e-6 + 0.5 * (1e-3 - 1e-6), rtol=1e-5)  # cosine half-way
    np.testing.assert_allclose(float(s(110)), 1e-6, rtol=1e-5)
    np.testing.assert_allclose(float(s(500)), 1e-6, rtol=1e-5)  # past the end: the floor
    # The same values as optax's schedule at every step, warmup 0 included.
    for warmup in (10, 0):
        o = dataclasses.replace(cfg.optim, warmup_steps=warmup)
        ref = optax.warmup_cosine_decay_schedule(0.0, o.learning_rate, warmup, o.total_steps, o.min_learning_rate)
        ours = optim.LearningRateSchedule.from_config(o)
        steps = np.arange(0, 115)
        np.testing.assert_allclose(np.asarray(jax.vmap(ours)(steps)), np.asarray(jax.vmap(ref)(steps)), rtol=1e-5,
                                   atol=1e-12)


def test_schedule_is_an_argument_of_the_compiled_step():
    """Two schedules, one program: the schedule's numbers are not constants of the jitted function."""
    a = optim.LearningRateSchedule.from_config(_cfg(total_steps=10, warmup_steps=2).optim)
    b = optim.LearningRateSchedule.from_config(_cfg(total_steps=400, warmup_steps=7, learning_rate=3e-3).optim)
    f = jax.jit(lambda s, step: s(step))
    assert float(f(a, 1)) != float(f(b, 1))
    assert f._cache_size() == 1


class _Toy(nnx.Module):
    def __init__(self):
        rngs = nnx.Rngs(0)
        self.q_proj_moe_geo = nnx.Linear(2, 2, rngs=rngs)
        self.point_head = nnx.Linear(2, 2, rngs=rngs)
        self.q_proj = nnx.Linear(2, 2, rngs=rngs)


def test_trainable_split_and_group_multipliers():
    cfg = _cfg(stage="stage1", learning_rate=1.0, warmup_steps=0, total_steps=10, grad_clip_norm=1e9,
               lr_multipliers=(("heads", 3.0),))
    _, trainable, frozen = nnx.split(_Toy(), nnx.All(nnx.Param, optim.is_trainable(cfg)), ...)
    names = {p[0] for p, _ in nnx.to_flat_state(trainable)}
    assert names == {"q_proj_moe_geo", "point_head"}
    assert {p[0] for p, _ in nnx.to_flat_state(frozen)} == {"q_proj"}
    tx = optim.make_optimizer(cfg)
    state = tx.init(trainable)
    grads = jax.tree.map(jnp.ones_like, trainable)
    updates, _ = tx.update(grads, state, trainable)
    # First Adam step: -multiplier per coordinate (bias-corrected m/sqrt(v) = 1); the train step
    # then scales by the schedule's learning rate (1.0 here).
    np.testing.assert_allclose(np.asarray(updates["point_head"]["kernel"].get_value()), -3.0, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(updates["q_proj_moe_geo"]["kernel"].get_value()), -1.0, rtol=1e-5)


def test_unknown_multiplier_group_is_an_error():
    with pytest.raises(C.ConfigError, match="unknown groups"):
        optim.make_optimizer(_cfg(lr_multipliers=(("bogus", 2.0),)))
