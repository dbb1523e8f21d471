"""Pictures written by the evaluators: what a person looks at to trust (or not) the numbers.

- `depth_<i>.png`: per sample, the input views, GT depth and predicted depth (median-scaled to GT)
  side by side, with a shared colour scale per view;
- `trajectory_<i>.png`: top-down (x-z) camera centres and viewing directions, GT vs prediction
  after Sim(3) alignment of the camera centres;
- `qa_accuracy.png`: the spatial-QA score per task family as a table.
"""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from g2vlm_jax import geometry  # noqa: E402


def _depth_figure(pred: dict, gt: dict, path: pathlib.Path, max_views: int = 4) -> None:
    valid = gt["valid"].astype(bool)
    w2c = geometry.se3_inverse(gt["poses"])
    gt_depth = geometry.transform_points(w2c[:, None, None], gt["world_points"])[..., 2]
    views = min(valid.shape[0], max_views)
    fig, axes = plt.subplots(3, views, figsize=(3 * views, 8), squeeze=False)
    for v in range(views):
        pz = pred["local_points"][v, ..., 2]
        m = valid[v]
        scale = np.median(gt_depth[v][m]) / max(np.median(pz[m]), 1e-9) if m.any() else 1.0
        lo, hi = (np.percentile(gt_depth[v][m], [2, 98]) if m.any() else (0.0, 1.0))
        axes[0, v].imshow(np.clip(gt["image"][v], 0, 1))
        axes[1, v].imshow(np.where(m, gt_depth[v], np.nan), vmin=lo, vmax=hi, cmap="turbo")
        axes[2, v].imshow(pz * scale, vmin=lo, vmax=hi, cmap="turbo")
        axes[0, v].set_title(f"view {v}")
    for row, label in enumerate(("input", "GT depth", "predicted depth (median-scaled)")):
        axes[row, 0].set_ylabel(label)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _trajectory_figure(pred: dict, gt: dict, path: pathlib.Path) -> None:
    gt_c = gt["poses"][:, :3, 3]
    pr_c = pred["camera_poses"][:, :3, 3]
    if len(gt_c) >= 3 and np.linalg.matrix_rank(gt_c - gt_c.mean(0)) >= 1:
        try:
            s, r, t = geometry.umeyama(pr_c, gt_c)
            pr_c = geometry.apply_sim3(s, r, t, pr_c)
            pr_dirs = (r @ pred["camera_poses"][:, :3, 2].T).T
        except ValueError:
            pr_dirs = pred["camera_poses"][:, :3, 2]
    else:
        pr_dirs = pred["camera_poses"][:, :3, 2]
    gt_dirs = gt["poses"][:, :3, 2]
    fig, ax = plt.subplots(figsize=(5, 5))
    span = max(np.ptp(gt_c[:, [0, 2]]), 1e-3)
    for c, d, colour, label in ((gt_c, gt_dirs, "tab:green", "GT"), (pr_c, pr_dirs, "tab:red", "predicted (Sim3-aligned)")):
        ax.plot(c[:, 0], c[:, 2], "o-", color=colour, label=label)
        ax.quiver(c[:, 0], c[:, 2], d[:, 0], d[:, 2], color=colour, angles="xy", scale_units="xy", scale=4 / span)
    ax.set_xlabel("x")
    ax.set_ylabel("z")
    ax.set_aspect("equal", adjustable="datalim")
    ax.legend()
    ax.set_title("camera trajectory, top-down")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def reconstruction_pictures(examples: list, out_dir: pathlib.Path) -> list[str]:
    """Writes depth and trajectory pictures for each example; returns their file names."""
    names = []
    for i, (pred, gt) in enumerate(examples):
        for kind, fn in (("depth", _depth_figure), ("trajectory", _trajectory_figure)):
            path = out_dir / f"{kind}_{i}.png"
            fn(pred, gt, path)
            names.append(path.name)
    return names


def accuracy_table(qa_report: dict, out_dir: pathlib.Path) -> list[str]:
    """Writes `qa_accuracy.png`: one row per task family with its metric and sample count."""
    rows = [(task, f"{v['score']:.3f}", v["metric"], str(v["count"])) for task, v in sorted(qa_report["per_task"].items())]
    rows.append(("overall", f"{qa_report['overall']:.3f}", "", str(qa_report["num_questions"])))
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.4 * len(rows)))
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=("task", "score", "metric", "questions"), loc="center")
    table.scale(1, 1.4)
    fig.tight_layout()
    path = out_dir / "qa_accuracy.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path.name]
