"""Visual-geometry loss (SPEC 2.1) and cross entropy: invariances, exact scale, neutral values."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from g2vlm_jax import geometry as G
from g2vlm_jax import losses as L
from g2vlm_jax.batch import GeometryTruth
from g2vlm_jax.config import LossConfig

_LOSS = jax.jit(lambda p, g: L.visual_geometry_loss(p, g, LossConfig()))  # one compilation per shape


def _rot(rng):
    return G.quaternion_to_matrix(rng.normal(size=4))


def _scene(seed=0, b=2, v=3, h=8, w=10):
    """Random GT: depth > 0, intrinsics, c2w poses -> world points, valid mask, local points."""
    rng = np.random.default_rng(seed)
    # Smooth (planar) depth, so the depth-edge test of the normal loss keeps most pixels.
    u, vv = np.meshgrid(np.arange(w), np.arange(h))
    coef = rng.uniform(0.0, 0.05, size=(b, v, 2, 1, 1))
    depth = rng.uniform(1.5, 3.0, size=(b, v, 1, 1)) * (1 + coef[:, :, 0] * u / w + coef[:, :, 1] * vv / h)
    k = np.array([[20.0, 0, w / 2], [0, 20.0, h / 2], [0, 0, 1]])
    poses = np.tile(np.eye(4), (b, v, 1, 1))
    for i, j in itertools.product(range(b), range(v)):
        poses[i, j, :3, :3] = _rot(rng)
        poses[i, j, :3, 3] = rng.normal(size=3)
    local = G.depth_to_camera_points(depth, np.broadcast_to(k, (b, v, 3, 3)))
    world = G.transform_points(poses[:, :, None, None], local)
    valid = rng.uniform(size=(b, v, h, w)) > 0.1
    return {"local": local, "world": world, "poses": poses, "valid": valid}


def _gt(s, normal=True):
    b = s["valid"].shape[0]
    return GeometryTruth(world_points=jnp.asarray(s["world"], jnp.float32), valid=jnp.asarray(s["valid"]),
                         poses=jnp.asarray(s["poses"], jnp.float32), normal_loss_enabled=jnp.full((b,), normal),
                         sample_valid=jnp.ones((b,), bool))


def _pred_from_gt(s, scale, rigid):
    """What a perfect model could output: GT local points x k, poses = rigid ∘ GT with t x k."""
    poses = rigid @ s["poses"]
    poses[..., :3, 3] *= scale
    world = G.transform_points(rigid, s["world"]) * scale
    return {"local_points": jnp.asarray(s["local"] * scale, jnp.float32),
            "camera_poses": jnp.asarray(poses, jnp.float32), "global_points": jnp.asarray(world, jnp.float32)}


@pytest.mark.parametrize("scale", [1.0, 0.37, 5.0])
def test_loss_is_zero_for_gt_up_to_scale_and_rigid_transform(scale):
    s = _scene(1)
    rng = np.random.default_rng(7)
    rigid = np.eye(4)
    rigid[:3, :3], rigid[:3, 3] = _rot(rng), rng.normal(size=3)
    # Global points are compared in the GT frame 0: a perfect prediction is expressed there.
    pred = _pred_from_gt(s, scale, rigid)
    pred["global_points"] = jnp.asarray(G.transform_points(G.se3_inverse(s["poses"][:, :1, None, None]), s["world"]) * scale, jnp.float32)
    loss, details = _LOSS(pred, _gt(s))
    assert float(loss) < 1e-5, details
    for name in ("local", "normal", "global", "cam_trans", "cam_rot"):
        assert float(details[name]) < 1e-5, (name, details[name])


def test_camera_loss_invariant_to_global_rigid_transform():
    s = _scene(2)
    rng = np.random.default_rng(3)
    noisy = s["poses"].copy()
    noisy[..., :3, 3] += 0.1 * rng.normal(size=noisy[..., :3, 3].shape)
    rigid = np.eye(4)
    rigid[:3, :3], rigid[:3, 3] = _rot(rng), rng.normal(size=3)
    base = L.camera_loss(jnp.asarray(noisy[0]), jnp.asarray(s["poses"][0]), 1.3, 100.0)
    moved = L.camera_loss(jnp.asarray(rigid @ noisy[0]), jnp.asarray(s["poses"][0]), 1.3, 100.0)
    assert float(base[2]) > 1e-3
    np.testing.assert_allclose([float(x) for x in moved], [float(x) for x in base], rtol=1e-4, atol=1e-6)


def test_optimal_scale_equals_brute_force_argmin():
    rng = np.random.default_rng(4)
    for trial in range(5):
        pred = rng.normal(size=(7, 3))
        gt = pred * rng.uniform(0.5, 2.0) + 0.3 * rng.normal(size=(7, 3))
        w = rng.uniform(0.1, 2.0, size=7)
        s = float(L.optimal_scale(jnp.asarray(pred), jnp.asarray(gt), jnp.asarray(w)))
        objective = lambda c: np.sum(np.repeat(w, 3) * np.abs(c * pred.reshape(-1) - gt.reshape(-1)))
        candidates = (gt.reshape(-1) / pred.reshape(-1))  # the minimum of a piecewise-linear sum is at a kink
        best = min(objective(c) for c in candidates)
        assert objective(s) <= best * (1 + 1e-5)
        assert s > 0


def test_resample_valid_takes_nearest_valid_entries():
    values = jnp.arange(10.0)[:, None]
    valid = jnp.array([0, 1, 1, 0, 0, 1, 0, 0, 0, 1], bool)  # valid list: 1, 2, 5, 9
    out = L.resample_valid(values, valid, size=8)[:, 0]
    np.testing.assert_array_equal(np.asarray(out), [1, 1, 2, 2, 5, 5, 9, 9])


def test_neutral_values_for_empty_nan_and_padded_samples():
    s = _scene(5)
    pred = _pred_from_gt(s, 1.0, np.eye(4))
    pred["local_points"] = pred["local_points"] * 1.1 + 0.05  # a non-zero loss for the good sample
    gt = _gt(s)
    world = np.asarray(gt.world_points).copy()
    world[1] = np.nan  # sample 1 has only non-finite GT -> contributes nothing
    gt = gt.replace(world_points=jnp.asarray(world))
    loss_fn = _LOSS
    loss, _ = loss_fn(pred, gt)
    only0 = {k: v[:1] for k, v in pred.items()}
    loss0, _ = loss_fn(only0, jax.tree.map(lambda v: v[:1], gt))
    np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5)
    loss_none, _ = loss_fn(pred, gt.replace(sample_valid=jnp.array([False, False])))
    assert float(loss_none) == 0.0
    loss_empty, details = loss_fn(pred, gt.replace(valid=jnp.zeros_like(gt.valid)))
    assert float(loss_empty) == 0.0 and all(np.isfinite(float(v)) for v in details.values())


def test_gradients_are_finite_and_loss_decreases_toward_gt():
    s = _scene(6)
    gt = _gt(s)
    pred = _pred_from_gt(s, 1.0, np.eye(4))
    noisy = dict(pred, local_points=pred["local_points"] + 0.2)
    loss_fn = lambda p: L.visual_geometry_loss(p, gt, LossConfig())[0]
    grads = jax.grad(loss_fn)(noisy)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
    assert float(loss_fn(noisy)) > float(loss_fn(pred)) + 1e-3


def test_normal_loss_only_for_enabled_samples_and_clipping():
    s = _scene(8)
    pred = _pred_from_gt(s, 1.0, np.eye(4))
    rng = np.random.default_rng(0)
    pred["local_points"] = pred["local_points"] * (1 + 0.05 * rng.normal(size=pred["local_points"].shape))
    on = _LOSS(pred, _gt(s, normal=True))[1]["normal"]
    off = _LOSS(pred, _gt(s, normal=False))[1]["normal"]
    assert float(on) > 0 and float(off) == 0.0
    clipped, _ = L.visual_geometry_loss(pred, _gt(s), LossConfig(clip_above=1e-9))
    assert float(clipped) == 0.0


def _noisy_pred(s, seed=0):
    pred = _pred_from_gt(s, 1.0, np.eye(4))
    rng = np.random.default_rng(seed)
    for key in ("local_points", "global_points"):
        pred[key] = pred[key] * (1 + 0.1 * rng.normal(size=pred[key].shape)).astype(np.float32)
    return pred


def _one(tree, i):
    return jax.tree.map(lambda v: v[i:i + 1], tree)


def test_point_losses_are_pixel_weighted_and_normal_averages_enabled_samples():
    """The official Pi3Loss reduction: local/global means over all valid pixels of the batch, the normal
    loss over the samples whose dataset enables it, camera terms over samples."""
    s = _scene(11, b=2)
    s["valid"][0] = False
    s["valid"][0, 0, :3, :4] = True  # sample 0: 12 valid pixels, sample 1: ~216
    pred = _noisy_pred(s)
    gt = _gt(s).replace(normal_loss_enabled=jnp.array([True, False]))
    _, batch = _LOSS(pred, gt)
    alone = [_LOSS(_one(pred, i), _one(gt, i))[1] for i in range(2)]
    pixels = s["valid"].sum(axis=(1, 2, 3))
    for key in ("local", "global"):
        want = sum(float(alone[i][key]) * pixels[i] for i in range(2)) / pixels.sum()
        np.testing.assert_allclose(float(batch[key]), want, rtol=1e-5)
        assert abs(want - np.mean([float(a[key]) for a in alone])) > 0.05 * want  # differs from the sample mean
    np.testing.assert_allclose(float(batch["normal"]), float(alone[0]["normal"]), rtol=1e-5)
    for key in ("cam_trans", "cam_rot"):
        np.testing.assert_allclose(float(batch[key]), np.mean([float(a[key]) for a in alone]), rtol=1e-5)


def test_micro_batch_shares_add_up_to_the_batch_loss():
    """With the full batch's counts, the losses of two halves add up to the loss of the whole."""
    s = _scene(12, b=4)
    s["valid"][1, :, 2:] = False
    pred = _noisy_pred(s, 1)
    gt = _gt(s).replace(normal_loss_enabled=jnp.array([True, False, True, True]))
    whole, details = _LOSS(pred, gt)
    counts = L.geometry_counts(gt)
    halves = [L.visual_geometry_loss(jax.tree.map(lambda v: v[i:i + 2], pred), jax.tree.map(lambda v: v[i:i + 2], gt),
                                     LossConfig(), counts) for i in (0, 2)]
    np.testing.assert_allclose(float(halves[0][0] + halves[1][0]), float(whole), rtol=1e-5)
    for key, value in details.items():
        np.testing.assert_allclose(float(halves[0][1][key] + halves[1][1][key]), float(value), rtol=1e-5, atol=1e-7)


def test_normal_edges_come_from_the_raw_gt_depth():
    """Invalid pixels keep their (finite) depth for the depth-edge test, as in the official loss: on a
    plane with holes in the mask no pixel is an edge, so the loss equals the one computed with the
    triangle masks from `valid` alone. Zeroing the invalid depths first would make the holes' rims edges."""
    s = _scene(13, b=1)
    s["valid"][:] = True
    s["valid"][0, :, 3:5, 4:6] = False
    pred = _noisy_pred(s, 2)
    gt = _gt(s)
    local = jnp.asarray(s["local"][0], jnp.float32)
    assert not bool(jnp.any(L._depth_edge(local[..., 2])))
    got = _LOSS(pred, gt)[1]["normal"]
    zeroed = jnp.where(jnp.asarray(s["valid"][0])[..., None], local, 0.0)
    assert bool(jnp.any(L._depth_edge(zeroed[..., 2])))  # what the old convention would have masked
    s_zero = dict(s, world=np.where(s["valid"][..., None], s["world"], 0.0))
    assert float(_LOSS(pred, _gt(s_zero))[1]["normal"]) != pytest.approx(float(got), rel=1e-3)


def test_official_floors_are_available_by_name():
    """subtract_floors=False keeps the official clamp floors: a perfect prediction then scores the
    floor (1 degree smoothed per counted triangle, arccos(1 - 1e-6) per pair), nothing else changes."""
    s = _scene(14, b=1)
    pred = _pred_from_gt(s, 1.0, np.eye(4))
    _, ours = _LOSS(pred, _gt(s))
    _, official = L.visual_geometry_loss(pred, _gt(s), LossConfig(subtract_floors=False))
    assert float(ours["cam_rot"]) < 1e-6 and float(official["cam_rot"]) == pytest.approx(L._ROTATION_FLOOR, rel=1e-4)
    assert float(official["normal"]) > float(ours["normal"]) + 1e-6
    np.testing.assert_allclose(float(official["local"]), float(ours["local"]), atol=1e-7)


def test_cross_entropy_sums_and_token_mean():
    logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
    labels = jnp.array([[0, 1]])
    total, count = L.cross_entropy_sums(logits, labels, jnp.array([[1.0, 1.0]]))
    np.testing.assert_allclose(float(total), -np.log(0.5) - np.log(0.8), rtol=1e-6)
    assert float(count) == 2
    masked = L.token_mean_cross_entropy(logits, labels, jnp.array([[0.0, 1.0]]))
    np.testing.assert_allclose(float(masked), -np.log(0.8), rtol=1e-6)
    assert float(L.token_mean_cross_entropy(logits, labels, jnp.zeros((1, 2)))) == 0.0


def test_local_l1_gradient_does_not_depend_on_rounding_at_the_median_coordinate():
    """The coordinate whose ratio x/x̂ is the optimal scale s has residual s x̂ - x = 0 up to round-off.

    Its L1 gradient must not be ±w s by the sign of that round-off (which differs between compilations,
    e.g. 1 device vs a sharded batch, and made sharded training trajectories drift): nudging that one
    coordinate by a few ulps, which flips the round-off's sign, must leave the gradient unchanged.
    """
    s = _scene(9, b=1, v=2)
    cfg = LossConfig(camera_weight=0.0, normal_weight=0.0, global_points_weight=0.0)
    gt = _gt(s)
    rng = np.random.default_rng(1)
    pred = _pred_from_gt(s, 1.0, np.eye(4))
    pred["local_points"] = jnp.asarray(np.asarray(pred["local_points"]) * (1 + 0.1 * rng.normal(size=s["local"].shape)),
                                       jnp.float32)
    # Locate the median coordinate as sample_loss does.
    valid = jnp.asarray(s["valid"][0])
    _, gt_local, _ = L._normalise_gt(jnp.where(valid[..., None], gt.world_points[0], 0.0), valid, gt.poses[0])
    local = pred["local_points"][0]
    local = local / (jnp.sum(jnp.where(valid, L._safe_norm(local), 0.0)) / jnp.sum(valid))
    z = gt_local[..., 2]
    view_mean = jnp.sum(jnp.where(valid, z, 0.0), axis=(1, 2)) / jnp.sum(valid, axis=(1, 2))
    weights = jnp.where(valid, 1.0 / (jnp.maximum(z, 0.1 * view_mean[:, None, None]) + 1e-6), 0.0)
    rows = L._resample_positions(valid.reshape(-1))
    _, k = L._weighted_median_scale(local.reshape(-1, 3)[rows], gt_local.reshape(-1, 3)[rows], weights.reshape(-1)[rows])
    k = int(k)
    assert k >= 0
    flat = int(rows[k // 3]) * 3 + k % 3
    grad = jax.jit(jax.grad(lambda p: L.visual_geometry_loss(p, gt, cfg)[0]))
    grads = []
    for ulps in range(-4, 5):  # 0 ulps is grads[4]
        x = np.asarray(pred["local_points"]).reshape(-1).copy()
        for _ in range(abs(ulps)):
            x[flat] = np.nextafter(x[flat], np.float32(np.sign(ulps) * np.inf))
        x = jnp.asarray(x.reshape(pred["local_points"].shape))
        grads.append(np.asarray(grad(dict(pred, local_points=x))["local_points"]))
    spread = max(np.abs(g - grads[4]).max() for g in grads) / np.abs(grads[4]).max()
    assert spread < 1e-3, spread  # without the fix: ~2 (the median coordinate's gradient flips sign)


def test_normal_loss_gradient_matches_finite_differences():
    """The normal loss's hand-written gradient (`losses._normal_loss_sum`: corner cotangents added back by a
    2x2 convolution) against central finite differences in float64, on a smooth surface with an invalid pixel
    and a depth step (edge masking)."""
    rng = np.random.default_rng(3)
    v, h, w = 2, 5, 6
    u, vv = np.meshgrid(np.linspace(-1, 1, w), np.linspace(-1, 1, h))
    z = 3.0 + 0.05 * np.sin(2 * u) * np.cos(vv)
    z[:, 4:] += 0.5  # a depth step: the triangles across it are masked out
    gt = np.stack([u * z, vv * z, z], -1)[None].repeat(v, 0)
    valid = np.ones((v, h, w), bool)
    valid[1, 2, 3] = False
    pred = gt * (1 + 0.05 * rng.normal(size=gt.shape))
    with jax.enable_x64(True):
        loss = lambda p: L.normal_loss(p, jnp.asarray(gt), jnp.asarray(valid), subtract_floor=False)
        grad = np.asarray(jax.grad(loss)(jnp.asarray(pred)))
        eps = 1e-6
        fd = np.zeros_like(pred)
        for idx in np.ndindex(pred.shape):
            step = np.zeros_like(pred)
            step[idx] = eps
            fd[idx] = (float(loss(jnp.asarray(pred + step))) - float(loss(jnp.asarray(pred - step)))) / (2 * eps)
    assert np.abs(grad).max() > 1e-4  # the loss is not flat here
    np.testing.assert_allclose(grad, fd, rtol=1e-5, atol=1e-9)


def _plain_normal_loss(pred, gt, valid):
    """The normal loss written the straightforward way (corner slices, jnp.arctan2, autodiff), for the test below."""
    mask = valid & ~L._depth_edge(gt[..., 2])
    total = 0.0
    for n_pred, n_gt, m in zip(L._triangle_normals(L._quad_corners(pred)), L._triangle_normals(L._quad_corners(gt)),
                               L._triangle_masks(mask)):
        c = L._cross3(n_pred, n_gt)
        err = jnp.clip(jnp.arctan2(L._safe_sqrt(L._dot3(c, c)) + 1e-12, L._dot3(n_pred, n_gt)), L._MIN_ANGLE,
                       L._MAX_ANGLE)
        smooth = jnp.where(err < L._BETA, 0.5 * err * err / L._BETA, err - 0.5 * L._BETA)
        total = total + jnp.where(m, smooth - L._NORMAL_FLOOR, 0.0)
    return jnp.mean(total) / (4 * max(pred.shape[1:3]))


def test_normal_loss_float32_equals_the_plain_formulation():
    """In float32 (the fast atan2 and the convolution scatter) value and gradient equal autodiff of the plain
    formulation at round-off, on a curved surface with invalid pixels and a depth step."""
    rng = np.random.default_rng(4)
    v, h, w = 3, 14, 17
    u, vv = np.meshgrid(np.linspace(-1, 1, w), np.linspace(-0.8, 0.8, h))
    z = 4.0 + 0.4 * np.sin(3 * u) * np.cos(2 * vv)
    z[:, 9:] += 0.6
    gt = jnp.asarray(np.stack([u * z, vv * z, z], -1)[None].repeat(v, 0), jnp.float32)
    valid = jnp.asarray(rng.random((v, h, w)) > 0.1)
    pred = gt * jnp.asarray(1 + 0.05 * rng.normal(size=gt.shape), jnp.float32)
    value, grad = jax.value_and_grad(lambda p: L.normal_loss(p, gt, valid))(pred)
    ref_value, ref_grad = jax.value_and_grad(lambda p: _plain_normal_loss(p, gt, valid))(pred)
    assert float(value) > 1e-4
    np.testing.assert_allclose(float(value), float(ref_value), rtol=2e-6)
    np.testing.assert_allclose(np.asarray(grad), np.asarray(ref_grad), rtol=1e-4, atol=1e-6 * np.abs(ref_grad).max())


def test_atan2_upper_matches_arctan2_to_float32_round_off():
    """`losses._atan2_upper` (the polynomial atan2 for y >= 0) against float64 arctan2 over eleven decades, the
    axes and the origin; its derivative equals jnp.arctan2's."""
    rng = np.random.default_rng(5)
    n = 200_000
    y = (np.abs(rng.normal(size=n)) * 10.0 ** rng.uniform(-8, 3, n)).astype(np.float32)
    x = (rng.normal(size=n) * 10.0 ** rng.uniform(-8, 3, n)).astype(np.float32)
    y = np.concatenate([y, [0, 0, 1, 2, 0, 1e-30]]).astype(np.float32)
    x = np.concatenate([x, [1, -1, 0, 2, 0, -1]]).astype(np.float32)
    got = np.asarray(jax.jit(L._atan2_upper)(y, x), np.float64)
    ref = np.arctan2(y.astype(np.float64), x.astype(np.float64))
    assert np.abs(got - ref).max() < 4e-7
    np.testing.assert_array_equal(got[-6:-1], np.float32([0, np.pi, np.pi / 2, np.pi / 4, 0]).astype(np.float64))
    grads = jax.grad(lambda a, b: jnp.sum(L._atan2_upper(a, b)), argnums=(0, 1))(y[:1000], x[:1000])
    ref_grads = jax.grad(lambda a, b: jnp.sum(jnp.arctan2(a, b)), argnums=(0, 1))(y[:1000], x[:1000])
    for g, r in zip(grads, ref_grads):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-6)
