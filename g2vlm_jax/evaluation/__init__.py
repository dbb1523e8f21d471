"""Evaluators declared in the experiment (`eval.evaluators`, names in config.EVALUATORS), run on held-out splits.

- `reconstruction` (evaluation/reconstruction.py): depth, point maps and camera poses of held-out scenes.
- `spatial_qa` (evaluation/spatial_qa.py): greedy answers from the chat decoder scored by MRA
  (numeric) and option-letter accuracy (multiple choice), per task family.

Output: `<workdir>/eval/report.json` (+ `report_step<N>.json` per evaluation; a second evaluation of
the same step writes `report_step<N>.2.json`, never over an earlier report), TensorBoard scalars
through the trainer's logger, pictures a person wants to look at (evaluation/pictures.py), and
every spatial-QA answer with its question, reference and score (`spatial_qa_answers_step<N>.jsonl`).

The trainer does not import this package: `g2vlm train` hands it `training_hook(cfg)` (see
training/loop.py `train(..., evaluate=...)`).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
from typing import Callable

import jax

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import config as config_lib
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.core import state as state_lib
from g2vlm_jax.evaluation import pictures, reconstruction, spatial_qa

@dataclasses.dataclass(frozen=True)
class Evaluator:
    """run(spec, cfg, state, num_batches=) -> (report, examples); draw(report, examples, out_dir, step) -> picture
    names; `answers`: when set, every example is written as one JSON line to eval/<answers>_step<N>.jsonl."""

    run: Callable
    draw: Callable
    answers: str = ""


EVALUATORS: dict[str, Evaluator] = {
    "reconstruction": Evaluator(reconstruction.run_reconstruction,
                                lambda report, examples, out, step: pictures.reconstruction_pictures(examples, out, step)),
    "spatial_qa": Evaluator(spatial_qa.run_spatial_qa,
                            lambda report, examples, out, step: pictures.accuracy_table(report, out, step),
                            answers="spatial_qa_answers"),
}
assert tuple(EVALUATORS) == config_lib.EVALUATORS, "every evaluator the config accepts has an implementation"


def run_evaluators(spec, cfg: config_lib.ExperimentConfig, state, workdir: pathlib.Path, *, step: int,
                   write_pictures: bool) -> dict:
    """Runs every evaluator of `cfg.eval`, writes the JSON report (and pictures), returns the report.

    Every process of a multi-process run calls it (each evaluates its share); process 0 writes.
    """
    out_dir = pathlib.Path(workdir) / "eval"
    writer = jax.process_index() == 0
    write_pictures = write_pictures and writer
    if writer:
        out_dir.mkdir(parents=True, exist_ok=True)
    report = {"experiment": cfg.name, "step": step, "split": cfg.data.eval_split}
    tag = _fresh_tag(out_dir, step) if writer else ""
    for name in cfg.eval.evaluators:
        evaluator = EVALUATORS[name]
        report[name], examples = evaluator.run(spec, cfg, state, num_batches=cfg.eval.num_batches)
        if writer and evaluator.answers:
            (out_dir / f"{evaluator.answers}_step{step}{tag}.jsonl").write_text(
                "".join(json.dumps(e, sort_keys=True, default=float) + "\n" for e in examples))
        if write_pictures:
            report[name]["pictures"] = evaluator.draw(report[name], examples, out_dir, step)
    if writer:
        text = json.dumps(report, indent=1, sort_keys=True, default=float)
        (out_dir / f"report_step{step}{tag}.json").write_text(text)
        if write_pictures:
            (out_dir / "report.json").write_text(text)  # the newest final report (each is also kept by step)
    return report


def _fresh_tag(out_dir: pathlib.Path, step: int) -> str:
    """'' for the first evaluation of `step`, '.2', '.3', ... for later ones: a report is never overwritten."""
    tag, k = "", 1
    while (out_dir / f"report_step{step}{tag}.json").exists():
        k += 1
        tag = f".{k}"
    return tag


def _open(cfg: config_lib.ExperimentConfig, run_dir: str | pathlib.Path) -> ckpt_lib.CheckpointFolder:
    # The run's checkpoints: `checkpoint.directory` when the experiment moved them (e.g. to gs://).
    return ckpt_lib.open_checkpoint(run_dir, expect=(ckpt_lib.RUN, ckpt_lib.PARAMS), checkpoints=cfg.checkpoint.directory)


def _report_root(cfg: config_lib.ExperimentConfig, folder: ckpt_lib.CheckpointFolder) -> pathlib.Path:
    """A training run's own directory; for params-only weights (an export or a conversion, left as
    written) the experiment's run directory."""
    return folder.path if folder.kind == ckpt_lib.RUN else cfg.run_dir


def eval_dir(cfg: config_lib.ExperimentConfig, run_dir: str | pathlib.Path) -> pathlib.Path:
    """Where `evaluate_checkpoint` writes its report and pictures."""
    return _report_root(cfg, _open(cfg, run_dir)) / "eval"


def evaluate_checkpoint(cfg: config_lib.ExperimentConfig, run_dir: str | pathlib.Path, *, step: int | None = None) -> dict:
    """Restores a run's checkpoint (newest readable one, or `step`) and runs every evaluator of `cfg`.

    The report and pictures go to `eval_dir(cfg, run_dir)`.
    """
    folder = _open(cfg, run_dir)
    out_root = _report_root(cfg, folder)
    mesh = sharding_lib.make_mesh(cfg.mesh)
    spec, state, shardings = state_lib.create_train_state(cfg, mesh)
    if folder.kind == ckpt_lib.PARAMS:  # exported or converted weights: the experiment gives everything else
        cfg_from = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=str(folder.path)))
        state = ckpt_lib.initialise_from(state, cfg_from)
        return run_evaluators(spec, cfg, state, out_root, step=step or 0, write_pictures=True)
    checkpoints = folder.checkpoints
    manager = ckpt_lib.make_manager(checkpoints, cfg.checkpoint, read_only=True)
    if step is None:
        restored = ckpt_lib.restore_latest(manager, state, shardings, cfg)
        if restored is None:
            raise FileNotFoundError(f"{checkpoints} holds no readable checkpoint")
        step, state, _ = restored
    else:
        if step not in manager.all_steps():
            raise FileNotFoundError(f"{checkpoints} has no checkpoint of step {step}; its steps are "
                                    f"{sorted(manager.all_steps())} (omit --step for the newest readable one)")
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        state, _ = ckpt_lib.restore(manager, step, abstract, shardings, cfg)
    return run_evaluators(spec, cfg, state, out_root, step=step, write_pictures=True)


def training_hook(cfg: config_lib.ExperimentConfig) -> Callable:
    """The trainer's `evaluate` hook: (spec, state, step, final) -> report, run on every process.

    Writes `report_step<step>.json`; the final evaluation also writes `report.json` and the pictures.
    """
    def evaluate(spec, state, step: int, final: bool) -> dict:
        return run_evaluators(spec, cfg, state, cfg.run_dir, step=step, write_pictures=final)

    return evaluate
