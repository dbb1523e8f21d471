"""Geometry: SE(3)/Sim(3), unprojection/projection, rotations, intrinsics recovery; numpy and jnp alike."""
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest

from g2vlm_jax import geometry as G

FIXTURE = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "pi3_room" / "condition.npz"
if not FIXTURE.exists():
    FIXTURE = pathlib.Path("/work/shared/fixtures/pi3_room/condition.npz")


def random_rotation(rng, n=None):
    q = rng.normal(size=(4,) if n is None else (n, 4))
    return G.quaternion_to_matrix(q)


def random_pose(rng, n=None):
    shape = () if n is None else (n,)
    pose = np.tile(np.eye(4), shape + (1, 1))
    pose[..., :3, :3] = random_rotation(rng, n)
    pose[..., :3, 3] = rng.normal(size=shape + (3,))
    return pose


def test_se3_inverse_and_compose():
    rng = np.random.default_rng(0)
    p = random_pose(rng, 5)
    np.testing.assert_allclose(G.se3_compose(p, G.se3_inverse(p)), np.tile(np.eye(4), (5, 1, 1)), atol=1e-12)
    np.testing.assert_allclose(G.se3_inverse(p), np.linalg.inv(p), atol=1e-12)
    pj = G.se3_inverse(jnp.asarray(p, jnp.float32))
    np.testing.assert_allclose(np.asarray(pj), np.linalg.inv(p), atol=1e-5)
    np.testing.assert_allclose(G.w2c_to_c2w(G.c2w_to_w2c(p)), p, atol=1e-12)


def test_depth_world_project_round_trip():
    rng = np.random.default_rng(1)
    depth = rng.uniform(1, 5, size=(2, 6, 7))
    k = np.array([[[50.0, 0, 3.2], [0, 55.0, 2.9], [0, 0, 1]]] * 2)
    c2w = random_pose(rng, 2)
    world = G.depth_to_world_points(depth, k, c2w)
    cam = G.transform_points(G.se3_inverse(c2w)[:, None, None], world)
    np.testing.assert_allclose(cam[..., 2], depth, rtol=1e-12)
    uv, z = G.project_points(cam, k[:, None, None])
    u, v = G.pixel_grid(6, 7)
    np.testing.assert_allclose(uv[..., 0], np.broadcast_to(u, (2, 6, 7)), atol=1e-9)
    np.testing.assert_allclose(uv[..., 1], np.broadcast_to(v, (2, 6, 7)), atol=1e-9)
    wj = G.depth_to_world_points(jnp.asarray(depth, jnp.float32), jnp.asarray(k, jnp.float32), jnp.asarray(c2w, jnp.float32))
    np.testing.assert_allclose(np.asarray(wj), world, atol=1e-4)


def test_recover_intrinsics_exact():
    k = np.array([[120.0, 0, 30.5], [0, 110.0, 21.0], [0, 0, 1]])
    depth = np.random.default_rng(2).uniform(1, 3, size=(40, 60))
    local = G.depth_to_camera_points(depth, k)
    np.testing.assert_allclose(G.recover_intrinsics(local), k, atol=1e-8)
    local[0, 0] = np.nan  # ignored, not propagated
    np.testing.assert_allclose(G.recover_intrinsics(local), k, atol=1e-8)
    np.testing.assert_allclose(np.asarray(G.recover_intrinsics(jnp.asarray(local, jnp.float32))), k, rtol=1e-3)


def test_umeyama_recovers_sim3():
    rng = np.random.default_rng(3)
    src = rng.normal(size=(200, 3))
    r = random_rotation(rng)
    s, t = 2.7, rng.normal(size=3)
    dst = G.apply_sim3(s, r, t, src)
    s2, r2, t2 = G.umeyama(src, dst)
    assert abs(s2 - s) < 1e-6
    np.testing.assert_allclose(r2, r, atol=1e-6)
    np.testing.assert_allclose(t2, t, atol=1e-6)
    with pytest.raises(ValueError, match="at least 3"):
        G.umeyama(src[:2], dst[:2])
    with pytest.raises(ValueError, match="degenerate"):
        G.umeyama(np.ones((5, 3)), dst[:5])
    with pytest.raises(ValueError, match="NaN"):
        G.umeyama(np.full((5, 3), np.nan), dst[:5])
    # the metrics' fit: the same similarity, and a collapsed source maps onto the destination's centroid
    np.testing.assert_allclose(G.similarity_or_centroid(src, dst)[1], r2)
    s3, r3, t3 = G.similarity_or_centroid(np.full((5, 3), 1e6), dst[:5])
    assert s3 == 0 and (r3 == np.eye(3)).all()
    np.testing.assert_allclose(t3, dst[:5].mean(0))


def test_rotations_quaternions_and_angles():
    rng = np.random.default_rng(4)
    m = rng.normal(size=(500, 3, 3))
    r = G.nearest_rotation(m)
    np.testing.assert_allclose(np.linalg.det(r), 1.0, atol=1e-9)
    np.testing.assert_allclose(np.swapaxes(r, -1, -2) @ r, np.tile(np.eye(3), (500, 1, 1)), atol=1e-9)
    rj = np.asarray(G.rotation_from_9d(jnp.asarray(m.reshape(500, 9), jnp.float32)))
    np.testing.assert_allclose(np.linalg.det(rj), 1.0, atol=1e-5)
    q = G.matrix_to_quaternion(r)
    np.testing.assert_allclose(G.quaternion_to_matrix(q), r, atol=1e-9)
    assert (q[:, 0] >= 0).all()
    # 180° rotations are the hard case of the trace formula.
    flip = np.diag([1.0, -1.0, -1.0])
    np.testing.assert_allclose(G.quaternion_to_matrix(G.matrix_to_quaternion(flip)), flip, atol=1e-9)
    # Known angle: rotation by 15° about z.
    a = np.radians(15)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    assert abs(G.rotation_angle(np.eye(3), rz) - 15) < 1e-9
    assert abs(G.quaternion_angle(G.matrix_to_quaternion(np.eye(3)), G.matrix_to_quaternion(rz)) - 15) < 1e-6


def test_check_pose_rejects_bad_poses():
    p = np.eye(4)
    G.check_pose(p)
    bad = p.copy()
    bad[:3, :3] = 0
    with pytest.raises(ValueError, match="singular"):
        G.check_pose(bad, "c2w[3]")
    bad = p.copy()
    bad[0, 3] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        G.check_pose(bad)
    with pytest.raises(ValueError, match=r"\[..., 4, 4\]"):
        G.check_pose(np.eye(3))


def test_real_fixture_views_reproject_consistently():
    data = np.load(FIXTURE)
    depth, poses, k = data["depths"].astype(np.float64), data["poses"].astype(np.float64), data["intrinsics"].astype(np.float64)
    errors = []
    # Pairs that see the same surfaces (views 4-7 look elsewhere in the room than views 0-3).
    for i, j in [(0, 1), (1, 2), (3, 2), (5, 4), (6, 4)]:
        valid = depth[i] > 0
        world = G.depth_to_world_points(depth[i], k[i], poses[i])[valid][::7]
        cam_j = G.transform_points(G.se3_inverse(poses[j]), world)
        uv, z = G.project_points(cam_j, k[j])
        u, v = np.round(uv[:, 0]).astype(int), np.round(uv[:, 1]).astype(int)
        h, w = depth.shape[1:]
        inside = (z > 0) & (u >= 0) & (u < w) & (v >= 0) & (v < h)
        dj = depth[j][v[inside], u[inside]]
        ok = dj > 0
        assert ok.sum() > 5000, f"views {i} and {j} share only {ok.sum()} sampled points"
        rel = np.abs(z[inside][ok] - dj[ok]) / dj[ok]
        errors.append(np.median(rel))
    assert max(errors) < 0.01, errors
