"""Depth metrics (SPEC 5): AbsRel, SqRel, RMSE, log-RMSE and δ thresholds after scale alignment.

Protocol notes (decided here, tested in tests/test_metrics_depth.py):
- Valid pixels: mask ∧ finite(gt) ∧ gt > 0, and gt <= max_depth when a cap is given (Sintel: 70).
  The prediction must be finite on every valid pixel; otherwise a ValueError (a model that outputs
  NaN must not be scored on the pixels it happened to get right).
- Alignment of the prediction to the ground truth, fitted on valid pixels:
    'median'     s = median(gt) / median(pred)
    'l1_scale'   the L1-optimal scale of the released evaluation: 10 IRLS (Weiszfeld) steps from
                 s0 = mean(gt) / mean(pred), each s = Σ w·p·g / Σ w·p² with w = 1 / (|s·p − g| + 1e-8)
    'scale_shift' least squares for s, b in s·p + b ≈ g
    'lad_scale_shift' the released video-depth "scale&shift" (`align_with_lad2` of the π³ / CUT3R /
                 MonST3R evaluation): Adam (lr 1e-4, betas 0.9 / 0.999, eps 1e-8) on Σ|s·p + b − g| from
                 s = median(g) / median(p), b = 0, at most 1000 steps, stopping once the loss changes by
                 < 1e-6. Adam moves each parameter by about lr per step, so b stays within ±0.1 and s
                 near its median start: the published numbers are of this alignment, not of a full fit
    'none'       metric depth, used as is.
  Depth predictions must be positive, so for the scale-only alignments the prediction is first
  clipped to ≥ 1e-6 (a non-positive median would otherwise flip or blow up the scale).
- After alignment the prediction is clipped to [1e-6, max_depth] (the cap as in the Sintel
  protocol, which clips aligned predictions to 70 m; no upper clip without a cap). The lower clip
  keeps the ratio and log metrics finite and counts non-positive depths as badly wrong.
- No valid pixel: every metric is NaN and num_valid is 0; `aggregate_depth_metrics` skips such
  entries (a neutral value rather than an error, since a view can legitimately have no GT depth).
- δ metrics are fractions in [0, 1]; averages over images are weighted by valid pixels.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRIC_KEYS = ("abs_rel", "sq_rel", "rmse", "log_rmse", "delta_1.25", "delta_1.25^2", "delta_1.25^3")
ALIGNMENTS = ("median", "l1_scale", "scale_shift", "lad_scale_shift", "none")
MIN_DEPTH = 1e-6  # metres: the floor for predicted depths (see module notes)
IRLS_STEPS = 10
LAD_LR, LAD_MAX_STEPS, LAD_TOL = 1e-4, 1000, 1e-6  # the released evaluation's Adam settings
ADAM_BETAS, ADAM_EPS = (0.9, 0.999), 1e-8  # torch.optim.Adam's defaults, which the release uses


def _check_inputs(pred, gt, mask) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if gt.ndim != 2:
        raise ValueError(f"depth_metrics: gt must be a depth map float[H, W], got shape {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"depth_metrics: pred shape {pred.shape} must equal gt shape {gt.shape}")
    if mask is None:
        mask = np.ones(gt.shape, dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != gt.shape:
        raise ValueError(f"depth_metrics: mask shape {mask.shape} must equal gt shape {gt.shape}")
    return pred, gt, mask.astype(bool)


def _l1_scale(p: np.ndarray, g: np.ndarray) -> float:
    """argmin_s Σ|s·p − g| by IRLS from s0 = mean(g)/mean(p); p, g: float[N] with p > 0."""
    s = g.mean() / p.mean()
    for _ in range(IRLS_STEPS):
        w = 1.0 / (np.abs(s * p - g) + 1e-8)
        s = np.sum(w * p * g) / np.sum(w * p * p)
    return float(s)


def _lad_scale_shift(p: np.ndarray, g: np.ndarray, max_steps: int = LAD_MAX_STEPS) -> tuple[float, float]:
    """Adam on the L1 loss Σ|s·p + b − g| as the released evaluation runs it (module notes); p, g: float[N]."""
    # a non-positive median prediction (a collapsed model) starts from the floor, not an infinite scale
    params = np.array([np.median(g) / max(float(np.median(p)), MIN_DEPTH), 0.0])
    m, v = np.zeros(2), np.zeros(2)
    (b1, b2), previous = ADAM_BETAS, None
    for step in range(1, max_steps + 1):
        residual = params[0] * p + params[1] - g
        signs = np.sign(residual)  # d|x|/dx, 0 at 0 as in torch
        loss, grad = float(signs @ residual), np.array([signs @ p, signs.sum()])  # sign(r)·r = |r|
        m = b1 * m + (1 - b1) * grad
        v = b2 * v + (1 - b2) * grad * grad
        params = params - LAD_LR * (m / (1 - b1 ** step)) / (np.sqrt(v / (1 - b2 ** step)) + ADAM_EPS)
        if previous is not None and abs(previous - loss) < LAD_TOL:  # checked after the step, as released
            break
        previous = loss
    return float(params[0]), float(params[1])


def align_depth(pred: np.ndarray, gt: np.ndarray, align: str) -> tuple[float, float]:
    """Scale and shift (s, b) with s·pred + b ≈ gt; pred, gt: float[N] of valid pixels."""
    if align == "none":
        return 1.0, 0.0
    if align == "scale_shift":
        design = np.stack([pred, np.ones_like(pred)], axis=1)
        (s, b), *_ = np.linalg.lstsq(design, gt, rcond=None)
        return float(s), float(b)
    if align == "lad_scale_shift":
        return _lad_scale_shift(pred, gt)
    pred = np.maximum(pred, MIN_DEPTH)
    if align == "median":
        return float(np.median(gt) / np.median(pred)), 0.0
    if align == "l1_scale":
        return _l1_scale(pred, gt), 0.0
    raise ValueError(f"depth_metrics: align must be one of {ALIGNMENTS}, got {align!r}")


def depth_metrics(pred, gt, mask=None, align: str = "median", max_depth: float | None = None) -> dict:
    """Metrics of one depth map.

    pred, gt: float[H, W] depths (gt in metres, 0 / non-finite = no value); mask: bool[H, W] or None
    (all pixels); align: one of ALIGNMENTS; max_depth: cap in metres or None.
    Returns {abs_rel, sq_rel, rmse, log_rmse, delta_1.25, delta_1.25^2, delta_1.25^3: float,
    num_valid: int}.
    """
    if align not in ALIGNMENTS:
        raise ValueError(f"depth_metrics: align must be one of {ALIGNMENTS}, got {align!r}")
    if max_depth is not None and not max_depth > 0:
        raise ValueError(f"depth_metrics: max_depth must be > 0 or None, got {max_depth}")
    pred, gt, mask = _check_inputs(pred, gt, mask)
    with np.errstate(invalid="ignore"):
        valid = mask & np.isfinite(gt) & (gt > 0)
        if max_depth is not None:
            valid &= gt <= max_depth
    num_valid = int(valid.sum())
    if num_valid == 0:
        return {**{k: float("nan") for k in METRIC_KEYS}, "num_valid": 0}
    p, g = pred[valid], gt[valid]
    bad = int((~np.isfinite(p)).sum())
    if bad:
        raise ValueError(f"depth_metrics: pred has {bad} non-finite values on valid GT pixels; "
                         "fix the model output (NaN/inf) before scoring")
    s, b = align_depth(p, g, align)
    p = np.clip(s * p + b, MIN_DEPTH, max_depth if max_depth is not None else np.inf)
    return {**_error_metrics(p, g), "num_valid": num_valid}


def _error_metrics(p: np.ndarray, g: np.ndarray) -> dict:
    """The standard depth errors of aligned positive depths p, g: float[N]."""
    diff = p - g
    ratio = np.maximum(p / g, g / p)
    return {
        "abs_rel": float(np.mean(np.abs(diff) / g)),
        "sq_rel": float(np.mean(diff ** 2 / g)),
        "rmse": float(np.sqrt(np.mean(diff ** 2))),
        "log_rmse": float(np.sqrt(np.mean((np.log(p) - np.log(g)) ** 2))),
        "delta_1.25": float(np.mean(ratio < 1.25)),
        "delta_1.25^2": float(np.mean(ratio < 1.25 ** 2)),
        "delta_1.25^3": float(np.mean(ratio < 1.25 ** 3)),
    }


def aggregate_depth_metrics(per_image: Sequence[dict]) -> dict:
    """Valid-pixel-weighted mean of `depth_metrics` results; entries with num_valid 0 are skipped.

    Returns the same keys; num_valid is the total. No counted pixel at all -> NaN metrics, num_valid 0.
    """
    counted = [m for m in per_image if m["num_valid"] > 0]
    total = int(sum(m["num_valid"] for m in counted))
    if total == 0:
        return {**{k: float("nan") for k in METRIC_KEYS}, "num_valid": 0}
    weights = np.array([m["num_valid"] for m in counted], dtype=np.float64) / total
    out = {k: float(np.dot(weights, [m[k] for m in counted])) for k in METRIC_KEYS}
    return {**out, "num_valid": total}
