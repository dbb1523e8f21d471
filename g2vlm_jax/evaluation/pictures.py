"""Pictures written by the evaluators: what a person looks at to trust (or not) the numbers.

- `depth_<i>.png`: per sample and view, the input, GT depth, predicted depth (median-scaled to the
  GT) on one colour scale for every view, with its colour bar (depth units of the data, dark blue =
  near, red = far),
  and the absolute relative error |d̂ − d| / d with its own bar;
- `trajectory_<i>.png`: top-down (x-z) camera centres, numbered, with viewing directions, GT vs the
  prediction after Sim(3) alignment of the camera centres; the axes hold every camera and arrow;
- `qa_accuracy.png`: the spatial-QA score per task family beside its baseline and geometry read-out, as a table.
Every picture's title carries the step it was drawn at. The trainer also logs them to TensorBoard.
"""
from __future__ import annotations

import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from g2vlm_jax import geometry  # noqa: E402

DEPTH_CMAP = "turbo"  # low (near) = dark blue, high (far) = red
ERROR_CMAP = "magma"
MAX_SHOWN_ERROR = 0.5  # abs. rel. error colour scale: 0 .. 50 %


def _depth_figure(pred: dict, gt: dict, path: pathlib.Path, step: int, max_views: int = 4) -> None:
    valid = gt["valid"].astype(bool)
    w2c = geometry.se3_inverse(gt["poses"])
    gt_depth = geometry.transform_points(w2c[:, None, None], gt["world_points"])[..., 2]
    views = min(valid.shape[0], max_views)
    fig, axes = plt.subplots(4, views, figsize=(3 * views + 1.2, 10), squeeze=False)
    depth_image = error_image = None
    shown = valid[:views]
    lo, hi = np.percentile(gt_depth[:views][shown], [2, 98]) if shown.any() else (0.0, 1.0)  # one scale for all
    for v in range(views):
        pz = pred["local_points"][v, ..., 2]
        m = valid[v]
        scale = np.median(gt_depth[v][m]) / max(np.median(pz[m]), 1e-9) if m.any() else 1.0
        error = np.where(m, np.abs(pz * scale - gt_depth[v]) / np.maximum(np.abs(gt_depth[v]), 1e-9), np.nan)
        axes[0, v].imshow(np.clip(gt["image"][v], 0, 1))
        axes[1, v].imshow(np.where(m, gt_depth[v], np.nan), vmin=lo, vmax=hi, cmap=DEPTH_CMAP)
        depth_image = axes[2, v].imshow(pz * scale, vmin=lo, vmax=hi, cmap=DEPTH_CMAP)
        error_image = axes[3, v].imshow(error, vmin=0.0, vmax=MAX_SHOWN_ERROR, cmap=ERROR_CMAP)
        axes[0, v].set_title(f"view {v}")
    for row, label in enumerate(("input", "GT depth", "predicted depth\n(median-scaled)", "abs. rel. error")):
        axes[row, 0].set_ylabel(label)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(depth_image, ax=axes[1:3, :].ravel().tolist(), fraction=0.03,
                 label="depth (data units; blue = near, red = far)")
    fig.colorbar(error_image, ax=axes[3, :].ravel().tolist(), fraction=0.03, label="|d̂ − d| / d (white: >= 50 %)",
                 extend="max")
    fig.suptitle(f"depth, step {step} (gaps: no GT)")
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _trajectory_figure(pred: dict, gt: dict, path: pathlib.Path, step: int) -> None:
    gt_c = gt["poses"][:, :3, 3]
    pr_c = pred["camera_poses"][:, :3, 3]
    pr_dirs = pred["camera_poses"][:, :3, 2]
    if len(gt_c) >= 3 and np.linalg.matrix_rank(gt_c - gt_c.mean(0)) >= 1:
        try:
            s, r, t = geometry.umeyama(pr_c, gt_c)
            pr_c = geometry.apply_sim3(s, r, t, pr_c)
            pr_dirs = (r @ pr_dirs.T).T
        except ValueError:
            pass
    gt_dirs = gt["poses"][:, :3, 2]
    centres = np.concatenate([gt_c, pr_c])[:, [0, 2]]
    span = max(float(np.ptp(centres, axis=0).max()), 1e-3)
    arrow = 0.12 * span  # every arrow the same length, in the plot's units
    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    for c, d, colour, label in ((gt_c, gt_dirs, "tab:green", "GT"),
                                (pr_c, pr_dirs, "tab:red", "predicted (Sim3-aligned)")):
        xz = d[:, [0, 2]] / np.maximum(np.linalg.norm(d[:, [0, 2]], axis=1, keepdims=True), 1e-9) * arrow
        ax.scatter(c[:, 0], c[:, 2], color=colour, label=label, zorder=3)
        ax.quiver(c[:, 0], c[:, 2], xz[:, 0], xz[:, 1], color=colour, angles="xy", scale_units="xy", scale=1,
                  width=0.004)
        for i, (x, z) in enumerate(c[:, [0, 2]]):
            ax.annotate(str(i), (x, z), textcoords="offset points", xytext=(4, 4), fontsize=8, color=colour)
    lo, hi = centres.min(0) - arrow * 1.5, centres.max(0) + arrow * 1.5
    middle, half = (lo + hi) / 2, max(hi - lo) / 2  # a square window around every camera and arrow
    ax.set_xlim(middle[0] - half, middle[0] + half)
    ax.set_ylim(middle[1] - half, middle[1] + half)
    ax.set_aspect("equal")
    ax.set_xlabel("x")
    ax.set_ylabel("z")
    ax.legend(loc="best", fontsize=8)
    ax.set_title(f"camera centres and view directions, top-down, step {step}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def reconstruction_pictures(examples: list, out_dir: pathlib.Path, step: int) -> list[str]:
    """Writes depth and trajectory pictures for each example; returns their file names."""
    names = []
    for i, (pred, gt) in enumerate(examples):
        for kind, fn in (("depth", _depth_figure), ("trajectory", _trajectory_figure)):
            path = out_dir / f"{kind}_{i}.png"
            fn(pred, gt, path, step)
            names.append(path.name)
    return names


def accuracy_table(qa_report: dict, out_dir: pathlib.Path, step: int) -> list[str]:
    """Writes `qa_accuracy.png`: one row per task family with its score, baseline, geometry read-out (where
    the report has them), metric and sample count."""
    def cell(values: dict, key: str) -> str:
        return f"{values[key]:.3f}" if key in values else "-"

    rows = [(task, cell(v, "score"), cell(v, "baseline"), cell(v, "geometry_readout"), v["metric"], str(v["count"]))
            for task, v in sorted(qa_report["per_task"].items())]
    rows.append(("overall", cell(qa_report, "overall"), cell(qa_report, "overall_baseline"), "", "",
                 str(qa_report["num_questions"])))
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.4 * len(rows)))
    ax.axis("off")
    table = ax.table(cellText=rows, colLabels=("task", "score", "baseline", "geometry read-out", "metric", "questions"),
                     loc="center")
    table.scale(1, 1.4)
    ax.set_title(f"spatial QA on the held-out split, step {step}")
    fig.tight_layout()
    path = out_dir / "qa_accuracy.png"
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return [path.name]
