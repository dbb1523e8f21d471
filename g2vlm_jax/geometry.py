"""3-D geometry in one place: SE(3)/Sim(3), unprojection, projection, rotations, intrinsics.

Every function takes numpy arrays or jax arrays and answers in the same library (`_xp` picks it),
so host-side metrics keep float64 while jitted losses and heads run the same code in jnp.
Conventions (SPEC): OpenCV cameras, camera-to-world (c2w) 4x4 poses, depth = camera z,
pixel-index intrinsics `u = fx * x / z + cx`. Leading axes `...` broadcast.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _xp(*arrays):
    """jnp if any argument is a jax array (or tracer), else numpy."""
    return jnp if any(isinstance(a, jax.Array) for a in arrays) else np


# --------------------------------------------------------------------------------------------------
# SE(3)
# --------------------------------------------------------------------------------------------------
def check_pose(pose, name: str = "pose", tol: float = 1e-6) -> None:
    """Raises ValueError if a numpy pose [...,4,4] is non-finite or has a singular rotation block."""
    pose = np.asarray(pose)
    if pose.shape[-2:] != (4, 4):
        raise ValueError(f"{name}: expected [..., 4, 4], got {pose.shape}")
    if not np.all(np.isfinite(pose)):
        raise ValueError(f"{name}: contains NaN/inf")
    det = np.linalg.det(pose[..., :3, :3].astype(np.float64))
    if np.any(np.abs(det) < tol):
        raise ValueError(f"{name}: singular rotation block (|det| = {np.abs(det).min():.3g}); a pose needs an "
                         "invertible 3x3 rotation")


def se3_inverse(pose):
    """Inverse of rigid transforms [...,4,4] (uses R^T, so only valid for rotations)."""
    xp = _xp(pose)
    r = pose[..., :3, :3]
    t = pose[..., :3, 3:]
    rt = xp.swapaxes(r, -1, -2)
    top = xp.concatenate([rt, -rt @ t], axis=-1)
    bottom = xp.broadcast_to(xp.asarray([0, 0, 0, 1], dtype=pose.dtype), top.shape[:-2] + (1, 4))
    return xp.concatenate([top, bottom], axis=-2)


def se3_compose(a, b):
    """a ∘ b (apply b first): [...,4,4] @ [...,4,4]."""
    return a @ b


def c2w_to_w2c(c2w):
    return se3_inverse(c2w)


def w2c_to_c2w(w2c):
    return se3_inverse(w2c)


def transform_points(pose, points):
    """Applies 4x4 transforms to points: pose [...,4,4] broadcast against points [...,3].

    The pose's leading axes broadcast against the points' leading axes, e.g. pose [V,1,1,4,4] with
    points [V,H,W,3], or pose [4,4] with points [N,3].
    """
    r = pose[..., :3, :3]
    t = pose[..., :3, 3]
    return (r @ points[..., None])[..., 0] + t


# --------------------------------------------------------------------------------------------------
# Cameras
# --------------------------------------------------------------------------------------------------
def pixel_grid(height: int, width: int, xp=np):
    """(u, v) pixel indices: two arrays [H, W]."""
    v, u = xp.meshgrid(xp.arange(height), xp.arange(width), indexing="ij")
    return u, v


def depth_to_camera_points(depth, intrinsics):
    """depth [...,H,W], K [...,3,3] -> camera-frame points [...,H,W,3] (x = (u - cx) z / fx)."""
    xp = _xp(depth, intrinsics)
    h, w = depth.shape[-2:]
    u, v = pixel_grid(h, w, xp)
    fx = intrinsics[..., 0, 0][..., None, None]
    fy = intrinsics[..., 1, 1][..., None, None]
    cx = intrinsics[..., 0, 2][..., None, None]
    cy = intrinsics[..., 1, 2][..., None, None]
    x = (u - cx) * depth / fx
    y = (v - cy) * depth / fy
    return xp.stack([x, y, depth], axis=-1)


def depth_to_world_points(depth, intrinsics, c2w):
    """depth [...,H,W], K [...,3,3], c2w [...,4,4] -> world points [...,H,W,3]."""
    cam = depth_to_camera_points(depth, intrinsics)
    return transform_points(c2w[..., None, None, :, :], cam)


def project_points(points_cam, intrinsics):
    """Camera-frame points [...,3], K [...,3,3] (broadcast) -> (uv [...,2], z [...])."""
    xp = _xp(points_cam, intrinsics)
    z = points_cam[..., 2]
    safe = xp.where(xp.abs(z) > 1e-12, z, 1e-12)
    u = intrinsics[..., 0, 0] * points_cam[..., 0] / safe + intrinsics[..., 0, 2]
    v = intrinsics[..., 1, 1] * points_cam[..., 1] / safe + intrinsics[..., 1, 2]
    return xp.stack([u, v], axis=-1), z


def recover_intrinsics(local_points, mask=None):
    """Least-squares pinhole intrinsics from camera-frame points [...,H,W,3] -> K [...,3,3].

    Solves u = fx * (x/z) + cx and v = fy * (y/z) + cy over valid pixels (finite, z > 0, mask),
    two independent 2-parameter linear fits per image. Exact on exact data.
    """
    xp = _xp(local_points)
    h, w = local_points.shape[-3:-1]
    u, v = pixel_grid(h, w, xp)
    z = local_points[..., 2]
    valid = xp.isfinite(local_points).all(-1) & (z > 1e-9)
    if mask is not None:
        valid = valid & mask.astype(bool)
    wgt = valid.astype(local_points.dtype)
    safe_z = xp.where(valid, z, 1.0)
    a = xp.where(valid, local_points[..., 0] / safe_z, 0.0)
    b = xp.where(valid, local_points[..., 1] / safe_z, 0.0)

    def fit(ratio, pix):
        # Weighted normal equations of pix = f * ratio + c.
        n = wgt.sum((-1, -2))
        sr = (wgt * ratio).sum((-1, -2))
        sp = (wgt * pix).sum((-1, -2))
        srr = (wgt * ratio * ratio).sum((-1, -2))
        srp = (wgt * ratio * pix).sum((-1, -2))
        den = n * srr - sr * sr
        den = xp.where(xp.abs(den) > 1e-12, den, 1e-12)
        f = (n * srp - sr * sp) / den
        c = (sp - f * sr) / xp.maximum(n, 1)
        return f, c

    fx, cx = fit(a, u)
    fy, cy = fit(b, v)
    zeros = xp.zeros_like(fx)
    ones = xp.ones_like(fx)
    return xp.stack([xp.stack([fx, zeros, cx], -1), xp.stack([zeros, fy, cy], -1),
                     xp.stack([zeros, zeros, ones], -1)], -2)


# --------------------------------------------------------------------------------------------------
# Rotations
# --------------------------------------------------------------------------------------------------
def nearest_rotation(m):
    """Nearest proper rotation (det +1) to [...,3,3]: R = U diag(1, 1, det(U V^T)) V^T."""
    xp = _xp(m)
    u, _, vt = xp.linalg.svd(m)
    det = xp.linalg.det(u @ vt)
    d = xp.stack([xp.ones_like(det), xp.ones_like(det), det], axis=-1)
    return (u * d[..., None, :]) @ vt


def rotation_from_9d(x, eps: float = 1e-8):
    """Camera-head rotation (SPEC 1.5): 9 values row-major -> unit rows -> nearest proper rotation."""
    xp = _xp(x)
    m = x.reshape(x.shape[:-1] + (3, 3))
    norm = xp.sqrt(xp.maximum((m * m).sum(-1, keepdims=True), eps * eps))
    return nearest_rotation(m / norm)


def quaternion_to_matrix(q):
    """Unit quaternions (w, x, y, z) [...,4] -> rotations [...,3,3] (normalised first)."""
    xp = _xp(q)
    q = q / xp.linalg.norm(q, axis=-1, keepdims=True)
    w, x, y, z = q[..., 0], q[..., 1], q[..., 2], q[..., 3]
    rows = [[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
            [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
            [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]]
    return xp.stack([xp.stack(r, -1) for r in rows], -2)


def matrix_to_quaternion(r):
    """Rotations [...,3,3] -> unit quaternions (w, x, y, z) with w >= 0.

    Uses the largest of the four candidate denominators (w, x, y, z) per matrix, so it is stable
    near 180° rotations where the trace-only formula divides by ~0.
    """
    xp = _xp(r)
    m00, m11, m22 = r[..., 0, 0], r[..., 1, 1], r[..., 2, 2]
    cands = xp.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], -1)
    s = 2 * xp.sqrt(xp.maximum(cands, 1e-12))  # s_i = 4 * |q_i|
    qw = xp.stack([s[..., 0] / 4, (r[..., 2, 1] - r[..., 1, 2]) / s[..., 0], (r[..., 0, 2] - r[..., 2, 0]) / s[..., 0],
                   (r[..., 1, 0] - r[..., 0, 1]) / s[..., 0]], -1)
    qx = xp.stack([(r[..., 2, 1] - r[..., 1, 2]) / s[..., 1], s[..., 1] / 4, (r[..., 0, 1] + r[..., 1, 0]) / s[..., 1],
                   (r[..., 0, 2] + r[..., 2, 0]) / s[..., 1]], -1)
    qy = xp.stack([(r[..., 0, 2] - r[..., 2, 0]) / s[..., 2], (r[..., 0, 1] + r[..., 1, 0]) / s[..., 2], s[..., 2] / 4,
                   (r[..., 1, 2] + r[..., 2, 1]) / s[..., 2]], -1)
    qz = xp.stack([(r[..., 1, 0] - r[..., 0, 1]) / s[..., 3], (r[..., 0, 2] + r[..., 2, 0]) / s[..., 3],
                   (r[..., 1, 2] + r[..., 2, 1]) / s[..., 3], s[..., 3] / 4], -1)
    best = xp.argmax(cands, axis=-1)[..., None]
    q = xp.where(best == 0, qw, xp.where(best == 1, qx, xp.where(best == 2, qy, qz)))
    q = q / xp.linalg.norm(q, axis=-1, keepdims=True)
    return xp.where(q[..., :1] < 0, -q, q)


def quaternion_angle(q1, q2):
    """Geodesic angle in degrees between unit quaternions [...,4]: 2 arccos |<q1, q2>|."""
    xp = _xp(q1, q2)
    dot = xp.abs((q1 * q2).sum(-1))
    return xp.degrees(2 * xp.arccos(xp.clip(dot, 0.0, 1.0)))


def rotation_angle(r1, r2):
    """Geodesic angle in degrees between rotations [...,3,3]: arccos((tr(R1^T R2) - 1) / 2)."""
    xp = _xp(r1, r2)
    tr = (r1 * r2).sum((-1, -2))
    return xp.degrees(xp.arccos(xp.clip((tr - 1) / 2, -1.0, 1.0)))


# --------------------------------------------------------------------------------------------------
# Sim(3) alignment (numpy, host side)
# --------------------------------------------------------------------------------------------------
def umeyama(src, dst, weights=None, with_scale: bool = True):
    """Least-squares similarity dst ≈ s R src + t (Umeyama 1991). src, dst: [N,3] -> (s, R [3,3], t [3]).

    Raises ValueError for fewer than 3 points, non-finite input, or a degenerate (all-equal) source.
    """
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 3:
        raise ValueError(f"umeyama: src {src.shape} and dst {dst.shape} must both be [N, 3]")
    if src.shape[0] < 3:
        raise ValueError(f"umeyama: needs at least 3 point pairs, got {src.shape[0]}")
    if not (np.isfinite(src).all() and np.isfinite(dst).all()):
        raise ValueError("umeyama: points contain NaN/inf; filter them with a validity mask first")
    w = np.ones(len(src)) if weights is None else np.asarray(weights, np.float64)
    w = w / w.sum()
    mu_s = w @ src
    mu_d = w @ dst
    xs = src - mu_s
    xd = dst - mu_d
    var_s = w @ (xs * xs).sum(1)
    if var_s < 1e-20:
        raise ValueError("umeyama: source points are all equal (degenerate); no similarity is defined")
    cov = (xd * w[:, None]).T @ xs
    u, d, vt = np.linalg.svd(cov)
    sign = np.ones(3)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[2] = -1
    r = u @ np.diag(sign) @ vt
    s = float((d * sign).sum() / var_s) if with_scale else 1.0
    t = mu_d - s * r @ mu_s
    return s, r, t


def similarity_or_centroid(src, dst):
    """umeyama(src, dst), except that a collapsed src (all points equal to float precision: a prediction
    that put every point / camera in one place) maps onto dst's centroid, (0, I, mean(dst)): the
    least-squares similarity over scales >= 0, so the collapsed prediction scores the spread of dst (the
    worst an aligned prediction can) instead of raising. src, dst: [N, 3]."""
    src = np.asarray(src, np.float64)
    if len(src) and np.ptp(src, axis=0).max() <= 1e-12 * max(1.0, np.abs(src).max()):
        return 0.0, np.eye(3), np.asarray(dst, np.float64).mean(axis=0)
    return umeyama(src, dst)


def apply_sim3(s, r, t, points):
    """s R p + t for points [...,3]."""
    return s * (points @ np.asarray(r).T) + t
