"""Loading a model for inference from what users have on disk.

`--checkpoint DIR` of `g2vlm chat / reconstruct` accepts either

    a training run directory   DIR/checkpoints/<step>/{state,data,metadata}  (newest readable step)
    a params-only checkpoint   DIR/params + DIR/metadata.json                 (`g2vlm export` / `convert`)

Both carry the experiment config they were written with (metadata "config"), so the model is rebuilt
exactly; `overrides` (`--set key=value`) may change inference-only fields such as
`model.attention_kernel` or `model.compute_dtype`, never shapes (a shape change is an error from the
checkpoint check).
"""
from __future__ import annotations

import dataclasses
import pathlib

import jax
from flax import nnx

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import config as config_lib
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax import tokenizer as tokenizer_lib
from g2vlm_jax.core import state as state_lib


def _config_from_metadata(metadata: dict, where: str, overrides) -> config_lib.ExperimentConfig:
    if "config" not in metadata:
        raise ValueError(f"{where} has no experiment config in its metadata; re-export it with `g2vlm export`")
    cfg = config_lib.from_dict(config_lib.ExperimentConfig, metadata["config"])
    return config_lib.apply_overrides(cfg, list(overrides)) if overrides else cfg


def _relative_tokenizer(cfg: config_lib.ExperimentConfig, base: pathlib.Path) -> config_lib.ExperimentConfig:
    """A tokenizer file given relative to a params-only checkpoint (`g2vlm convert`) is read from there."""
    kind, _, where = cfg.data.tokenizer.partition(":")
    if tokenizer_lib.is_builtin(cfg.data.tokenizer) or pathlib.Path(where).is_absolute() or not (base / where).exists():
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=f"{kind}:{base / where}"))


def load_model(checkpoint: str | pathlib.Path, overrides=(), devices=None) -> tuple[config_lib.ExperimentConfig, nnx.Module]:
    """(experiment config, model with the checkpoint's parameters) from a run dir or a params-only dir.

    `devices`: the devices a run directory's model is placed on (default: all devices of the run);
    processes that run different inputs (the benchmark's units) each pass their `jax.local_devices()`.
    A params-only checkpoint's arrays are not placed on a mesh, so `devices` does not apply to it.
    """
    folder = ckpt_lib.open_checkpoint(checkpoint, expect=(ckpt_lib.RUN, ckpt_lib.PARAMS))
    if folder.kind == ckpt_lib.PARAMS:
        return _load_params_only(folder, overrides)
    return _load_run(folder, overrides, devices)


def _load_run(folder: ckpt_lib.CheckpointFolder, overrides, devices=None) -> tuple[config_lib.ExperimentConfig, nnx.Module]:
    cfg = _config_from_metadata(folder.metadata(), f"the newest checkpoint of {folder.checkpoints}", overrides)
    cfg = dataclasses.replace(cfg, workdir=str(folder.path))
    manager = ckpt_lib.make_manager(folder.checkpoints, cfg.checkpoint, read_only=True)
    mesh = sharding_lib.make_mesh(cfg.mesh, devices)
    spec, state, shardings = state_lib.create_train_state(cfg, mesh)
    restored = ckpt_lib.restore_latest(manager, state, shardings, cfg)
    if restored is None:
        raise FileNotFoundError(f"{folder.checkpoints} holds no readable checkpoint")
    return cfg, spec.model(restored[1])


def _load_params_only(folder: ckpt_lib.CheckpointFolder, overrides) -> tuple[config_lib.ExperimentConfig, nnx.Module]:
    from g2vlm_jax.model.g2vlm import G2VLM

    path, metadata = folder.path, folder.metadata()
    cfg = _relative_tokenizer(_config_from_metadata(metadata, str(path), overrides), path)
    ckpt_lib.check_compatible(metadata, cfg, str(path))
    model = nnx.eval_shape(lambda: G2VLM(cfg.model, rngs=nnx.Rngs(0)))
    graphdef, abstract = nnx.split(model)
    target = {k: jax.ShapeDtypeStruct(v.shape, v.dtype) for k, v in ckpt_lib.flat_params(abstract).items()}
    params, _ = ckpt_lib.load_params(path, target)
    flat = nnx.to_flat_state(abstract)
    for key, var in flat:
        var.set_value(params["/".join(str(k) for k in key)])
    return cfg, nnx.merge(graphdef, nnx.from_flat_state(flat))
