"""Train-state checkpoints of a run: train state + data-iterator state + run metadata, restorable onto any mesh.

Layout of a run directory:

    <workdir>/checkpoints/<step>/state      sharded train state (Orbax StandardCheckpointHandler)
    <workdir>/checkpoints/<step>/data       data-iterator state (JSON), so a resume sees the same batches
    <workdir>/checkpoints/<step>/metadata   experiment config + model fingerprint (JSON)

(`checkpoint.directory` moves <workdir>/checkpoints elsewhere, e.g. to gs://BUCKET/runs/NAME/checkpoints.)

The manager is opened with explicit item handlers, so a restore needs no knowledge of the topology
that wrote the checkpoint: the caller passes the *target* shardings (any mesh shape) and Orbax
reads each shard it needs. A step directory becomes visible only after Orbax finalises it, so a crash
during an (async) write never leaves a checkpoint that `latest_step` would pick.
"""
from __future__ import annotations

import json
import pathlib
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from g2vlm_jax import config as config_lib
from g2vlm_jax import meeting
from g2vlm_jax import tokenizer as tokenizer_lib

ITEMS = ("state", "data", "metadata")


class CheckpointMismatchError(ValueError):
    """The checkpoint was written for a different model configuration."""


def checkpoint_path(directory: str | pathlib.Path) -> epath.Path:
    """A checkpoint directory as Orbax takes it: URLs (gs://, s3://) as given, local paths absolute."""
    path = epath.Path(directory)
    return path if "://" in str(directory) else epath.Path(pathlib.Path(directory).absolute())


def make_manager(directory: str | pathlib.Path, ckpt: config_lib.CheckpointConfig, *,
                 read_only: bool = False) -> ocp.CheckpointManager:
    """A CheckpointManager keeping the newest `keep_last` plus every `keep_every`-th step.
    `directory` may be local or any URL Orbax writes (gs://BUCKET/..., through tensorstore)."""
    options = ocp.CheckpointManagerOptions(
        max_to_keep=ckpt.keep_last,
        keep_period=ckpt.keep_every or None,
        enable_async_checkpointing=ckpt.async_save,
        create=not read_only,
        read_only=read_only,
    )
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "metadata": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(checkpoint_path(directory), item_names=ITEMS, item_handlers=handlers,
                                 options=options)


def run_metadata(cfg: config_lib.ExperimentConfig) -> dict:
    metadata = {"config": config_lib.to_dict(cfg), "model_fingerprint": config_lib.model_fingerprint(cfg.model)}
    if tokenizer_lib.is_builtin(cfg.data.tokenizer):
        metadata["builtin_tokenizer_sha256"] = tokenizer_lib.builtin_fingerprint()
    return metadata


def save(manager: ocp.CheckpointManager, step: int, state: Any, data_state: dict, cfg: config_lib.ExperimentConfig,
         *, force: bool = False) -> bool:
    """Starts saving `state` and the iterator state at `step` (async if configured)."""
    args = ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
                              metadata=ocp.args.JsonSave(run_metadata(cfg)))
    saved = manager.save(step, args=args, force=force)
    if saved:
        logging.info("checkpoint: saving step %d to %s", step, manager.directory)
    return saved


def _abstract_with_shardings(abstract_state: Any, shardings: Any) -> Any:
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                  abstract_state, shardings)


def read_metadata(manager: ocp.CheckpointManager, step: int) -> dict:
    restored = manager.restore(step, args=ocp.args.Composite(metadata=ocp.args.JsonRestore()))
    return restored.metadata


def check_compatible(metadata: dict, cfg: config_lib.ExperimentConfig, where: str) -> None:
    """Raises CheckpointMismatchError when the checkpoint's model shapes differ from `cfg.model`."""
    theirs = metadata.get("model_fingerprint")
    ours = config_lib.model_fingerprint(cfg.model)
    if theirs != ours:
        a, b = json.loads(theirs or "{}"), json.loads(ours)
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        raise CheckpointMismatchError(
            f"checkpoint {where} was written for another model config (differs in {diff}); "
            "use the experiment that wrote it, or convert/initialise with checkpoint.init_from instead")
    if tokenizer_lib.is_builtin(cfg.data.tokenizer) \
            and metadata.get("builtin_tokenizer_sha256") != tokenizer_lib.builtin_fingerprint():
        raise CheckpointMismatchError(
            f"checkpoint {where} was trained with another version of the built-in tokenizer "
            "(g2vlm_jax/assets/tiny_sp.model; it gained every printable ASCII character on 2026-12-06), so its "
            "token ids mean other text now; train the run again with this version")


def _leaf_names(tree: Any) -> set[tuple[str, ...]]:
    """The key path of every leaf, as plain names (dict keys, attribute names, indexes)."""
    def names(path):
        return tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)

    return {names(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def check_same_tree(manager: ocp.CheckpointManager, step: int, abstract_state: Any, where: str) -> None:
    """Raises CheckpointMismatchError when the stored train state has other leaves than the model's
    (a checkpoint written by a version of the code with other parameters, e.g. before the DINO mask
    token was kept): one line naming them, instead of an unreadable-checkpoint fallback."""
    stored = _leaf_names(manager.item_metadata(step)["state"])
    ours = _leaf_names(abstract_state)
    missing, extra = sorted(ours - stored), sorted(stored - ours)
    if missing or extra:
        shown = lambda names: ", ".join("/".join(n) for n in names[:3]) + (" ..." if len(names) > 3 else "")
        raise CheckpointMismatchError(
            f"checkpoint {where} holds another parameter tree than this version of g2vlm_jax builds (it lacks "
            f"{len(missing)}: {shown(missing) or '-'}; it has {len(extra)} more: {shown(extra) or '-'}); finish or "
            "export it with the version that wrote it, then continue from the export with checkpoint.init_from")


def restore(manager: ocp.CheckpointManager, step: int, abstract_state: Any, shardings: Any,
            cfg: config_lib.ExperimentConfig) -> tuple[Any, dict]:
    """Restores (state, data_state) of `step` onto `shardings` (any mesh), after a config and tree check."""
    where = f"{manager.directory}/{step}"
    check_compatible(read_metadata(manager, step), cfg, where)
    check_same_tree(manager, step, abstract_state, where)
    target = _abstract_with_shardings(abstract_state, shardings)
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target),
                                                             data=ocp.args.JsonRestore()))
    return restored.state, restored.data


def restore_latest(manager: ocp.CheckpointManager, state: Any, shardings: Any,
                   cfg: config_lib.ExperimentConfig, *,
                   set_aside_unreadable: bool = False) -> tuple[int, Any, dict] | None:
    """Restores the newest *readable* checkpoint: (step, state, data_state), or None if there is none.

    A newest checkpoint that fails to read (truncated or corrupted files) is reported with a warning
    naming it and the previous one is tried; nothing is deleted (`set_aside_unreadable`: the trainer
    renames the unreadable ones, see `_set_aside`). A checkpoint of another model config is an
    error, not a fallback.
    """
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    unreadable = []
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            restored_state, data_state = restore(manager, step, abstract, shardings, cfg)
        except CheckpointMismatchError:
            raise
        except Exception as e:  # noqa: BLE001 - any read failure means "not a usable checkpoint"
            logging.warning("checkpoint %s/%d is unreadable (%s: %s); falling back to the previous one",
                            manager.directory, step, type(e).__name__, (str(e).splitlines() or [""])[0][:200])
            unreadable.append(step)
            continue
        if set_aside_unreadable:
            _set_aside(manager, unreadable)
        return step, restored_state, data_state
    return None


def _set_aside(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    """Renames unreadable step directories to `<step>.unreadable` (kept for inspection, never deleted).

    Without this the resumed run could not save those steps again (Orbax refuses an existing step)
    and a later restart would try them first again. Only the trainer asks for this (eval and
    inference open checkpoints read-only and leave them as they are).
    """
    if not steps:
        return
    if jax.process_index() == 0:
        for step in steps:
            src = epath.Path(manager.directory) / str(step)
            dst = src.with_name(f"{step}.unreadable")
            if src.exists() and not dst.exists():
                src.rename(dst)
                logging.warning("checkpoint %s set aside as %s", src, dst.name)
    meeting.wait("checkpoints set aside")  # the others may not reload before process 0 renamed them
    manager.reload()
