"""Point-map metrics (SPEC 5): accuracy, completeness and normal consistency after alignment.

Protocol (7-Scenes / ETH3D style; decided details are tested in tests/test_metrics_pointmap.py):
- Valid points: mask ∧ finite(gt). The prediction must be finite on every valid point, else a
  ValueError (NaN output must not be scored only where it happens to be finite).
- Normals are estimated before alignment and rotated with the prediction:
    structured input [..., H, W, 3] (one or more images): per pixel, the cross product of the
      horizontal and vertical tangents from the valid image-grid neighbours (central differences,
      one-sided at borders and holes). A pixel with no valid horizontal or vertical neighbour has
      no normal.
    unstructured input [N, 3]: PCA of the k = 30 nearest neighbours (the default of Open3D's
      estimate_normals, which the reference evaluations use); the normal is the least-variance axis.
  Points without a normal are left out of NC only.
- Deterministic subsampling: above `max_points` (default 100 000) valid points, a fixed-seed random
  subset of that size is scored (the same subset of pred and GT, so correspondences survive).
- Alignment of the prediction to the GT:
    'umeyama'      Sim(3) by Umeyama on the pixel correspondences;
    'umeyama_icp'  then rigid point-to-point ICP: correspondences are nearest GT neighbours within
                   `icp_threshold` (GT units, 0.1 m), at most `icp_iters` (30, Open3D's default)
                   iterations, stopping when fitness and inlier RMSE change by < 1e-6 (relative);
                   ICP is rigid, so a scale error left by the Sim(3) step stays in the metrics;
    'none'         the prediction is already in the GT frame.
  A collapsed prediction (all points equal) has no Umeyama rotation; its best similarity is the
  scale-0 map onto the GT centroid, which is what gets scored.
- Acc = mean distance pred -> nearest GT point, Comp = GT -> nearest pred point (cKDTree, no N×N
  matrices); NC = mean of nc1 (pred -> GT matches) and nc2 (GT -> pred) of |n_pred · n_gt|; *_med
  are medians (nc_med = mean of the two medians).
- Fewer valid points than the alignment needs (1 for 'none', 3 otherwise): every metric is NaN and
  num_points is the count (a neutral value, like an empty depth mask).
"""
from __future__ import annotations

import numpy as np
from scipy.spatial import cKDTree

from g2vlm_jax import geometry

ALIGNMENTS = ("umeyama_icp", "umeyama", "none")
METRIC_KEYS = ("acc", "comp", "nc", "acc_med", "comp_med", "nc_med")
PCA_NEIGHBOURS = 30
ICP_RELATIVE_TOL = 1e-6
ICP_ABSOLUTE_TOL = 1e-12  # GT units (metres)


def _check_inputs(pred, gt, mask):
    pred = np.asarray(pred, dtype=np.float64)
    gt = np.asarray(gt, dtype=np.float64)
    if gt.ndim < 2 or gt.shape[-1] != 3:
        raise ValueError(f"pointmap_metrics: gt_points must be [N, 3] or [..., H, W, 3], got {gt.shape}")
    if pred.shape != gt.shape:
        raise ValueError(f"pointmap_metrics: pred_points shape {pred.shape} must equal gt_points shape {gt.shape}")
    if mask is None:
        mask = np.ones(gt.shape[:-1], dtype=bool)
    mask = np.asarray(mask)
    if mask.shape != gt.shape[:-1]:
        raise ValueError(f"pointmap_metrics: mask shape {mask.shape} must be gt_points.shape[:-1] = {gt.shape[:-1]}")
    return pred, gt, mask.astype(bool)


# --------------------------------------------------------------------------------------------------
# Normals
# --------------------------------------------------------------------------------------------------
def _neighbour(points, valid, axis, step):
    """Points [..., H, W, 3] and validity shifted so index i holds neighbour i+step along `axis`."""
    shifted = np.roll(points, -step, axis=axis - 1)
    ok = np.roll(valid, -step, axis=axis)
    # np.roll wraps around; the wrapped row/column is not a neighbour
    edge = [slice(None)] * valid.ndim
    edge[axis] = slice(-1, None) if step > 0 else slice(0, 1)
    ok[tuple(edge)] = False
    return shifted, ok & valid


def _tangent(points, valid, axis):
    """Central difference along an image axis (-2: rows, -1: columns), one-sided where needed."""
    fwd, ok_f = _neighbour(points, valid, axis, +1)
    bwd, ok_b = _neighbour(points, valid, axis, -1)
    tangent = np.where((ok_f & ok_b)[..., None], fwd - bwd,
                       np.where(ok_f[..., None], fwd - points, np.where(ok_b[..., None], points - bwd, np.nan)))
    return tangent


def grid_normals(points: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Unit normals float[..., H, W, 3] of image-structured points [..., H, W, 3] with valid bool[..., H, W].

    NaN where a pixel lacks a valid horizontal or vertical neighbour or the tangents are parallel.
    """
    normals = np.cross(_tangent(points, valid, -1), _tangent(points, valid, -2))
    return _unit(normals)


def pca_normals(points: np.ndarray, k: int = PCA_NEIGHBOURS) -> np.ndarray:
    """Unit normals float[N, 3] of unstructured points [N, 3]: least-variance axis of the k nearest points."""
    if len(points) < 3:
        return np.full(points.shape, np.nan)
    k = min(k, len(points))
    _, idx = cKDTree(points).query(points, k=k)
    nbrs = points[idx]                                        # [N, k, 3]
    centred = nbrs - nbrs.mean(axis=1, keepdims=True)
    cov = np.einsum("nki,nkj->nij", centred, centred)
    _, vecs = np.linalg.eigh(cov)                             # ascending eigenvalues
    return _unit(vecs[:, :, 0])


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(norm > 1e-12, v / norm, np.nan)


# --------------------------------------------------------------------------------------------------
# Alignment
# --------------------------------------------------------------------------------------------------
def icp_rigid(src: np.ndarray, dst: np.ndarray, threshold: float, max_iters: int = 30,
              dst_tree: cKDTree | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Point-to-point ICP: rigid (R [3,3], t [3]) with dst ≈ R src + t; src [N,3], dst [M,3].

    Correspondences: nearest dst point within `threshold`. Stops after `max_iters` or when fitness
    (inlier fraction) and inlier RMSE change by less than 1e-6 relative (RMSE: + 1e-12 absolute);
    too few inliers (< 3) stop it.
    """
    tree = dst_tree if dst_tree is not None else cKDTree(dst)
    r, t = np.eye(3), np.zeros(3)
    previous = None
    for _ in range(max_iters):
        moved = src @ r.T + t
        dist, idx = tree.query(moved, distance_upper_bound=threshold)
        inliers = np.isfinite(dist)
        if inliers.sum() < 3:
            break
        fitness, rmse = inliers.mean(), np.sqrt(np.mean(dist[inliers] ** 2))
        # the absolute floor stops an already exact fit from iterating on rounding noise
        if previous is not None and abs(fitness - previous[0]) <= ICP_RELATIVE_TOL * fitness \
                and abs(rmse - previous[1]) <= ICP_RELATIVE_TOL * rmse + ICP_ABSOLUTE_TOL:
            break
        previous = (fitness, rmse)
        _, r_step, t_step = geometry.umeyama(moved[inliers], dst[idx[inliers]], with_scale=False)
        r, t = r_step @ r, r_step @ t + t_step
    return r, t


def _nc(normals_a: np.ndarray, normals_b: np.ndarray) -> np.ndarray:
    """|n_a · n_b| per matched pair, NaN where either normal is missing."""
    return np.abs(np.sum(normals_a * normals_b, axis=-1))


# --------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------
def pointmap_metrics(pred_points, gt_points, mask=None, align: str = "umeyama_icp", icp_threshold: float = 0.1,
                     max_points: int = 100_000, icp_iters: int = 30) -> dict:
    """Acc/Comp/NC of a predicted point cloud against the GT (see module notes).

    pred_points, gt_points: float[N, 3] (unstructured) or float[..., H, W, 3] (image grids, e.g.
    [V, H, W, 3]), corresponding point for point; mask: bool[N] / bool[..., H, W] or None (all).
    Returns {acc, comp, nc, acc_med, comp_med, nc_med: float, num_points: int (scored points)}.
    """
    if align not in ALIGNMENTS:
        raise ValueError(f"pointmap_metrics: align must be one of {ALIGNMENTS}, got {align!r}")
    if not icp_threshold > 0 or max_points < 3 or icp_iters < 1:
        raise ValueError(f"pointmap_metrics: need icp_threshold > 0, max_points >= 3, icp_iters >= 1; got "
                         f"{icp_threshold}, {max_points}, {icp_iters}")
    pred, gt, mask = _check_inputs(pred_points, gt_points, mask)
    valid = mask & np.isfinite(gt).all(axis=-1)
    bad = int((~np.isfinite(pred[valid]).all(axis=-1)).sum())
    if bad:
        raise ValueError(f"pointmap_metrics: pred_points has {bad} non-finite points where the GT is valid; "
                         "fix the model output (NaN/inf) before scoring")
    count = int(valid.sum())
    if count < (1 if align == "none" else 3):
        return {**{k: float("nan") for k in METRIC_KEYS}, "num_points": count}
    structured = gt.ndim >= 3
    if structured:
        pred_n, gt_n = grid_normals(pred, valid)[valid], grid_normals(gt, valid)[valid]
    pred, gt = pred[valid], gt[valid]
    if count > max_points:
        keep = np.sort(np.random.default_rng(0).choice(count, max_points, replace=False))
        pred, gt = pred[keep], gt[keep]
        if structured:
            pred_n, gt_n = pred_n[keep], gt_n[keep]
    if not structured:
        pred_n, gt_n = pca_normals(pred), pca_normals(gt)
    gt_tree = cKDTree(gt)
    if align != "none":
        s, r, t = geometry.similarity_or_centroid(pred, gt)  # collapsed pred -> GT centroid
        pred, pred_n = geometry.apply_sim3(s, r, t, pred), pred_n @ r.T
        if align == "umeyama_icp" and s > 0:  # a collapsed prediction has nothing to register
            r, t = icp_rigid(pred, gt, icp_threshold, icp_iters, gt_tree)
            pred, pred_n = pred @ r.T + t, pred_n @ r.T
    return {**_distances_and_nc(pred, gt, pred_n, gt_n, gt_tree), "num_points": len(pred)}


def _distances_and_nc(pred, gt, pred_n, gt_n, gt_tree) -> dict:
    """Acc/Comp (nearest-neighbour distances both ways) and NC of aligned clouds pred [N,3], gt [N,3]."""
    acc, to_gt = gt_tree.query(pred)
    comp, to_pred = cKDTree(pred).query(gt)
    nc1, nc2 = _nc(pred_n, gt_n[to_gt]), _nc(gt_n, pred_n[to_pred])
    nc1, nc2 = nc1[np.isfinite(nc1)], nc2[np.isfinite(nc2)]
    has_nc = nc1.size > 0 and nc2.size > 0
    return {
        "acc": float(acc.mean()), "comp": float(comp.mean()),
        "nc": float((nc1.mean() + nc2.mean()) / 2) if has_nc else float("nan"),
        "acc_med": float(np.median(acc)), "comp_med": float(np.median(comp)),
        "nc_med": float((np.median(nc1) + np.median(nc2)) / 2) if has_nc else float("nan"),
    }
