"""A reconstruction as a COLMAP sparse model (cameras, images, points3D), in COLMAP's text and binary forms.

The layout and field order are those of COLMAP's documentation ("Output format") and of its own
reader/writer (`colmap/scene/reconstruction_io.cc`), so COLMAP, pycolmap, nerfstudio, gsplat and
other 3-D tools open it as a sparse model:

    cameras.txt / .bin    one PINHOLE camera per view: fx fy cx cy
    images.txt / .bin     per view the world-to-camera rotation (quaternion w x y z) and translation,
                          the camera id, the image name, and its 2-D observations (x y point3D_id)
    points3D.txt / .bin   id, xyz, rgb, reprojection error (0: points come from a depth map, not
                          triangulation), and the track (image_id, point2D_idx): the one view and pixel
                          the point was predicted at

Conventions: our intrinsics index pixel centres from 0 (u = fx x / z + cx); COLMAP's image
coordinates put the first pixel's centre at (0.5, 0.5), so cx, cy and every observation gain 0.5.
Points are the finite predicted points of a regular pixel grid, subsampled to at most `max_points`.
"""
from __future__ import annotations

import pathlib
import struct

import numpy as np

PINHOLE = 1  # COLMAP camera model id (parameters fx, fy, cx, cy)


def rotation_to_quaternion(r: np.ndarray) -> np.ndarray:
    """float64[4] (w, x, y, z), w >= 0, of a rotation matrix [3, 3] (Shepperd's method, stable at any angle)."""
    m = np.asarray(r, np.float64)
    trace = np.trace(m)
    diag = np.diag(m)
    k = int(np.argmax([trace, *diag]))
    if k == 0:
        s = 2.0 * np.sqrt(1.0 + trace)
        q = np.array([s / 4, (m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s])
    else:
        i = k - 1
        j, l = (i + 1) % 3, (i + 2) % 3
        s = 2.0 * np.sqrt(1.0 + m[i, i] - m[j, j] - m[l, l])
        q = np.empty(4)
        q[0] = (m[l, j] - m[j, l]) / s
        q[1 + i] = s / 4
        q[1 + j] = (m[j, i] + m[i, j]) / s
        q[1 + l] = (m[l, i] + m[i, l]) / s
    q /= np.linalg.norm(q)
    return q if q[0] >= 0 else -q


def _observations(world_points: np.ndarray, images: np.ndarray, max_points: int):
    """The points to export: (view, row, col) of kept pixels, their xyz and rgb."""
    v, h, w = world_points.shape[:3]
    stride = max(1, int(np.ceil(np.sqrt(v * h * w / max_points))))
    grid = np.zeros((v, h, w), bool)
    grid[:, stride // 2::stride, stride // 2::stride] = True
    keep = grid & np.isfinite(world_points).all(-1)
    views, rows, cols = np.nonzero(keep)
    return views, rows, cols, world_points[keep].astype(np.float64), images[keep]


def write_colmap(out_dir: str | pathlib.Path, images: np.ndarray, world_points: np.ndarray, c2w: np.ndarray,
                 intrinsics: np.ndarray, names: list[str], *, max_points: int = 200_000) -> int:
    """Writes the sparse model (text and binary) into `out_dir`; returns the number of 3-D points.

    images uint8[V, H, W, 3]; world_points [V, H, W, 3] (non-finite = no point); c2w [V, 4, 4] (OpenCV
    axes); intrinsics [V, 3, 3] (pixel-index convention); names: the image file names.
    """
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    v, h, w = images.shape[:3]
    views, rows, cols, xyz, rgb = _observations(world_points, images, max_points)
    point_ids = np.arange(1, len(xyz) + 1)
    per_view = [np.nonzero(views == i)[0] for i in range(v)]  # point indexes observed by each view
    w2c = np.linalg.inv(np.asarray(c2w, np.float64))
    cams = [(i + 1, [intrinsics[i][0, 0], intrinsics[i][1, 1], intrinsics[i][0, 2] + 0.5, intrinsics[i][1, 2] + 0.5])
            for i in range(v)]
    poses = [(rotation_to_quaternion(w2c[i, :3, :3]), w2c[i, :3, 3]) for i in range(v)]
    # The index of each point among its view's observations (point2D_idx of its track).
    point2d_idx = np.empty(len(xyz), np.int64)
    for idx in per_view:
        point2d_idx[idx] = np.arange(len(idx))

    with open(out / "cameras.txt", "w") as f:
        f.write(f"# Camera list with one line of data per camera:\n#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]\n"
                f"# Number of cameras: {v}\n")
        for cam_id, params in cams:
            f.write(f"{cam_id} PINHOLE {w} {h} " + " ".join(f"{p:.17g}" for p in params) + "\n")
    with open(out / "images.txt", "w") as f:
        f.write("# Image list with two lines of data per image:\n"
                "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME\n"
                "#   POINTS2D[] as (X, Y, POINT3D_ID)\n"
                f"# Number of images: {v}, mean observations per image: {len(xyz) / max(v, 1):.1f}\n")
        for i in range(v):
            q, t = poses[i]
            f.write(f"{i + 1} " + " ".join(f"{x:.17g}" for x in (*q, *t)) + f" {i + 1} {names[i]}\n")
            f.write(" ".join(f"{cols[k] + 0.5:.17g} {rows[k] + 0.5:.17g} {point_ids[k]}" for k in per_view[i]) + "\n")
    with open(out / "points3D.txt", "w") as f:
        f.write("# 3D point list with one line of data per point:\n"
                "#   POINT3D_ID, X, Y, Z, R, G, B, ERROR, TRACK[] as (IMAGE_ID, POINT2D_IDX)\n"
                f"# Number of points: {len(xyz)}, mean track length: 1\n")
        for k in range(len(xyz)):
            x, y, z = xyz[k]
            r, g, b = (int(c) for c in rgb[k])
            f.write(f"{point_ids[k]} {x:.17g} {y:.17g} {z:.17g} {r} {g} {b} 0 {views[k] + 1} {point2d_idx[k]}\n")

    with open(out / "cameras.bin", "wb") as f:
        f.write(struct.pack("<Q", v))
        for cam_id, params in cams:
            f.write(struct.pack("<iiQQ4d", cam_id, PINHOLE, w, h, *params))
    with open(out / "images.bin", "wb") as f:
        f.write(struct.pack("<Q", v))
        for i in range(v):
            q, t = poses[i]
            f.write(struct.pack("<i4d3di", i + 1, *q, *t, i + 1) + names[i].encode("utf-8") + b"\x00")
            obs = np.zeros(len(per_view[i]), dtype=[("x", "<f8"), ("y", "<f8"), ("id", "<i8")])
            obs["x"], obs["y"], obs["id"] = cols[per_view[i]] + 0.5, rows[per_view[i]] + 0.5, point_ids[per_view[i]]
            f.write(struct.pack("<Q", len(obs)) + obs.tobytes())
    with open(out / "points3D.bin", "wb") as f:
        f.write(struct.pack("<Q", len(xyz)))
        record = np.zeros(len(xyz), dtype=[("id", "<u8"), ("xyz", "<f8", 3), ("rgb", "u1", 3), ("error", "<f8"),
                                          ("track_length", "<u8"), ("image_id", "<i4"), ("point2d_idx", "<i4")])
        record["id"], record["xyz"], record["rgb"] = point_ids, xyz, rgb
        record["track_length"], record["image_id"], record["point2d_idx"] = 1, views + 1, point2d_idx
        f.write(record.tobytes())
    return len(xyz)
