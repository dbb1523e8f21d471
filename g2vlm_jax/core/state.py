"""Train state: the split model (trainable / frozen parameters), optimiser state and counters.

The NNX model is split once into a static `graphdef` and two `nnx.State` trees selected by the
stage's trainable filter, so a jitted step differentiates only what trains, frozen weights carry no
Adam moments, and the whole state is a plain pytree for `jit`, sharding and Orbax.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from g2vlm_jax import config as config_lib
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.core import optim as optim_lib


@struct.dataclass
class TrainState:
    """Everything that changes during training (and is checkpointed).

    step:             int32[]  optimiser updates applied (skipped non-finite steps do not count)
    trainable:        nnx.State of the parameters the stage trains
    frozen:           nnx.State of every other model variable
    opt_state:        optax state over `trainable`
    nonfinite_streak: int32[]  consecutive skipped (non-finite) steps; reset by a finite step
    nonfinite_total:  int32[]  skipped steps over the whole run
    """

    step: jax.Array
    trainable: nnx.State
    frozen: nnx.State
    opt_state: optax.OptState
    nonfinite_streak: jax.Array
    nonfinite_total: jax.Array


@struct.dataclass
class StateSpec:
    """Static facts needed to rebuild the model from a TrainState."""

    graphdef: Any = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    def model(self, state: TrainState) -> nnx.Module:
        return nnx.merge(self.graphdef, state.trainable, state.frozen)


def _build(cfg: config_lib.ExperimentConfig, model_ctor: Callable[[], nnx.Module]):
    model = model_ctor()
    graphdef, trainable, frozen = nnx.split(model, nnx.All(nnx.Param, optim_lib.is_trainable(cfg)), ...)
    tx = optim_lib.make_optimizer(cfg)
    state = TrainState(step=jnp.zeros((), jnp.int32), trainable=trainable, frozen=frozen,
                       opt_state=tx.init(trainable), nonfinite_streak=jnp.zeros((), jnp.int32),
                       nonfinite_total=jnp.zeros((), jnp.int32))
    return StateSpec(graphdef=graphdef, tx=tx), state


def default_model_ctor(cfg: config_lib.ExperimentConfig) -> Callable[[], nnx.Module]:
    from g2vlm_jax.model.g2vlm import G2VLM  # training composes the model; the model never imports training

    return lambda: G2VLM(cfg.model, rngs=nnx.Rngs(cfg.seed))


def abstract_state(cfg: config_lib.ExperimentConfig, model_ctor=None) -> tuple[StateSpec, TrainState]:
    """Shapes/dtypes (and logical axis metadata) of the train state, without allocating it."""
    ctor = model_ctor or default_model_ctor(cfg)
    captured = {}

    def build():
        spec, state = _build(cfg, ctor)
        captured["spec"] = spec
        return state

    shapes = jax.eval_shape(build)
    return captured["spec"], shapes


def state_shardings(abstract: TrainState, mesh: jax.sharding.Mesh, preset: str) -> TrainState:
    """A NamedSharding for every leaf of the train state, from the parameters' logical axis names.

    Adam moments inherit their parameter's metadata (optax maps over the nnx.State), so they shard
    exactly like the parameter they belong to; scalars are replicated.
    """
    return sharding_lib.tree_shardings(abstract, mesh, preset)


def create_train_state(cfg: config_lib.ExperimentConfig, mesh: jax.sharding.Mesh,
                       model_ctor=None) -> tuple[StateSpec, TrainState, TrainState]:
    """Creates the train state already sharded on `mesh` (no host ever holds the full state).

    Returns (spec, state, shardings).
    """
    ctor = model_ctor or default_model_ctor(cfg)
    spec, abstract = abstract_state(cfg, ctor)
    shardings = state_shardings(abstract, mesh, cfg.mesh.preset)

    def init() -> TrainState:
        return _build(cfg, ctor)[1]

    with jax.set_mesh(mesh):
        state = jax.jit(init, out_shardings=shardings)()
    return spec, state, shardings
