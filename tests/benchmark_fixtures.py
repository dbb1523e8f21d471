"""Tiny benchmark datasets in their released on-disk layouts, one writer per dataset, shared by the suite
tests (test_benchmark_{pointmap,depth,pose,qa}.py) and the every-suite CLI test (test_benchmark_cli.py).

Geometry writers return the truth an oracle predictor looks up by an image's decoded pixels (bytes ->
depth / pose); QA writers take the question table whose rows they write (the tables also hold the
scripted answers and hand-computed scores test_benchmark_qa.py checks).
"""
import gzip
import json
import pathlib

import av
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from g2vlm_jax import geometry
from g2vlm_jax.evaluation.benchmarks import pose_suites
from g2vlm_jax.evaluation.benchmarks.depth_suites import BONN_SEQUENCES, SINTEL_SEQUENCES


# --------------------------------------------------------------------------------------------------
# Point maps: 7-Scenes, NRGBD, ETH3D
# --------------------------------------------------------------------------------------------------
POINTMAP_HW = (12, 16)  # tiny frames; the readers scale the datasets' 640x480 intrinsics to the file size


def rotation_about_y(k: int) -> np.ndarray:
    angle = 0.2 * k
    return np.array([[np.cos(angle), 0, np.sin(angle)], [0, 1, 0], [-np.sin(angle), 0, np.cos(angle)]])


def pointmap_pose(k: int) -> np.ndarray:
    """A camera-to-world pose (OpenCV axes) per frame: turning and moving sideways."""
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = rotation_about_y(k), [0.05 * k, 0.01 * k, -0.02 * k]
    return c2w


def _depth_mm(k: int) -> np.ndarray:
    """uint16 millimetres [H, W] of a slanted wall, with one invalid pixel (0)."""
    h, w = POINTMAP_HW
    u = np.arange(w)[None, :]
    depth = np.broadcast_to(1500 + 40 * u + 10 * k, (h, w)).astype(np.uint16).copy()
    depth[0, 0] = 0
    return depth


def _pointmap_image(rng) -> np.ndarray:
    return rng.integers(0, 255, (*POINTMAP_HW, 3), dtype=np.uint8)


def write_seven_scenes(root: pathlib.Path, frames: int = 81) -> dict:
    """ROOT/chess/{TestSplit.txt, seq-03/frame-NNNNNN.{color.png, depth.png, pose.txt}}; returns the truth
    per image (bytes -> (depth m, c2w)) for the oracle. One unit (chess/seq-03)."""
    rng, truth = np.random.default_rng(0), {}
    seq = root / "chess" / "seq-03"
    seq.mkdir(parents=True)
    (root / "chess" / "TestSplit.txt").write_text("sequence3\n")
    for k in range(frames):
        image, depth = _pointmap_image(rng), _depth_mm(k)
        if k == 40:
            depth[1, 1] = 65535  # the 7-Scenes "no depth" value
        Image.fromarray(image).save(seq / f"frame-{k:06d}.color.png")
        Image.fromarray(depth).save(seq / f"frame-{k:06d}.depth.png")
        np.savetxt(seq / f"frame-{k:06d}.pose.txt", pointmap_pose(k))
        truth[image.tobytes()] = (np.where(depth == 65535, 0, depth) / 1000.0, pointmap_pose(k))
    return truth


def write_nrgbd(root: pathlib.Path, frames: int = 201) -> dict:
    """ROOT/kitchen/{images/imgN.png, depth/depthN.png, poses.txt (OpenGL c2w, 4 lines per frame)}. One unit."""
    rng, truth = np.random.default_rng(1), {}
    scene = root / "kitchen"
    (scene / "images").mkdir(parents=True)
    (scene / "depth").mkdir()
    gl = np.diag([1.0, -1.0, -1.0, 1.0])  # OpenCV camera axes -> OpenGL (its own inverse)
    lines = []
    for k in range(frames):
        image, depth = _pointmap_image(rng), _depth_mm(k)
        Image.fromarray(image).save(scene / "images" / f"img{k}.png")
        Image.fromarray(depth).save(scene / "depth" / f"depth{k}.png")
        lines += [" ".join(f"{x:.9f}" for x in row) for row in pointmap_pose(k) @ gl]
        truth[image.tobytes()] = (depth / 1000.0, pointmap_pose(k))
    (scene / "poses.txt").write_text("\n".join(lines) + "\n")
    return truth


def write_eth3d(root: pathlib.Path, frames: int = 6) -> dict:
    """ROOT/courtyard/{images,ground_truth_depth}/custom_undistorted/DSC_NNNN.JPG, custom_undistorted_cam/*.npz
    (π³'s prepare_eth3d.py layout: float32 depth without header, w2c extrinsics). One unit."""
    rng, truth = np.random.default_rng(2), {}
    scene = root / "courtyard"
    for sub in ("images/custom_undistorted", "ground_truth_depth/custom_undistorted", "custom_undistorted_cam"):
        (scene / sub).mkdir(parents=True)
    k_mat = np.array([[20.0, 0, 7.5], [0, 20.0, 5.5], [0, 0, 1]])
    for k in range(frames):
        image = _pointmap_image(rng)
        depth = (_depth_mm(k) / 1000.0).astype(np.float32)
        depth[2, 3] = np.inf  # no GT
        name = f"DSC_{k:04d}"
        Image.fromarray(image).save(scene / "images/custom_undistorted" / f"{name}.JPG", format="PNG")  # lossless
        depth.tofile(scene / "ground_truth_depth/custom_undistorted" / f"{name}.JPG")
        np.savez(scene / "custom_undistorted_cam" / f"{name}.npz", intrinsics=k_mat,
                 extrinsics=geometry.se3_inverse(pointmap_pose(k)))
        truth[np.asarray(Image.open(scene / "images/custom_undistorted" / f"{name}.JPG").convert("RGB")).tobytes()] = (
            np.where(np.isfinite(depth), depth, 0.0).astype(np.float64), pointmap_pose(k), k_mat)
    return truth


# --------------------------------------------------------------------------------------------------
# Depth: Sintel (.dpt), Bonn (PNG 5000/m), KITTI (PNG 256/m), NYU-v2 (.npy m)
# --------------------------------------------------------------------------------------------------
DEPTH_HW = (8, 12)
DEPTH_FRAMES = 2  # frames per Sintel / Bonn sequence and KITTI drive
KITTI_DRIVES = ("2011_09_26_drive_0002_sync_02", "2011_09_26_drive_0005_sync_03")


def depth_wall(k: int) -> np.ndarray:
    """Metres [H, W] of a slanted wall, 1.5..2.6 m, different per frame."""
    h, w = DEPTH_HW
    u, v = np.arange(w)[None, :], np.arange(h)[:, None]
    return 1.5 + 0.08 * u + 0.02 * v + 0.05 * k + np.zeros((h, w))


def write_dpt(path: pathlib.Path, depth: np.ndarray) -> None:
    """MPI-Sintel .dpt: float32 tag 202021.25, int32 width, int32 height, float32 depth row by row."""
    h, w = depth.shape
    path.write_bytes(np.float32(202021.25).tobytes() + np.int32(w).tobytes() + np.int32(h).tobytes()
                     + depth.astype("<f4").tobytes())


def _save_depth_image(path: pathlib.Path, rng, truth: dict, depth: np.ndarray) -> None:
    image = rng.integers(0, 255, (*DEPTH_HW, 3), dtype=np.uint8)
    Image.fromarray(image).save(path)
    truth[image.tobytes()] = depth


def write_sintel(root: pathlib.Path) -> dict:
    """ROOT/{final,depth}/<seq>/frame_NNNN.{png,dpt} for the 14 evaluation sequences (one unit each)."""
    rng, truth = np.random.default_rng(0), {}
    for s, seq in enumerate(SINTEL_SEQUENCES):
        (root / "final" / seq).mkdir(parents=True)
        (root / "depth" / seq).mkdir(parents=True)
        for k in range(DEPTH_FRAMES):
            depth = depth_wall(k + s)
            depth[0, 0] = 80.0  # beyond Sintel's 70 m cap: not scored
            write_dpt(root / "depth" / seq / f"frame_{k + 1:04d}.dpt", depth)
            _save_depth_image(root / "final" / seq / f"frame_{k + 1:04d}.png", rng, truth, depth)
    return truth


def _png_depth(path: pathlib.Path, depth: np.ndarray, units: float) -> np.ndarray:
    """Writes uint16 depth * units (0 stays 0); returns what the PNG holds, in metres."""
    values = np.round(depth * units).astype(np.uint16)
    Image.fromarray(values).save(path)
    return values / units


def write_bonn(root: pathlib.Path) -> dict:
    """ROOT/<seq>/{rgb_110,depth_110}/<timestamp>.png for the 5 evaluation sequences (one unit each)."""
    rng, truth = np.random.default_rng(1), {}
    for s, seq in enumerate(BONN_SEQUENCES):
        (root / seq / "rgb_110").mkdir(parents=True)
        (root / seq / "depth_110").mkdir(parents=True)
        for k in range(DEPTH_FRAMES):
            depth = depth_wall(k + s)
            depth[1, 1] = 0.0  # no depth
            stored = _png_depth(root / seq / "depth_110" / f"{1548266469.1 + k:.6f}.png", depth, 5000.0)
            _save_depth_image(root / seq / "rgb_110" / f"{1548266469.0 + k:.6f}.png", rng, truth, stored)
    return truth


def write_kitti(root: pathlib.Path) -> dict:
    """ROOT/{image_gathered,groundtruth_depth_gathered}/<drive>/NNNNNNNNNN.png for KITTI_DRIVES (one unit each)."""
    rng, truth = np.random.default_rng(2), {}
    for s, drive in enumerate(KITTI_DRIVES):
        (root / "image_gathered" / drive).mkdir(parents=True)
        (root / "groundtruth_depth_gathered" / drive).mkdir(parents=True)
        for k in range(DEPTH_FRAMES):
            depth = depth_wall(k + s) * 10
            depth[::2, ::3] = 0.0  # sparse LiDAR: 0 = no point
            stored = _png_depth(root / "groundtruth_depth_gathered" / drive / f"{k:010d}.png", depth, 256.0)
            _save_depth_image(root / "image_gathered" / drive / f"{k:010d}.png", rng, truth, stored)
    return truth


def write_nyu(root: pathlib.Path, images: int = 3) -> dict:
    """ROOT/nyu_images/NNNNN.png + nyu_depths/NNNNN.npy (one unit per depth_suites.NYU_CHUNK images)."""
    rng, truth = np.random.default_rng(3), {}
    (root / "nyu_images").mkdir(parents=True)
    (root / "nyu_depths").mkdir(parents=True)
    for k in range(images):
        np.save(root / "nyu_depths" / f"{k:05d}.npy", depth_wall(k).astype(np.float32))
        _save_depth_image(root / "nyu_images" / f"{k:05d}.png", rng, truth,
                          depth_wall(k).astype(np.float32).astype(np.float64))
    return truth


# --------------------------------------------------------------------------------------------------
# Camera poses: Co3Dv2, RealEstate10K, TUM RGB-D, ScanNet
# --------------------------------------------------------------------------------------------------
def rotation(axis, degrees) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    half = np.radians(degrees) / 2
    return geometry.quaternion_to_matrix(np.concatenate([[np.cos(half)], np.sin(half) * axis]))


def random_c2w(rng, n) -> np.ndarray:
    c2w = np.tile(np.eye(4), (n, 1, 1))
    for k in range(n):
        c2w[k, :3, :3] = rotation(rng.normal(size=3), rng.uniform(5, 120))
        c2w[k, :3, 3] = rng.normal(size=3) * 2
    return c2w


def write_coded_frame(path: pathlib.Path, code: int) -> None:
    """An 8x8 image whose colour encodes `code` < 512 in steps of 32 per channel, far apart enough to
    survive JPEG (the pose oracle recognises frames by their decoded pixels)."""
    assert 0 <= code < 512
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[...] = [(code % 8) * 32, (code // 8 % 8) * 32, (code // 64) * 32]
    Image.fromarray(pixels).save(path, quality=100)


def truth_of(paths_and_c2w) -> dict:
    """[(image path, c2w)] -> {decoded pixels: c2w}."""
    return {np.asarray(Image.open(p).convert("RGB")).tobytes(): c for p, c in paths_and_c2w}


def pt3d_from_c2w(c2w):
    """Independent inverse of the reader's conversion: PyTorch3D (R, T) of an OpenCV c2w."""
    w2c = np.linalg.inv(c2w)
    flip = np.diag([-1.0, -1.0, 1.0])
    return (flip @ w2c[:3, :3]).T, flip @ w2c[:3, 3]


def write_co3d_category(root, category, sequences, code_base):
    """sequences: {name: (num_frames, quality, c2w[n])}; a negative quality marks a sequence whose
    translations are broken (T = 1e6) and is written positive. Returns [(image path, c2w)]."""
    cat = root / category
    frames, seq_annos, test, truth = [], [], [], []
    for s, (name, (n, quality, c2w)) in enumerate(sequences.items()):
        seq_annos.append({"sequence_name": name, "category": category, "viewpoint_quality_score": quality})
        for k in range(n):
            rel = f"{category}/{name}/images/frame{k + 1:06d}.jpg"
            r, t = pt3d_from_c2w(c2w[k])
            if quality < 0:  # marks the broken-translation sequence
                t = np.array([1e6, 0.0, 0.0])
            frames.append({"sequence_name": name, "frame_number": k + 1, "frame_timestamp": k / 30,
                           "image": {"path": rel, "size": [8, 8]},
                           "viewpoint": {"R": r.tolist(), "T": t.tolist(), "focal_length": [2.0, 2.0],
                                         "principal_point": [0.0, 0.0], "intrinsics_format": "ndc_isotropic"}})
            test.append([name, k + 1, rel])
            write_coded_frame(root / rel, code_base + 100 * s + k)
            truth.append((root / rel, c2w[k]))
    seq_annos[-1]["viewpoint_quality_score"] = abs(seq_annos[-1]["viewpoint_quality_score"])
    (cat / "set_lists").mkdir(parents=True)
    (cat / pose_suites.CO3D_SET_LIST).write_text(json.dumps({"train": [["trainseq", 1, "x.jpg"]], "val": [],
                                                             "test": test}))
    with gzip.open(cat / "frame_annotations.jgz", "wt") as f:
        json.dump(frames, f)
    with gzip.open(cat / "sequence_annotations.jgz", "wt") as f:
        json.dump(seq_annos, f)
    return truth


def write_co3d(root: pathlib.Path) -> dict:
    """Two categories; two usable test sequences (units apple/110_good, bench/200_good) and three the
    protocol leaves out (low viewpoint quality, < 50 frames, huge T). Returns {pixels: c2w}."""
    rng = np.random.default_rng(0)
    truth = write_co3d_category(root, "apple", {
        "110_good": (52, 0.9, random_c2w(rng, 52)),
        "111_lowquality": (50, 0.2, random_c2w(rng, 50)),   # viewpoint_quality_score <= 0.5: left out
        "112_short": (12, 0.9, random_c2w(rng, 12)),        # < 50 frames: left out
        "113_hugeT": (50, -0.9, random_c2w(rng, 50)),       # T sum > 1e5: left out
    }, 0)
    truth += write_co3d_category(root, "bench", {"200_good": (55, 0.8, random_c2w(rng, 55))}, 400)
    return truth_of(truth)


def look_at_c2w(eye, target) -> np.ndarray:
    """OpenCV camera at `eye` looking at `target` (z forward, y down, world z up), built by hand."""
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    c2w[:3, 3] = eye
    return c2w


def write_re10k_sequence(root, seq, c2w, code_base=0):
    """ROOT/metadata/test/<seq>.txt (w2c rows) + ROOT/<seq>/images/NNNN.png; returns [(image path, c2w)]."""
    lines = [f"https://www.youtube.com/watch?v={seq}"]
    for k, pose in enumerate(c2w):
        w2c = np.linalg.inv(pose)[:3]
        lines.append(" ".join([str(1000 * k), "0.5", "0.9", "0.5", "0.5", "0", "0"] + [repr(float(v)) for v in w2c.ravel()]))
        write_coded_frame(root / seq / "images" / f"{k:04d}.png", code_base + k)
    (root / "metadata" / "test").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / "test" / f"{seq}.txt").write_text("\n".join(lines) + "\n")
    return [(root / seq / "images" / f"{k:04d}.png", c2w[k]) for k in range(len(c2w))]


RE10K_ORBIT = np.stack([look_at_c2w(np.array([4.0 * np.cos(a), 4.0 * np.sin(a), 1.5]), np.zeros(3))
                        for a in np.linspace(0, 1.5, 12)])  # 12 cameras on an arc looking at the origin


def write_re10k(root: pathlib.Path) -> dict:
    """A 12-frame sequence (the one unit) and a 7-frame one the protocol leaves out (< 10 frames)."""
    truth = write_re10k_sequence(root, "0a1b2c3d4e5f6789", RE10K_ORBIT)
    truth += write_re10k_sequence(root, "ffff000011112222", RE10K_ORBIT[:7], code_base=100)
    return truth_of(truth)


def write_tum_sequence(seq_dir, rng, num_rgb=14):
    """rgb at 30 Hz, groundtruth at 100 Hz (offset 3 ms); rgb frame 5 has no pose within 20 ms.
    Returns [(image path, c2w)] of the associated frames."""
    gt_times = [10.0 + 0.01 * k for k in range(int(num_rgb / 30 * 100) + 5)]
    gt_times = [t for t in gt_times if not 10.0 + 5 / 30 - 0.03 < t < 10.0 + 5 / 30 + 0.03]
    c2w = random_c2w(rng, len(gt_times))
    gt_lines = ["# ground truth trajectory", "# timestamp tx ty tz qx qy qz qw"]
    for t, pose in zip(gt_times, c2w):
        w, x, y, z = geometry.matrix_to_quaternion(pose[:3, :3])
        gt_lines.append(f"{t:.4f} {pose[0, 3]:.17g} {pose[1, 3]:.17g} {pose[2, 3]:.17g} {x:.17g} {y:.17g} {z:.17g} {w:.17g}")
    rgb_lines, truth = ["# color images", "# timestamp filename"], []
    for k in range(num_rgb):
        t = 10.0 + k / 30 + 0.003
        name = f"rgb/{t:.6f}.png"
        rgb_lines.append(f"{t:.6f} {name}")
        write_coded_frame(seq_dir / name, k)
        nearest = int(np.argmin(np.abs(np.array(gt_times) - t)))
        if abs(gt_times[nearest] - t) <= 0.02:
            truth.append((seq_dir / name, c2w[nearest]))
    (seq_dir / "rgb.txt").write_text("\n".join(rgb_lines) + "\n")
    (seq_dir / "groundtruth.txt").write_text("\n".join(gt_lines) + "\n")
    return truth


def write_tum(root: pathlib.Path) -> dict:
    """ROOT/rgbd_dataset_freiburg3_walking_xyz/{rgb.txt, groundtruth.txt, rgb/} (the one unit)."""
    return truth_of(write_tum_sequence(root / "rgbd_dataset_freiburg3_walking_xyz", np.random.default_rng(5)))


def write_scannet(root: pathlib.Path, frames: int = 6) -> dict:
    """ROOT/scene0707_00/{color_90/NNN.jpg, pose_90.txt} (π³'s prepared layout; the one unit): pose rows
    alternate 16 values (4x4) and 12 (3x4)."""
    scene = root / "scene0707_00"
    c2w = random_c2w(np.random.default_rng(8), frames)
    rows = []
    for k, pose in enumerate(c2w):
        write_coded_frame(scene / "color_90" / f"{k:03d}.jpg", k)
        rows.append(" ".join(f"{v:.17g}" for v in (pose.ravel() if k % 2 else pose[:3].ravel())))  # 16 or 12
    (scene / "pose_90.txt").write_text("\n".join(rows) + "\n")
    return truth_of([(scene / "color_90" / f"{k:03d}.jpg", c2w[k]) for k in range(frames)])


# --------------------------------------------------------------------------------------------------
# Spatial QA: VSI-Bench, SPAR-Bench, MindCube, OmniSpatial
# --------------------------------------------------------------------------------------------------
def write_png(path: pathlib.Path, value: int) -> None:
    """A 6x8 image of one grey level."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(path)


def _png_bytes(value: int) -> bytes:
    import io

    buffer = io.BytesIO()
    Image.fromarray(np.full((6, 8, 3), value, np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def write_mp4(path: pathlib.Path, num_frames: int) -> None:
    """Frame k is uniformly grey with level 10·k (so the sampled indices can be read back)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=10)
        stream.width, stream.height, stream.pix_fmt = 32, 32, "yuv420p"
        stream.options = {"qscale": "1"}
        for k in range(num_frames):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 10 * k, np.uint8), format="rgb24")
            container.mux(stream.encode(frame))
        container.mux(stream.encode())


# (question_type, question, options, ground_truth, scripted answer, robust score, official score)
VSI_QUESTIONS = [
    ("object_rel_direction_easy", "Q1 where is the sofa?", ["A. left", "B. right"], "B", "The answer is B.", 1, 0),
    ("object_rel_direction_medium", "Q2 where is the bed?", ["A. left", "B. chair", "C. back"], "B", "B) the chair", 1, 0),
    ("object_rel_direction_hard", "Q3 where is the tv?", ["A. x", "B. y", "C. z"], "C", "C", 1, 1),
    ("object_abs_distance", "Q4 how far?", None, "2.0", "approximately 2.5 meters", 0.6, 0),  # |2.5-2|/2 = .25 -> θ<=.75: 6/10
    ("object_counting", "Q5 how many chairs?", None, "3", "3", 1, 1),
    ("route_planning", "Q6 which route?", ["A. a", "B. b", "C. c", "D. d"], "A", "D.", 0, 0),
    ("room_size_estimation", "Q7 how big?", None, "20", "20.0.", 1, 1),
]


def write_vsibench(root: pathlib.Path, questions=VSI_QUESTIONS) -> None:
    """ROOT/test-00000-of-00001.parquet + <dataset>/<scene>.mp4: question k is about arkitscenes/scene0
    (20 frames) when k is even, scannet/scene1 (3 frames) when odd; a unit per video asked about."""
    rows = [{"id": k + 1, "dataset": "scannet" if k % 2 else "arkitscenes", "scene_name": f"scene{k % 2}",
             "question_type": t, "question": q, "options": o, "ground_truth": gt}
            for k, (t, q, o, gt, *_) in enumerate(questions)]
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "test-00000-of-00001.parquet")
    write_mp4(root / "arkitscenes" / "scene0.mp4", 20)
    write_mp4(root / "scannet" / "scene1.mp4", 3)


# (task, question, answer, scripted answer, score)
SPAR_QUESTIONS = [
    ("depth_prediction_oc", "S1 depth of the lamp?", "2.0", "The depth is about 2.5 m.", 0.6),
    # *_mv reads the last number: 1.5 -> 1.0 (the first, 3, would score 0)
    ("depth_prediction_oc_mv", "S2 depth in view 2?", "1.5", "View 2 has 3 chairs; the depth is 1.5", 1.0),
    ("obj_spatial_relation_oo", "S3 where is the cup? A. left B. right C. above D. below", "C", "C. above", 1.0),
    ("position_matching", "S4 which box? A. [1,2] B. [3,4]", "A", "(B)", 0.0),
    ("view_change_infer", "S5 how did the camera move?", "move_right:1.0,rotate_left:30",
     "move_right:1.0,rotate_left:30", 1.0),
]


def write_sparbench(root: pathlib.Path, questions=SPAR_QUESTIONS) -> None:
    """ROOT/data/test-00000-of-00001.parquet with embedded PNGs: question k has 1 + k % 2 images of grey
    level 40·k + view. Units: QUESTIONS_PER_UNIT questions each."""
    rows = [{"id": f"spar{k}", "task": t, "question": q, "answer": a,
             "image": [{"bytes": _png_bytes(40 * k + v), "path": f"{k}_{v}.png"} for v in range(1 + k % 2)]}
            for k, (t, q, a, *_) in enumerate(questions)]
    (root / "data").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), root / "data" / "test-00000-of-00001.parquet")


# (id, question, ground truth, scripted answer, score)
MINDCUBE_QUESTIONS = [
    ("among_group001_q1", "M1 Which is behind the sofa? A. Above B. Under C. Front", "A", "A. Above", 1),
    ("around_group002_q3", "M2 Where was view 2 taken? A. x B. y C. z D. w", "B", "I think the answer is B", 1),
    ("rotation_group003_q2", "M3 What is left? A. x B. y C. z D. w", "C", "<answer>D. Behind</answer>", 0),
]


def write_mindcube(root: pathlib.Path, questions=MINDCUBE_QUESTIONS) -> None:
    """ROOT/raw/MindCube_tinybench.jsonl + other_all_image/<setting>/<id>_<v>.jpg: question k has 2 + k
    images of grey level 30·k + view."""
    lines = []
    for k, (qid, q, gt, *_) in enumerate(questions):
        images = [f"other_all_image/{qid.split('_')[0]}/{qid}_{v}.jpg" for v in range(2 + k)]
        for v, rel in enumerate(images):
            write_png(root / rel, 30 * k + v)
        lines.append(json.dumps({"id": qid, "category": ["x"], "type": "t", "question": q, "images": images,
                                 "gt_answer": gt}))
    (root / "raw").mkdir(parents=True)
    (root / "raw" / "MindCube_tinybench.jsonl").write_text("\n".join(lines) + "\n")


def write_omnispatial(root: pathlib.Path, answer_of_second: int = 2) -> None:
    """ROOT/data.json + <task_type>/<n>.png: two questions (answers A and, by index, `answer_of_second`)."""
    items = [{"id": "0_0", "question": "O1 how long until it arrives?", "options": ["2.7s", "14.7s", "25.7s", "3.9s"],
              "answer": 0, "task_type": "Dynamic_Reasoning", "sub_task_type": "Motion_Analysis"},
             {"id": "1_2", "question": "O2 what is on my left?", "options": ["cup", "pen", "box", "bag"],
              "answer": answer_of_second, "task_type": "Perspective_Taking", "sub_task_type": "Egocentric"}]
    write_png(root / "Dynamic_Reasoning" / "0.png", 10)
    write_png(root / "Perspective_Taking" / "1.png", 20)
    (root / "data.json").write_text(json.dumps(items))
