"""Evaluators declared in the experiment (`eval.evaluators`), run on held-out splits.

- `reconstruction`: per view depth (AbsRel, delta<1.25 with per-view median scale), point maps
  (Acc/Comp/NC after Umeyama Sim(3) alignment of each sample), camera poses (RRA/RTA/AUC over all
  view pairs). Each sample is predicted from its views only, as in SPEC 5.
- `spatial_qa`: greedy answers from the chat decoder scored by MRA (numeric) and option-letter
  accuracy (multiple choice), per task family.

Output: `<workdir>/eval/report.json` (+ `report_step<N>.json` during training), TensorBoard scalars
through the caller's logger, and pictures a person wants to look at (depth maps, trajectories, table).
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

import jax
import numpy as np
from jax.experimental import multihost_utils

from g2vlm_jax import config as config_lib
from g2vlm_jax import geometry
from g2vlm_jax import meeting
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.metrics import depth as depth_metrics
from g2vlm_jax.metrics import pointmap as pointmap_metrics
from g2vlm_jax.metrics import pose as pose_metrics
from g2vlm_jax.training import data as data_lib
from g2vlm_jax.training import step as step_lib


def _gt_depth(world_points: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """GT camera-z depth of each view: world points [V,H,W,3], c2w [V,4,4] -> [V,H,W]."""
    w2c = geometry.se3_inverse(c2w.astype(np.float64))
    local = geometry.transform_points(w2c[:, None, None], world_points.astype(np.float64))
    return local[..., 2]


def evaluate_reconstruction_sample(pred: dict, gt: dict) -> dict:
    """Metrics of one sample. pred/gt hold numpy arrays of one sample: points [V,H,W,3], poses [V,4,4]."""
    valid = gt["valid"].astype(bool)
    gt_depth = _gt_depth(gt["world_points"], gt["poses"])
    per_view = [depth_metrics.depth_metrics(pred["local_points"][v, ..., 2], gt_depth[v], valid[v], align="median")
                for v in range(valid.shape[0]) if valid[v].any()]
    out = {"depth": depth_metrics.aggregate_depth_metrics(per_view)}
    if valid.sum() >= 3:
        out["pointmap"] = pointmap_metrics.pointmap_metrics(pred["world_points"], gt["world_points"], valid,
                                                            align="umeyama")
    if valid.shape[0] >= 2:
        out["pose"] = pose_metrics.relative_pose_metrics(pred["camera_poses"], gt["poses"])
    return out


def _mean_of(dicts: list[dict]) -> dict:
    keys = sorted({k for d in dicts for k in d if isinstance(d[k], (int, float))})
    return {k: float(np.nanmean([d[k] for d in dicts if k in d])) for k in keys}


def run_reconstruction(spec, cfg: config_lib.ExperimentConfig, state, *, num_batches: int,
                       keep_examples: int = 2) -> tuple[dict, list]:
    """Runs the model over `num_batches` held-out batches; returns (report, example predictions).

    Each process predicts and scores its own packs (its share of the global batch, as in training);
    the per-sample metrics of every process make one report, the same on every process. The examples
    (for pictures) are this process's.
    """
    mesh = sharding_lib.mesh_of(state)
    packs = sharding_lib.batch_sharding(mesh)
    forward = step_lib.make_eval_step(spec, cfg, jax.tree.map(lambda x: x.sharding, state), packs)
    results, examples = [], []
    vg_total = 0.0
    for batch in data_lib.eval_batches(cfg, num_batches):
        geo, vg_sum = forward(state, data_lib.to_global(batch, packs))
        vg_total += float(meeting.to_host(vg_sum))  # replicated: the sum over every process's packs
        geo = jax.device_get(multihost_utils.global_array_to_host_local_array(geo, mesh, packs.spec))
        for b, s in zip(*np.nonzero(np.asarray(batch.sample_valid))):
            pred = {k: np.asarray(v[b, s], np.float64) for k, v in geo.items()}
            gt = {"world_points": np.asarray(batch.gt_world_points[b, s], np.float64),
                  "valid": np.asarray(batch.gt_valid[b, s]), "poses": np.asarray(batch.gt_poses[b, s], np.float64),
                  "image": np.asarray(batch.geo_images[b, s])}
            results.append(evaluate_reconstruction_sample(pred, gt))
            if len(examples) < keep_examples:
                examples.append((pred, gt))
    results = [r for per_process in meeting.gather("reconstruction results", results) for r in per_process]
    report = {"num_samples": len(results), "vg_loss": vg_total / max(len(results), 1)}
    for part in ("depth", "pointmap", "pose"):
        report[part] = _mean_of([r[part] for r in results if part in r])
    return report, examples


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
    for name in cfg.eval.evaluators:
        if name == "reconstruction":
            report[name], examples = run_reconstruction(spec, cfg, state, num_batches=cfg.eval.num_batches)
            if write_pictures:
                from g2vlm_jax import eval_pictures

                report[name]["pictures"] = eval_pictures.reconstruction_pictures(examples, out_dir)
        elif name == "spatial_qa":
            from g2vlm_jax.inference import qa_eval

            report[name] = qa_eval.run_spatial_qa(spec, cfg, state, num_batches=cfg.eval.num_batches)
            if write_pictures:
                from g2vlm_jax import eval_pictures

                report[name]["pictures"] = eval_pictures.accuracy_table(report[name], out_dir)
    if writer:
        text = json.dumps(report, indent=1, sort_keys=True, default=float)
        (out_dir / f"report_step{step}.json").write_text(text)
        if write_pictures:
            (out_dir / "report.json").write_text(text)
    return report


def flatten_scalars(report: dict, prefix: str = "") -> dict[str, float]:
    """{'reconstruction': {'depth': {'abs_rel': x}}} -> {'reconstruction/depth/abs_rel': x}."""
    flat = {}
    for k, v in report.items():
        if isinstance(v, dict):
            flat.update(flatten_scalars(v, f"{prefix}{k}/"))
        elif isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
            flat[f"{prefix}{k}"] = float(v)
    return flat


def evaluate_checkpoint(cfg: config_lib.ExperimentConfig, run_dir: str | pathlib.Path, *, step: int | None = None) -> dict:
    """Restores a run's checkpoint (newest readable one, or `step`) and runs every evaluator of `cfg`.

    The report and pictures go to `<run_dir>/eval/`.
    """
    from g2vlm_jax import checkpoint as ckpt_lib
    from g2vlm_jax.training import state as state_lib

    run_dir = pathlib.Path(run_dir).absolute()
    params_only = (run_dir / "params").is_dir() and (run_dir / "metadata.json").is_file()
    # The run's checkpoints: `checkpoint.directory` when the experiment moved them (e.g. to gs://).
    checkpoints = cfg.checkpoint.directory or str(run_dir / "checkpoints")
    if not cfg.checkpoint.directory and not (run_dir / "checkpoints").is_dir() and not params_only:
        raise FileNotFoundError(f"{run_dir} has neither a checkpoints/ directory nor params/ + metadata.json; pass the "
                                "run directory of a training run (runs/<experiment name>) or a params-only checkpoint "
                                "(g2vlm export / g2vlm convert)")
    mesh = sharding_lib.make_mesh(cfg.mesh)
    spec, state, shardings = state_lib.create_train_state(cfg, mesh)
    if params_only:  # exported or converted weights: the experiment gives everything but the parameters
        from g2vlm_jax.training import init as init_lib

        cfg_from = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=str(run_dir)))
        state = init_lib.initialise_from(state, cfg_from)
        return run_evaluators(spec, cfg, state, run_dir, step=step or 0, write_pictures=True)
    manager = ckpt_lib.make_manager(checkpoints, cfg.checkpoint, read_only=True)
    if step is None:
        restored = ckpt_lib.restore_latest(manager, state, shardings, cfg)
        if restored is None:
            raise FileNotFoundError(f"{checkpoints} holds no readable checkpoint")
        step, state, _ = restored
    else:
        abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
        state, _ = ckpt_lib.restore(manager, step, abstract, shardings, cfg)
    return run_evaluators(spec, cfg, state, run_dir, step=step, write_pictures=True)
