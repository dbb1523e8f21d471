"""Params-only checkpoints (export for serving, initialisation of a later stage, converted weights).

    <dir>/params           Orbax checkpoint of the flat parameters ('a/b/0/kernel' -> array), no optimiser state
    <dir>/metadata.json    experiment config + model fingerprint (+ source, dtype)

`initialise_from` loads one into a run's train state (`checkpoint.init_from`): every parameter of the
model must be present with the same shape; extra names are an error too, so a checkpoint of another
model can never be half-loaded silently. Optimiser state starts fresh.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from g2vlm_jax import config as config_lib
from g2vlm_jax.checkpoint.folders import PARAMS, open_checkpoint
from g2vlm_jax.core.state import TrainState


def flat_params(params: Any) -> dict[str, Any]:
    """nnx.State of parameters -> {'a/b/0/kernel': array} (the stable on-disk naming)."""
    return {"/".join(str(k) for k in path): (v.get_value() if hasattr(v, "get_value") else v)
            for path, v in nnx.to_flat_state(params)}
def save_params(directory: str | pathlib.Path, params: dict[str, Any], metadata: dict) -> pathlib.Path:
    """Writes a params-only Orbax checkpoint: `<dir>/params` (flat name -> array) + `<dir>/metadata.json`."""
    directory = pathlib.Path(directory).absolute()
    directory.mkdir(parents=True, exist_ok=True)
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(directory / "params", params, force=True)
    (directory / "metadata.json").write_text(json.dumps(metadata, indent=1, sort_keys=True))
    return directory


# Parameters the model gained after params checkpoints had been written, each zero-initialised and
# unused by the forward: a checkpoint without one loads it as zeros, with a warning.
ADDED_PARAMETERS = ("dino_model/embeddings/mask_token",)  # kept since 2026-12 for an exact official round trip


def load_params(directory: str | pathlib.Path, target: dict[str, jax.ShapeDtypeStruct] | None = None) -> tuple[dict, dict]:
    """Reads a params-only checkpoint: (flat params, metadata). `target` places arrays with shardings;
    an `ADDED_PARAMETERS` name of `target` that the checkpoint predates comes back as zeros."""
    folder = open_checkpoint(directory, expect=(PARAMS,))
    directory, metadata = folder.path, folder.metadata()
    with ocp.StandardCheckpointer() as checkpointer:
        if not target:
            return checkpointer.restore(directory / "params"), metadata
        stored = set(checkpointer.metadata(directory / "params").item_metadata.keys())
        absent = [name for name in ADDED_PARAMETERS if name in target and name not in stored]
        if absent:
            logging.warning("%s predates parameters %s (unused by the forward); they load as zeros", directory, absent)
        missing = sorted(set(target) - stored - set(absent))
        if missing:
            raise ValueError(f"{directory}: params checkpoint lacks {len(missing)} tensors the model has (first: "
                             f"{missing[:5]}); is it a checkpoint of another model config?")
        params = checkpointer.restore(directory / "params", {k: v for k, v in target.items() if k not in absent})
    for name in absent:
        zeros = np.zeros(target[name].shape, target[name].dtype)
        sharding = getattr(target[name], "sharding", None)
        params[name] = jax.device_put(zeros, sharding) if sharding is not None else zeros
    return params, metadata


def _place(params: nnx.State, flat: dict, where: str, keep: set[str] = frozenset()) -> nnx.State:
    """Returns `params` with every value replaced by `flat[name]`, keeping each leaf's sharding; the names in
    `keep` keep their current values."""
    def load(path, variable):
        name = "/".join(str(k) for k in path)
        if name in keep:
            return variable
        if name not in flat and name in ADDED_PARAMETERS:
            logging.warning("%s predates parameter %s (unused by the forward); it loads as zeros", where, name)
            return variable.replace(jax.numpy.zeros_like(variable.get_value()))
        if name not in flat:
            raise KeyError(f"{where}: parameter {name!r} is missing")
        value, current = flat[name], variable.get_value()
        if tuple(value.shape) != tuple(current.shape):
            raise ValueError(f"{where}: parameter {name!r} has shape {tuple(value.shape)}, the model expects "
                             f"{tuple(current.shape)}")
        return variable.replace(jax.device_put(value.astype(current.dtype), current.sharding))

    return nnx.map_state(load, params)


def initialise_from(state: TrainState, cfg: config_lib.ExperimentConfig) -> TrainState:
    """Loads `cfg.checkpoint.init_from` into the state's trainable and frozen parameters.

    `init_from` may list several params checkpoints separated by commas: each parameter comes from the
    first that has it (stage 2 takes the experts from the stage-1b export and the ViT, which stage 1
    does not have, from `g2vlm init` or a converted release). The semantic image encoder of a checkpoint
    is skipped (logged) when the model has none (`model.use_vit=false`); any other parameter the model
    lacks is an error. A parameter no listed checkpoint has is an error too, except the semantic image
    encoder's: a stage 2 that starts from a stage-1 run alone (the tiny recipe: there is no pretrained
    tiny ViT) keeps its initialisation, with a warning naming the fix for a pretrained one.
    """
    sources = [s.strip() for s in cfg.checkpoint.init_from.split(",") if s.strip()]
    ours = set(flat_params(state.trainable)) | set(flat_params(state.frozen))
    flat: dict = {}
    for where in sources:
        params, metadata = load_params(where)
        skipped = sorted(n for n in params if n not in ours and n.startswith("vit_model/") and not cfg.model.use_vit)
        unexpected = sorted(set(params) - ours - set(skipped))
        if unexpected:
            raise ValueError(f"{where}: {len(unexpected)} parameters the model does not have, e.g. {unexpected[:3]}; "
                             "is this a checkpoint of another model config?")
        if skipped:
            logging.info("%s: skipping its %d semantic-encoder parameters (model.use_vit=false)", where, len(skipped))
        taken = {n: v for n, v in params.items() if n in ours and n not in flat}
        logging.info("initialising %d parameters from %s (%s)", len(taken), where, metadata.get("source", "export"))
        flat.update(taken)
    where = " + ".join(sources)
    fresh = {n for n in ours - set(flat) if n.startswith("vit_model/")}
    if fresh:
        logging.warning("%s: no listed checkpoint has the semantic image encoder; its %d parameters keep their "
                        "random initialisation. For a pretrained one list a checkpoint that has it after the "
                        "first: checkpoint.init_from=STAGE1_EXPORT,VIT_SOURCE (`g2vlm init` or a converted release)",
                        where, len(fresh))
    return state.replace(trainable=_place(state.trainable, flat, where, keep=fresh),
                         frozen=_place(state.frozen, flat, where, keep=fresh))
