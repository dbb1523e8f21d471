"""Losses: the Pi3 / MoGe visual-geometry loss (SPEC 2.1) and the token-mean cross entropy (SPEC 2.2).

The geometry loss is written for ONE sample (views of one scene) and vmapped over the batch, in
fp32 with static shapes (the 4096-point resampling uses a cumulative-count search, not boolean
indexing), then reduced over the batch as the official Pi3Loss does (`visual_geometry_loss`).
Per sample, in order:

 1. GT into frame 0 and scaled by the mean distance of its valid points (`_normalise_gt`);
 2. predictions divided by the mean norm of their local points over GT-valid pixels;
 3. depth weights w = 1 / (max(z, 0.1 * mean z of the view) + 1e-6);
 4. s* = exact weighted median of x / x̂ with weights w |x̂| over 4096 resampled pixels (no grad);
 5. local L1 loss, 6. gated normal loss, 7. global L1 loss, 8. pairwise relative-pose loss.

Floors: the official clamps (normal angles to at least 1°, arccos arguments to 1 − 1e-6) give a
perfect prediction a small loss that depends only on the GT. By default (`loss.subtract_floors`) we
subtract it, so a perfect prediction scores exactly 0; gradients are identical to the official loss
(the floor has none). `subtract_floors=False` gives the official values.

Neutral values: a sample without valid pixels, or with `sample_valid = False`, contributes nothing;
a batch without any valid sample has loss 0. Non-finite GT points are invalid pixels. Nothing here
produces NaN, including its gradient (every sqrt/arccos/division is guarded).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from g2vlm_jax import geometry
from g2vlm_jax.batch import GeometryTruth
from g2vlm_jax.config import LossConfig

RESAMPLE_POINTS = 4096
_MIN_ANGLE, _MAX_ANGLE, _BETA = math.radians(1.0), math.radians(90.0), math.radians(3.0)
_NORMAL_FLOOR = 0.5 * _MIN_ANGLE**2 / _BETA  # smoothed loss of a clamped 1° error
_COS_CLAMP = 1e-6
_ROTATION_FLOOR = math.acos(1 - _COS_CLAMP)  # arccos of the clamped identity
_ROTATION_CEIL = math.acos(-1 + _COS_CLAMP)
_TAN_PI_8 = math.tan(math.pi / 8)


# --------------------------------------------------------------------------------------------------
# Text
# --------------------------------------------------------------------------------------------------
def cross_entropy_sums(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Sum of per-token CE over loss positions and their count. logits [..., V], labels/mask [...]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask)


def token_mean_cross_entropy(logits: jax.Array, labels: jax.Array, loss_mask: jax.Array) -> jax.Array:
    total, count = cross_entropy_sums(logits, labels, loss_mask)
    return total / jnp.maximum(count, 1.0)


# --------------------------------------------------------------------------------------------------
# Optimal scale
# --------------------------------------------------------------------------------------------------
def optimal_scale(pred_points: jax.Array, gt_points: jax.Array, weights: jax.Array, valid: jax.Array | None = None):
    """argmin_s Σ w_k |s x̂_k − x_k| over the 3N coordinates: the weighted median of x/x̂ with weights w|x̂|.

    pred_points, gt_points: [N, 3]; weights: [N]; valid: bool [N] or None. Returns a scalar, no
    gradient, made positive (|s|) when the median is <= 0, and 1 when nothing is valid.
    """
    return _weighted_median_scale(pred_points, gt_points, weights, valid)[0]


def _weighted_median_scale(pred_points, gt_points, weights, valid=None):
    """(s, k): `optimal_scale` and the flat index k in [0, 3N) of the coordinate whose ratio s is, or -1
    when s is not such a ratio (nothing valid, or s replaced by 1 or by |s|)."""
    pred = pred_points.reshape(-1).astype(jnp.float32)
    gt = gt_points.reshape(-1).astype(jnp.float32)
    w = jnp.repeat(weights.astype(jnp.float32), 3)
    ok = jnp.abs(pred) > 0
    if valid is not None:
        ok = ok & jnp.repeat(valid, 3)
    ratio = jnp.where(ok, gt / jnp.where(ok, pred, 1.0), jnp.inf)  # invalid ratios sort last, weight 0
    cw = jnp.where(ok, w * jnp.abs(pred), 0.0)
    order = jnp.argsort(ratio)
    r_sorted, w_sorted = ratio[order], cw[order]
    cum = jnp.cumsum(w_sorted)
    total = cum[-1]
    idx = jnp.clip(jnp.searchsorted(cum, 0.5 * total, side="left"), 0, r_sorted.shape[0] - 1)
    median = r_sorted[idx]
    exact = (total > 0) & jnp.isfinite(median) & (median > 0)
    s = jnp.where(total > 0, median, 1.0)
    s = jnp.where(jnp.isfinite(s), s, 1.0)
    s = jnp.where(s <= 0, jnp.abs(s), s)
    return jax.lax.stop_gradient(s), jnp.where(exact, order[idx], -1)


def resample_valid(values: jax.Array, valid: jax.Array, size: int = RESAMPLE_POINTS) -> jax.Array:
    """Nearest-neighbour resampling of the valid entries of `values` [N, C] to exactly `size` rows.

    Row k is the floor(k * n / size)-th valid entry (n = number of valid entries), as 1-D nearest
    interpolation of the valid list does; static shapes via a cumulative count.
    """
    return values[_resample_positions(valid, size)]


def _resample_positions(valid: jax.Array, size: int = RESAMPLE_POINTS) -> jax.Array:
    """The row of `values` that `resample_valid` puts at each of its `size` rows."""
    counts = jnp.cumsum(valid.astype(jnp.int32))
    n = counts[-1]
    rank = (jnp.arange(size) * n) // size  # 0-based rank among the valid entries
    return jnp.clip(jnp.searchsorted(counts, rank + 1, side="left"), 0, valid.shape[0] - 1)


# --------------------------------------------------------------------------------------------------
# Geometry loss of one sample
# --------------------------------------------------------------------------------------------------
def _normalise_gt(world, valid, poses):
    """GT of one sample into frame 0, scaled by the mean distance of valid points.

    world [V,H,W,3], valid [V,H,W], poses [V,4,4] -> (world, local, poses) all normalised.
    """
    w2c0 = geometry.se3_inverse(poses[0])
    world = geometry.transform_points(w2c0, world)
    poses = w2c0 @ poses
    dist = jnp.where(valid, jnp.linalg.norm(jnp.where(valid[..., None], world, 0.0), axis=-1), 0.0)
    scale = jnp.maximum(jnp.sum(dist) / jnp.maximum(jnp.sum(valid), 1), 1e-8)
    world = world / scale
    poses = poses.at[:, :3, 3].divide(scale)
    local = geometry.transform_points(geometry.se3_inverse(poses)[:, None, None], world)
    return world, local, poses


def _safe_sqrt(sq):
    """sqrt of a squared norm with a finite gradient at 0."""
    return jnp.where(sq > 0, jnp.sqrt(jnp.where(sq > 0, sq, 1.0)), 0.0)


def _safe_norm(x, axis=-1):
    return _safe_sqrt(jnp.sum(x * x, axis=axis))


# The normal loss works on 3-vectors stored as (x, y, z) tuples of [V,H,W] arrays, with the same values as
# jnp.cross / sum(a * b, -1) on [..., 3] arrays. Those became padded concatenates and batched dots with a
# contraction of 3 on XLA CPU (the largest items of the tiny train step's profile; the step went from 76-82
# to 69-73 ms), and on TPU a [..., 3] minor dimension is padded to 128 lanes (the loss's gradient at 2 x 8
# views of 392x518: 1,120 -> 1,066 MiB of temporaries).
def _cross3(a, b):
    return (a[1] * b[2] - a[2] * b[1], a[2] * b[0] - a[0] * b[2], a[0] * b[1] - a[1] * b[0])


def _dot3(a, b):
    return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]


def _sub3(a, b):
    return (a[0] - b[0], a[1] - b[1], a[2] - b[2])


@jax.custom_jvp
def _atan2_upper(y, x):
    """atan2(y, x) for y >= 0 (an angle in [0, π]), elementwise, to float32 round-off (max error 2.7e-7, XLA's
    own atan2 2.5e-7). XLA:CPU runs jnp.arctan2 as a scalar call per element (12 ns each, 5x this polynomial:
    the four normal-loss angles were 6.7 ms of the tiny train step's op time). Cephes' atanf: reduce to
    t = min/max in [0, 1], then to |t| <= tan(π/8), and a degree-9 odd polynomial; the derivative is exact.
    Wider types than float32 (float64 checks) take jnp.arctan2, the polynomial being float32-accurate."""
    if jnp.finfo(jnp.result_type(y, x)).bits > 32:
        return jnp.arctan2(y, x)
    ax = jnp.abs(x)
    hi, lo = jnp.maximum(ax, y), jnp.minimum(ax, y)
    t = lo / jnp.where(hi > 0, hi, 1.0)
    big = t > _TAN_PI_8
    t = jnp.where(big, (t - 1) / (t + 1), t)
    z = t * t
    p = (((8.05374449538e-2 * z - 1.38776856032e-1) * z + 1.99777106478e-1) * z - 3.33329491539e-1) * z * t + t
    angle = jnp.where(big, p + math.pi / 4, p)  # atan(lo / hi), in [0, π/4]
    angle = jnp.where(y > ax, math.pi / 2 - angle, angle)
    return jnp.where(x < 0, math.pi - angle, angle)


@_atan2_upper.defjvp
def _atan2_upper_jvp(primals, tangents):
    (y, x), (dy, dx) = primals, tangents
    r2 = x * x + y * y
    return _atan2_upper(y, x), jnp.where(r2 > 0, (x * dy - y * dx) / jnp.where(r2 > 0, r2, 1.0), 0.0)


def _angle_between(a, b):
    """atan2(|a x b|, a·b) of component tuples, the official angle_diff_vec3 (eps inside keeps it finite)."""
    c = _cross3(a, b)
    return _atan2_upper(_safe_sqrt(_dot3(c, c)) + 1e-12, _dot3(a, b))


def _depth_edge(z, rtol: float = 0.03):
    """(3x3 max − 3x3 min) / z > rtol on [V,H,W] depth (windows clipped at the border), with the
    official's nan_to_num of the ratio: z = 0 next to a step is an edge, a flat zero patch is not,
    negative z never is."""
    pad = jnp.pad(z, ((0, 0), (1, 1), (1, 1)), mode="edge")
    h, w = z.shape[1:]
    windows = jnp.stack([pad[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
    diff = windows.max(0) - windows.min(0)
    return jnp.nan_to_num(diff / z) > rtol


_QUAD_CORNERS = ((0, 0), (0, 1), (1, 0), (1, 1))  # (row, column) offsets of lu, ru, ld, rd in a 2x2 quad


def _quad_corners(p):
    """The corners lu, ru, ld, rd of every 2x2 quad of points [V,H,W,3], each an (x, y, z) tuple of
    [V,H-1,W-1] arrays."""
    h, w = p.shape[1] - 1, p.shape[2] - 1
    planes = [p[..., i] for i in range(3)]
    return tuple(tuple(c[:, r:r + h, k:k + w] for c in planes) for r, k in _QUAD_CORNERS)


def _triangle_normals(corners):
    """The four triangle normals (official layout) of quad corners (lu, ru, ld, rd), each an (x, y, z) tuple."""
    lu, ru, ld, rd = corners
    return (_cross3(_sub3(ru, rd), _sub3(ld, rd)), _cross3(_sub3(lu, ru), _sub3(rd, ru)),
            _cross3(_sub3(ld, lu), _sub3(ru, lu)), _cross3(_sub3(rd, ld), _sub3(lu, ld)))


def _triangle_masks(m):
    lu, ru, ld, rd = m[:, :-1, :-1], m[:, :-1, 1:], m[:, 1:, :-1], m[:, 1:, 1:]
    return ru & ld & rd, lu & rd & ru, ld & ru & lu, rd & lu & ld


def _summed_triangle_loss(corners, gt_normals, masks, floor: float):
    """Sum over quads and their four triangles of the smoothed angle between predicted and GT normals."""
    total = 0.0
    for n_pred, n_gt, m in zip(_triangle_normals(corners), gt_normals, masks):
        err = jnp.clip(_angle_between(n_pred, n_gt), _MIN_ANGLE, _MAX_ANGLE)
        smooth = jnp.where(err < _BETA, 0.5 * err * err / _BETA, err - 0.5 * _BETA)
        total = total + jnp.where(m, smooth - floor, 0.0)
    return jnp.sum(total)


# The gradient of a corner slice is that slice's cotangent padded back to [V,H,W]; left to autodiff, XLA:CPU fuses
# the four pads and their sum with the elementwise backward above them into one loop that recomputes every
# triangle's chain for each corner of each pixel (~600 operations an element: 15 ms of the tiny train step's op
# time). The custom VJP below computes the corners' cotangents once, stacked [V, 12, H-1, W-1], and adds them
# back at their offsets as a 2x2 convolution with a 0/1 kernel, which XLA does not fuse with its producers.
_CORNER_SCATTER = np.zeros((3, 12, 2, 2), np.float32)  # [xyz out, (corner, xyz) in, kernel row, kernel column]
for _j, (_r, _k) in enumerate(_QUAD_CORNERS):
    for _c in range(3):
        _CORNER_SCATTER[_c, 3 * _j + _c, 1 - _r, 1 - _k] = 1.0


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _normal_loss_sum(pred_local, gt_normals, masks, floor: float):
    return _summed_triangle_loss(_quad_corners(pred_local), gt_normals, masks, floor)


def _normal_loss_sum_fwd(pred_local, gt_normals, masks, floor):
    return _normal_loss_sum(pred_local, gt_normals, masks, floor), (pred_local, gt_normals, masks)


def _normal_loss_sum_bwd(floor, residuals, g):
    pred_local, gt_normals, masks = residuals
    _, vjp = jax.vjp(lambda c: _summed_triangle_loss(c, gt_normals, masks, floor), _quad_corners(pred_local))
    (corner_grads,) = vjp(g)
    stacked = jnp.stack([plane for corner in corner_grads for plane in corner], axis=1)  # [V, 12, H-1, W-1]
    grad = jax.lax.conv_general_dilated(stacked, jnp.asarray(_CORNER_SCATTER, stacked.dtype), (1, 1), ((1, 1), (1, 1)),
                                        precision=jax.lax.Precision.HIGHEST)  # [V, 3, H, W]
    return jnp.moveaxis(grad, 1, -1), None, None


_normal_loss_sum.defvjp(_normal_loss_sum_fwd, _normal_loss_sum_bwd)


def normal_loss(pred_local, gt_local, valid, subtract_floor: bool = True):
    """Angle between predicted and GT triangle normals (SPEC 2.1 step 6) of one sample [V,H,W,3].

    As the official loss: depth edges come from the raw GT depth (invalid pixels keep their depth),
    and a triangle counts when its three pixels are valid and off an edge. No gradient flows to the GT.
    """
    mask = valid & ~_depth_edge(gt_local[..., 2])
    gt_normals = _triangle_normals(_quad_corners(jax.lax.stop_gradient(gt_local)))
    total = _normal_loss_sum(pred_local, gt_normals, _triangle_masks(mask), _NORMAL_FLOOR if subtract_floor else 0.0)
    v, h, w = pred_local.shape[:3]
    return total / (v * (h - 1) * (w - 1)) / (4 * max(h, w))


def _huber(x, delta: float):
    ax = jnp.abs(x)
    return jnp.where(ax < delta, 0.5 * x * x, delta * (ax - 0.5 * delta))


def camera_loss(pred_poses, gt_poses, scale, translation_weight: float, subtract_floor: bool = True):
    """Relative-pose loss over ordered pairs i != j of one sample. Returns (trans, rot, total)."""
    v = pred_poses.shape[0]
    pred = pred_poses.at[:, :3, 3].multiply(scale)
    rel_pred = geometry.se3_inverse(pred)[:, None] @ pred[None, :]  # [i, j] = P_i^-1 P_j
    rel_gt = geometry.se3_inverse(gt_poses)[:, None] @ gt_poses[None, :]
    off = ~jnp.eye(v, dtype=bool)
    pairs = jnp.maximum(v * (v - 1), 1)
    trans = jnp.sum(jnp.where(off[..., None], _huber(rel_pred[..., :3, 3] - rel_gt[..., :3, 3], 0.1), 0.0)) / (3 * pairs)
    # The angle of R̂ᵀR as atan2(sin, cos), sin from its skew part: arccos((tr - 1) / 2) has the same value
    # and gradient but float32 round-off in the trace is amplified by 1/sin² near 0, where good
    # predictions are. The angle clip is the official clip of cos to [-1 + 1e-6, 1 - 1e-6].
    m = jnp.einsum("...ki,...kj->...ij", rel_pred[..., :3, :3], rel_gt[..., :3, :3], precision=jax.lax.Precision.HIGHEST)
    cos = (jnp.trace(m, axis1=-2, axis2=-1) - 1) / 2
    sin = _safe_norm((m - jnp.swapaxes(m, -1, -2)).reshape(m.shape[:-2] + (9,))) / math.sqrt(8.0)
    angle = jnp.clip(_atan2_upper(sin, cos), _ROTATION_FLOOR, _ROTATION_CEIL)
    rot = jnp.sum(jnp.where(off, angle - (_ROTATION_FLOOR if subtract_floor else 0.0), 0.0)) / pairs
    return trans, rot, translation_weight * trans + rot


class GeometryCounts(NamedTuple):
    """The denominators of the batch reduction, counted on the GT of the WHOLE batch (float32 scalars).

    pixels: valid pixels of the usable samples; samples: usable samples; normal_samples: usable samples
    whose dataset enables the normal loss. A micro-batch divided by the full batch's counts gives its
    share of the full-batch loss, so shares add up exactly under gradient accumulation.
    """

    pixels: jax.Array
    samples: jax.Array
    normal_samples: jax.Array


def _valid_pixels(gt: GeometryTruth) -> jax.Array:
    """bool [N,V,H,W]: marked valid and with finite GT points."""
    return gt.valid.astype(bool) & jnp.all(jnp.isfinite(gt.world_points), axis=-1)


def _usable_samples(gt: GeometryTruth, valid: jax.Array) -> jax.Array:
    """bool [N]: samples that take part: a valid pixel, finite poses, and not padding."""
    ok = jnp.any(valid, axis=(1, 2, 3)) & gt.sample_valid.astype(bool).reshape(-1)
    return ok & jnp.all(jnp.isfinite(gt.poses), axis=(1, 2, 3))


def geometry_counts(gt: GeometryTruth) -> GeometryCounts:
    valid = _valid_pixels(gt)
    ok = _usable_samples(gt, valid)
    enabled = ok & gt.normal_loss_enabled.astype(bool).reshape(-1)
    pixels = jnp.sum(jnp.where(ok[:, None, None, None], valid, False))
    return GeometryCounts(pixels.astype(jnp.float32), jnp.sum(ok).astype(jnp.float32),
                          jnp.sum(enabled).astype(jnp.float32))


def sample_loss(pred: dict, world, valid, gt_poses, normal_enabled, cfg: LossConfig):
    """Visual-geometry terms of one sample (shapes without the batch axis). `valid` must already
    exclude non-finite GT points.

    Returns (terms, sample_total): terms are the sums the batch reduction adds up -- `local` and
    `global` summed over valid pixels and coordinates, `normal` (this sample's mean), `cam_trans`,
    `cam_rot`, `scale` -- and sample_total is this sample's own loss (its terms as means), which
    `cfg.clip_above` compares against.
    """
    world = jnp.where(jnp.isfinite(world), world.astype(jnp.float32), 0.0)  # raw GT where finite
    gt_world, gt_local, gt_poses = _normalise_gt(world, valid, gt_poses.astype(jnp.float32))
    count = jnp.maximum(jnp.sum(valid), 1)

    local = pred["local_points"].astype(jnp.float32)
    n = jnp.sum(jnp.where(valid, _safe_norm(local), 0.0)) / count
    n = jnp.maximum(n, 1e-8)
    local = local / n
    pred_poses = pred["camera_poses"].astype(jnp.float32).at[:, :3, 3].divide(n)

    z = gt_local[..., 2]
    view_mean = jnp.sum(jnp.where(valid, z, 0.0), axis=(1, 2)) / jnp.maximum(jnp.sum(valid, axis=(1, 2)), 1)
    weights = 1.0 / (jnp.maximum(z, 0.1 * view_mean[:, None, None]) + 1e-6)
    weights = jnp.where(valid, weights, 0.0)

    flat_valid = valid.reshape(-1)
    rows = _resample_positions(flat_valid)
    picked = jnp.concatenate([local.reshape(-1, 3), gt_local.reshape(-1, 3), weights.reshape(-1, 1)], -1)[rows]
    scale, k = _weighted_median_scale(picked[:, :3], picked[:, 3:6], picked[:, 6])
    # The coordinate whose ratio is s has residual s x̂ - x = 0 up to round-off: |.| sits on its kink
    # there, and the sign of the round-off (which differs between compilations, e.g. shardings) would
    # pick its gradient, ±w s. It gets the subgradient 0, the derivative of the L1 at the optimal scale.
    at_median = (jnp.arange(flat_valid.shape[0] * 3) == jnp.where(k >= 0, rows[k // 3] * 3 + k % 3, -1))
    at_median = at_median.reshape(local.shape)

    def l1_sum(points, target, kink=None):
        err = jnp.abs(scale * points - target)
        if kink is not None:
            err = jnp.where(kink, jax.lax.stop_gradient(err), err)
        return jnp.sum(jnp.where(valid, jnp.sum(err, axis=-1) * weights, 0.0))

    terms = {"local": l1_sum(local, gt_local, at_median), "scale": scale,
             "normal": jnp.where(normal_enabled, normal_loss(scale * local, gt_local, valid, cfg.subtract_floors), 0.0),
             "global": (l1_sum(pred["global_points"].astype(jnp.float32) / n, gt_world)
                        if "global_points" in pred else jnp.zeros((), jnp.float32))}
    terms["cam_trans"], terms["cam_rot"], _ = camera_loss(pred_poses, gt_poses, scale, cfg.translation_weight,
                                                          cfg.subtract_floors)
    own = {**terms, "local": terms["local"] / (3 * count), "global": terms["global"] / (3 * count)}
    return terms, _combine(own, cfg)


def _combine(terms: dict, cfg: LossConfig) -> jax.Array:
    """L_VG from its reduced terms (SPEC 2.1 step 9)."""
    camera = cfg.translation_weight * terms["cam_trans"] + terms["cam_rot"]
    return (terms["local"] + cfg.normal_weight * terms["normal"] + cfg.global_points_weight * terms["global"]
            + cfg.camera_weight * camera)


def visual_geometry_loss(pred: dict, gt: GeometryTruth, cfg: LossConfig,
                         counts: GeometryCounts | None = None) -> tuple[jax.Array, dict]:
    """The visual-geometry loss of a batch, reduced as the official Pi3Loss does (SPEC 2.1).

    pred: local_points [N,V,H,W,3], camera_poses [N,V,4,4] (c2w), optional global_points [N,V,H,W,3].
    gt:   `batch.GeometryTruth` of the same N samples.
    counts: the denominators; default `geometry_counts(gt)` (this batch). Pass the full batch's counts
      when `pred`/`gt` are one micro-batch of it: the result is then that micro-batch's share.

    Local and global point losses are means over all valid pixels (x 3 coordinates) of the usable
    samples, pixel-weighted across samples; the normal loss is the mean over the samples whose dataset
    enables it; the camera terms and the optimal scale are means over usable samples. A sample whose
    own loss exceeds `cfg.clip_above` (when > 0) contributes nothing but stays counted.
    Returns (loss, details): details holds each reduced term ('local', 'normal', 'global',
    'cam_trans', 'cam_rot', 'scale').
    """
    valid = _valid_pixels(gt)
    ok = _usable_samples(gt, valid)
    counts = geometry_counts(gt) if counts is None else counts
    n = valid.shape[0]
    poses = jnp.where(ok[:, None, None, None], gt.poses, jnp.eye(4))
    keys = [k for k in ("local_points", "camera_poses", "global_points") if k in pred]
    fn = lambda p, w, m, c, e: sample_loss(dict(zip(keys, p)), w, m, c, e, cfg)
    terms, totals = jax.vmap(fn)(tuple(pred[k] for k in keys), gt.world_points, valid, poses,
                                 gt.normal_loss_enabled.astype(bool).reshape(n))
    if cfg.clip_above > 0:
        ok = ok & ~(totals > cfg.clip_above)
    take = lambda x: jnp.sum(jnp.where(ok, x, 0.0))
    per = lambda x, d: take(x) / jnp.maximum(d, 1.0)
    details = {"local": per(terms["local"], 3 * counts.pixels), "global": per(terms["global"], 3 * counts.pixels),
               "normal": per(terms["normal"], counts.normal_samples),
               **{k: per(terms[k], counts.samples) for k in ("cam_trans", "cam_rot", "scale")}}
    return _combine(details, cfg), details
