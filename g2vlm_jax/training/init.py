"""Initialise a run's parameters from a params-only checkpoint (an earlier stage, or converted weights).

Every parameter of the model must be present with the same shape; extra names are an error too, so
a checkpoint of another model can never be half-loaded silently. Optimiser state starts fresh.
"""
from __future__ import annotations

import jax
from absl import logging
from flax import nnx

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import config as config_lib
from g2vlm_jax.training.state import TrainState


def _place(params: nnx.State, flat: dict, where: str) -> nnx.State:
    """Returns `params` with every value replaced by `flat[name]`, keeping each leaf's sharding."""
    def load(path, variable):
        name = "/".join(str(k) for k in path)
        if name not in flat:
            raise KeyError(f"{where}: parameter {name!r} is missing")
        value, current = flat[name], variable.get_value()
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"{where}: parameter {name!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(current.shape)}")
        return variable.replace(jax.device_put(value.astype(current.dtype), current.sharding))

    return nnx.map_state(load, params)


def initialise_from(state: TrainState, cfg: config_lib.ExperimentConfig) -> TrainState:
    """Loads `cfg.checkpoint.init_from` into the state's trainable and frozen parameters."""
    where = cfg.checkpoint.init_from
    flat, metadata = ckpt_lib.load_params(where)
    ours = set(ckpt_lib.flat_params(state.trainable)) | set(ckpt_lib.flat_params(state.frozen))
    unexpected = sorted(set(flat) - ours)
    if unexpected:
        raise ValueError(f"{where}: {len(unexpected)} parameters the model does not have, e.g. {unexpected[:3]}; "
                         "is this a checkpoint of another model config?")
    logging.info("initialising %d parameters from %s (%s)", len(flat), where, metadata.get("source", "export"))
    return state.replace(trainable=_place(state.trainable, flat, where), frozen=_place(state.frozen, flat, where))
