"""Multi-view consistency of a scene's depth, poses and intrinsics (host-side numpy).

A wrong pose convention (world-to-camera stored as camera-to-world), wrong depth units or
intrinsics of the wrong resolution all show up as a large reprojection error, so converters run
this on a few view pairs of what they wrote, and tests use it to check renderers and round trips.

The check: unproject the valid pixels of view i with its depth, intrinsics and pose, project them
into view j, and compare their camera-j depth with view j's depth map at that spot. View j's depth
is interpolated bilinearly in *inverse* depth, which is exact inside a planar patch (1/z is affine
in pixel coordinates on a plane); points whose four neighbours are not all valid are skipped.
Points that land more than `occlusion_margin` *behind* the surface view j sees are taken as
occluded in j and skipped. Points in front of that surface are never skipped: with consistent
geometry view j would have seen them, so they are errors. A wrong pose convention or depth unit
puts most points in front of or far from the surface, so it still shows as a large error.
"""
from __future__ import annotations

import numpy as np

from data_pipelines.scene import Scene


def unproject(depth: np.ndarray, intrinsics: np.ndarray, c2w: np.ndarray) -> np.ndarray:
    """depth float[H, W], intrinsics float[3, 3], c2w float[4, 4] -> world points float64[H, W, 3]."""
    h, w = depth.shape
    jj, ii = np.meshgrid(np.arange(w, dtype=np.float64), np.arange(h, dtype=np.float64))
    k = intrinsics.astype(np.float64)
    cam = np.stack([(jj - k[0, 2]) / k[0, 0], (ii - k[1, 2]) / k[1, 1], np.ones_like(jj)], -1) * depth[..., None]
    pose = c2w.astype(np.float64)
    return cam @ pose[:3, :3].T + pose[:3, 3]


def reprojection_errors(scene: Scene, src: int, dst: int, occlusion_margin: float = 0.05) -> np.ndarray:
    """Relative depth errors float64[N] |z_pred - z_dst| / z_dst of view src's valid pixels that land
    inside view dst, are not occluded there (z_pred <= (1 + occlusion_margin) z_dst) and have four
    valid neighbours."""
    valid = scene.depth[src] > 0
    points = unproject(scene.depth[src], scene.intrinsics[src], scene.c2w[src])[valid]
    pose = scene.c2w[dst].astype(np.float64)
    cam = (points - pose[:3, 3]) @ pose[:3, :3]  # world -> camera dst: R^T (p - t)
    z = cam[:, 2]
    k = scene.intrinsics[dst].astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        u, v = k[0, 0] * cam[:, 0] / z + k[0, 2], k[1, 1] * cam[:, 1] / z + k[1, 2]
    h, w = scene.depth.shape[1:]
    inside = (z > 0) & (u >= 0) & (v >= 0) & (u <= w - 1) & (v <= h - 1)
    u, v, z = u[inside], v[inside], z[inside]
    j0, i0 = np.minimum(u.astype(int), w - 2), np.minimum(v.astype(int), h - 2)
    fu, fv = u - j0, v - i0
    target = scene.depth[dst].astype(np.float64)
    corners = np.stack([target[i0, j0], target[i0, j0 + 1], target[i0 + 1, j0], target[i0 + 1, j0 + 1]])
    ok = np.all(corners > 0, axis=0)
    inv = 1.0 / np.where(corners > 0, corners, 1.0)
    weights = np.stack([(1 - fu) * (1 - fv), fu * (1 - fv), (1 - fu) * fv, fu * fv])
    z_dst = 1.0 / np.sum(weights * inv, axis=0)
    visible = ok & (z <= (1 + occlusion_margin) * z_dst)
    return (np.abs(z - z_dst) / z_dst)[visible]


def median_reprojection_error(scene: Scene, pairs: list[tuple[int, int]] | None = None) -> float:
    """Median over the given view pairs (default: consecutive views) of the median relative depth
    error; nan when no pair shares a valid pixel."""
    if pairs is None:
        pairs = [(i, i + 1) for i in range(scene.num_views - 1)]
    medians = [np.median(e) for e in (reprojection_errors(scene, i, j) for i, j in pairs) if e.size]
    return float(np.median(medians)) if medians else float("nan")
