"""The `reconstruction` evaluator: per view depth (AbsRel, delta<1.25 with per-view median scale),
point maps (Acc/Comp/NC after Umeyama Sim(3) alignment of each sample), camera poses (RRA/RTA/AUC
over all view pairs). Each sample is predicted from its views only, as in SPEC 5.
"""
from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils

from g2vlm_jax import config as config_lib
from g2vlm_jax import geometry
from g2vlm_jax import meeting
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.core import data as data_lib
from g2vlm_jax.core import objective
from g2vlm_jax.metrics import depth as depth_metrics
from g2vlm_jax.metrics import pointmap as pointmap_metrics
from g2vlm_jax.metrics import pose as pose_metrics


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
    forward = objective.make_eval_step(spec, cfg, jax.tree.map(lambda x: x.sharding, state), packs)
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
