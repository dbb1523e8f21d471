"""Relative camera-pose metrics (SPEC 5, Co3Dv2 protocol): RRA@τ, RTA@τ and AUC@τ over all view pairs.

- Pairs: all i < j. The relative pose of a pair is the transform from camera i to camera j,
  w2c_j · c2w_i (what the official metric.py computes in PyTorch3D's row-vector convention as
  inv(M_i) · M_j). It is unchanged when a similarity is applied to the whole scene (its translation
  only scales), so predictions in any world frame and scale are compared without alignment.
- Rotation error: geodesic angle between the GT and predicted relative rotations via unit
  quaternions, 2·arccos|<q, q̂>| in degrees.
- Translation error: angle between the relative translation directions, folded to min(e, 180 − e)
  (the sign of a direction is ambiguous). A zero-length translation has no direction; as in the
  official code it then scores 90° (the worst folded error).
- RRA@τ / RTA@τ: percent of pairs with error < τ. AUC@τ: 100 × mean over the 1° bins [k, k+1),
  k = 0..τ−1, of the cumulative fraction of pairs whose max(eR, et) falls in a bin up to k (a
  histogram with edges 0..τ, as VGGT's calculate_auc_np; its last bin includes τ itself).
  All three are percentages, as the papers report them.
- Poses are c2w [V, 4, 4] with orthonormal rotation blocks; fewer than 2 views, NaN/inf or a
  non-rotation block raise ValueError.
- Trajectory metrics (`trajectory_metrics`, the ATE / RPE of the MonST3R / π³ video-pose tables,
  which call evo with align=True, correct_scale=True, delta = 1 frame): the predicted trajectory is
  first moved by the Umeyama Sim(3) that best maps its camera centres onto the GT centres; ATE =
  RMSE of the centre distances (a prediction with every camera centre in one place has no scale to fit:
  it maps onto the GT centroid, geometry.similarity_or_centroid, and scores the GT trajectory's spread,
  where evo would stop the whole evaluation); RPE compares consecutive-frame motions, E_i = (G_i⁻¹G_{i+1})⁻¹
  (P_i⁻¹P_{i+1}): RPE-trans = RMSE of |translation(E_i)|, RPE-rot = RMSE of angle(E_i) in degrees.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from g2vlm_jax import geometry

ORTHONORMAL_TOL = 1e-3


def _check_poses(poses, name: str) -> np.ndarray:
    poses = np.asarray(poses, dtype=np.float64)
    if poses.ndim != 3 or poses.shape[1:] != (4, 4):
        raise ValueError(f"relative_pose_metrics: {name} must be float[V, 4, 4] camera-to-world poses, "
                         f"got {poses.shape}")
    if poses.shape[0] < 2:
        raise ValueError(f"relative_pose_metrics: {name} has {poses.shape[0]} view(s); "
                         "relative poses need at least 2")
    if not np.isfinite(poses).all():
        raise ValueError(f"relative_pose_metrics: {name} contains NaN/inf")
    r = poses[:, :3, :3]
    off = np.abs(np.swapaxes(r, 1, 2) @ r - np.eye(3)).max()
    if off > ORTHONORMAL_TOL or (np.linalg.det(r) < 0).any():
        raise ValueError(f"relative_pose_metrics: {name} rotation blocks are not rotations (|RᵀR − I| = {off:.3g} or "
                         "det < 0); project them with geometry.nearest_rotation first")
    return poses


def relative_poses(c2w: np.ndarray) -> np.ndarray:
    """Camera i -> camera j transforms w2c_j · c2w_i for all pairs i < j: c2w [V,4,4] -> [P,4,4]."""
    i, j = np.triu_indices(len(c2w), k=1)
    return geometry.se3_inverse(c2w[j]) @ c2w[i]


def translation_angle(t_gt: np.ndarray, t_pred: np.ndarray) -> np.ndarray:
    """Folded angle in degrees between translation directions [P,3] -> [P]; 90 where a length is ~0."""
    n_gt, n_pred = np.linalg.norm(t_gt, axis=-1), np.linalg.norm(t_pred, axis=-1)
    defined = (n_gt > 1e-12) & (n_pred > 1e-12)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.sum(t_gt * t_pred, axis=-1) / (n_gt * n_pred)
    angle = np.degrees(np.arccos(np.clip(np.where(defined, cos, 0.0), -1.0, 1.0)))
    return np.minimum(angle, 180.0 - angle)


def pose_errors(pred_c2w, gt_c2w) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair (rotation, translation) errors in degrees, each float[V(V−1)/2], pairs i < j."""
    pred = _check_poses(pred_c2w, "pred_c2w")
    gt = _check_poses(gt_c2w, "gt_c2w")
    if pred.shape != gt.shape:
        raise ValueError(f"relative_pose_metrics: pred_c2w {pred.shape} and gt_c2w {gt.shape} must have the same views")
    rel_pred, rel_gt = relative_poses(pred), relative_poses(gt)
    r_err = geometry.quaternion_angle(geometry.matrix_to_quaternion(rel_gt[:, :3, :3]),
                                      geometry.matrix_to_quaternion(rel_pred[:, :3, :3]))
    t_err = translation_angle(rel_gt[:, :3, 3], rel_pred[:, :3, 3])
    return r_err, t_err


def pose_auc(r_err: np.ndarray, t_err: np.ndarray, max_threshold: int) -> float:
    """AUC@max_threshold in percent from per-pair errors [P] in degrees (VGGT-style 1° histogram)."""
    max_err = np.maximum(r_err, t_err)
    histogram, _ = np.histogram(max_err, bins=np.arange(max_threshold + 1))
    return float(100.0 * np.mean(np.cumsum(histogram / len(max_err))))


def relative_pose_metrics(pred_c2w, gt_c2w, thresholds: Sequence[int] = (5, 15, 30)) -> dict:
    """RRA/RTA/AUC of predicted cameras; pred_c2w, gt_c2w: float[V, 4, 4] camera-to-world.

    Returns {'rra@τ', 'rta@τ', 'auc@τ' for τ in thresholds (percent), 'rot_err_mean',
    'trans_err_mean' (degrees), 'num_pairs': int}.
    """
    if not thresholds or any(int(t) != t or t < 1 for t in thresholds):
        raise ValueError(f"relative_pose_metrics: thresholds must be positive whole degrees, got {thresholds}")
    r_err, t_err = pose_errors(pred_c2w, gt_c2w)
    out = {}
    for tau in thresholds:
        tau = int(tau)
        out[f"rra@{tau}"] = float(100.0 * np.mean(r_err < tau))
        out[f"rta@{tau}"] = float(100.0 * np.mean(t_err < tau))
        out[f"auc@{tau}"] = pose_auc(r_err, t_err, tau)
    out["rot_err_mean"] = float(r_err.mean())
    out["trans_err_mean"] = float(t_err.mean())
    out["num_pairs"] = int(len(r_err))
    return out


def _rotation_angle_deg(r: np.ndarray) -> np.ndarray:
    """Angle of rotations [N, 3, 3] in degrees as atan2(sin, cos): exact near 0°, where arccos of the
    trace loses half the digits (a 1e-12 trace error reads as ~1e-4°)."""
    sin = 0.5 * np.linalg.norm(np.stack([r[:, 2, 1] - r[:, 1, 2], r[:, 0, 2] - r[:, 2, 0],
                                         r[:, 1, 0] - r[:, 0, 1]], axis=-1), axis=-1)
    cos = 0.5 * (np.trace(r, axis1=1, axis2=2) - 1.0)
    return np.degrees(np.arctan2(sin, cos))


def trajectory_metrics(pred_c2w, gt_c2w) -> dict:
    """{'ate', 'rpe_trans' (GT length units), 'rpe_rot' (degrees)} of one trajectory, float[V, 4, 4]
    c2w each, V >= 3 (the Sim(3) fit needs three centres); see the module notes."""
    pred = _check_poses(pred_c2w, "pred_c2w")
    gt = _check_poses(gt_c2w, "gt_c2w")
    if pred.shape != gt.shape or len(gt) < 3:
        raise ValueError(f"trajectory_metrics: pred_c2w {pred.shape} and gt_c2w {gt.shape} must have the same "
                         "views, at least 3")
    s, r, t = geometry.similarity_or_centroid(pred[:, :3, 3], gt[:, :3, 3])
    aligned = pred.copy()
    aligned[:, :3, :3] = r @ pred[:, :3, :3]
    aligned[:, :3, 3] = geometry.apply_sim3(s, r, t, pred[:, :3, 3])
    ate = np.sqrt(np.mean(np.sum((aligned[:, :3, 3] - gt[:, :3, 3]) ** 2, axis=-1)))
    step_gt = geometry.se3_inverse(gt[:-1]) @ gt[1:]
    step_pred = geometry.se3_inverse(aligned[:-1]) @ aligned[1:]
    err = geometry.se3_inverse(step_gt) @ step_pred
    angles = _rotation_angle_deg(err[:, :3, :3])
    return {"ate": float(ate), "rpe_trans": float(np.sqrt(np.mean(np.sum(err[:, :3, 3] ** 2, axis=-1)))),
            "rpe_rot": float(np.sqrt(np.mean(angles ** 2)))}


def aggregate_pose_metrics(per_sample: Sequence[dict]) -> dict:
    """Pair-weighted mean of `relative_pose_metrics` results (equal to pooling all pairs first).

    Every entry must hold the same keys; num_pairs is the total. An empty list raises ValueError.
    """
    if not per_sample:
        raise ValueError("aggregate_pose_metrics: no results to aggregate (empty list)")
    keys = [k for k in per_sample[0] if k != "num_pairs"]
    for m in per_sample:
        if sorted(m) != sorted(per_sample[0]):
            raise ValueError(f"aggregate_pose_metrics: results have different keys: {sorted(m)} vs "
                             f"{sorted(per_sample[0])}")
    pairs = np.array([m["num_pairs"] for m in per_sample], dtype=np.float64)
    out = {k: float(np.dot(pairs, [m[k] for m in per_sample]) / pairs.sum()) for k in keys}
    return {**out, "num_pairs": int(pairs.sum())}
