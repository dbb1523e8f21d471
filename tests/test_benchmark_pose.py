"""Camera-pose suites (evaluation/benchmarks/pose_suites.py) on tiny datasets the tests write in
the released layouts: Co3Dv2 (jgz annotations + set lists), RealEstate10K (camera .txt files +
extracted frames), TUM RGB-D (rgb.txt + groundtruth.txt). Predictors here are oracles that look
the true pose of an image up by its pixels, optionally with a scripted rotation error."""
import gzip
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from g2vlm_jax import geometry
from g2vlm_jax.evaluation.benchmarks import pose_suites as ps
from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError


def _rot(axis, degrees):
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    half = np.radians(degrees) / 2
    return geometry.quaternion_to_matrix(np.concatenate([[np.cos(half)], np.sin(half) * axis]))


def _random_c2w(rng, n):
    c2w = np.tile(np.eye(4), (n, 1, 1))
    for k in range(n):
        c2w[k, :3, :3] = _rot(rng.normal(size=3), rng.uniform(5, 120))
        c2w[k, :3, 3] = rng.normal(size=3) * 2
    return c2w


def _write_frame(path: pathlib.Path, code: int) -> None:
    """An 8x8 image whose colour encodes `code` < 512 in steps of 32 per channel, far apart enough to
    survive JPEG (the oracle recognises frames by their decoded pixels)."""
    assert 0 <= code < 512
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.zeros((8, 8, 3), np.uint8)
    pixels[...] = [(code % 8) * 32, (code // 8 % 8) * 32, (code // 64) * 32]
    Image.fromarray(pixels).save(path, quality=100)


class OraclePredictor:
    """Returns the true c2w of every image, moved by one world similarity (which the metric must not
    see); `first_view_error_deg` rotates the first view's camera about its own centre."""

    def __init__(self, truth: dict[bytes, np.ndarray], first_view_error_deg: float = 0.0):
        self.truth, self.error = truth, first_view_error_deg
        self.calls = []

    def reconstruct(self, images):
        self.calls.append(len(images))
        c2w = np.stack([self.truth[img.tobytes()] for img in images])
        sim = np.eye(4)
        sim[:3, :3], sim[:3, 3] = 3.0 * _rot([1, 2, 3], 40), (5.0, -1.0, 2.0)
        c2w = sim @ c2w
        c2w[:, :3, :3] /= 3.0  # keep the rotation block a rotation; the translations stay scaled
        c2w[0, :3, :3] = c2w[0, :3, :3] @ _rot([0, 1, 1], self.error)
        return {"c2w": c2w}

    def input_size(self, height, width):
        return height, width

    def answer(self, question, images, max_new_tokens=32):
        raise AssertionError("pose suites never ask questions")


def _truth_of(paths_and_c2w):
    return {np.asarray(Image.open(p).convert("RGB")).tobytes(): c for p, c in paths_and_c2w}


def _run(suite, predictor, root):
    rows = [r for unit in suite.units(root) for r in suite.evaluate(predictor, root, unit)]
    return rows, suite.summarize(rows)


# --------------------------------------------------------------------------------------------------
# Co3Dv2
# --------------------------------------------------------------------------------------------------
def _pt3d_from_c2w(c2w):
    """Independent inverse of the reader's conversion: PyTorch3D (R, T) of an OpenCV c2w."""
    w2c = np.linalg.inv(c2w)
    flip = np.diag([-1.0, -1.0, 1.0])
    return (flip @ w2c[:3, :3]).T, flip @ w2c[:3, 3]


def _write_co3d_category(root, category, sequences, code_base):
    """sequences: {name: (num_frames, quality, c2w[n] or None for huge-T)} -> files; returns truth."""
    cat = root / category
    frames, seq_annos, test, truth = [], [], [], []
    for s, (name, (n, quality, c2w)) in enumerate(sequences.items()):
        seq_annos.append({"sequence_name": name, "category": category, "viewpoint_quality_score": quality})
        for k in range(n):
            rel = f"{category}/{name}/images/frame{k + 1:06d}.jpg"
            r, t = _pt3d_from_c2w(c2w[k])
            if quality < 0:  # marks the broken-translation sequence
                t = np.array([1e6, 0.0, 0.0])
            frames.append({"sequence_name": name, "frame_number": k + 1, "frame_timestamp": k / 30,
                           "image": {"path": rel, "size": [8, 8]},
                           "viewpoint": {"R": r.tolist(), "T": t.tolist(), "focal_length": [2.0, 2.0],
                                         "principal_point": [0.0, 0.0], "intrinsics_format": "ndc_isotropic"}})
            test.append([name, k + 1, rel])
            _write_frame(root / rel, code_base + 100 * s + k)
            truth.append((root / rel, c2w[k]))
    seq_annos[-1]["viewpoint_quality_score"] = abs(seq_annos[-1]["viewpoint_quality_score"])
    (cat / "set_lists").mkdir(parents=True)
    (cat / ps.CO3D_SET_LIST).write_text(json.dumps({"train": [["trainseq", 1, "x.jpg"]], "val": [], "test": test}))
    with gzip.open(cat / "frame_annotations.jgz", "wt") as f:
        json.dump(frames, f)
    with gzip.open(cat / "sequence_annotations.jgz", "wt") as f:
        json.dump(seq_annos, f)
    return truth


@pytest.fixture()
def co3d_root(tmp_path):
    rng = np.random.default_rng(0)
    truth = _write_co3d_category(tmp_path, "apple", {
        "110_good": (52, 0.9, _random_c2w(rng, 52)),
        "111_lowquality": (50, 0.2, _random_c2w(rng, 50)),   # viewpoint_quality_score <= 0.5: left out
        "112_short": (12, 0.9, _random_c2w(rng, 12)),        # < 50 frames: left out
        "113_hugeT": (50, -0.9, _random_c2w(rng, 50)),       # T sum > 1e5: left out
    }, 0)
    truth += _write_co3d_category(tmp_path, "bench", {"200_good": (55, 0.8, _random_c2w(rng, 55))}, 400)
    return tmp_path, _truth_of(truth)


def test_co3d_units_filters_and_seed42_sampling(co3d_root):
    root, _ = co3d_root
    suite = ps.Co3DPose()
    assert suite.units(root) == ["apple/110_good", "bench/200_good"]
    rng = np.random.RandomState(42)  # π³ sampling.py: one stream over the sequences in category order
    expected = {"apple/110_good": rng.choice(52, 10, replace=False).tolist(),
                "bench/200_good": rng.choice(55, 10, replace=False).tolist()}
    assert ps._co3d_plan(str(root.resolve()))[1] == expected


def test_co3d_oracle_scores_100_and_known_rotation_error(co3d_root):
    root, truth = co3d_root
    suite = ps.Co3DPose()
    rows, table = _run(suite, OraclePredictor(truth), root)
    assert [r["unit"] for r in rows] == ["apple/110_good", "bench/200_good"]
    assert json.loads(json.dumps(rows)) == rows  # the runner writes rows as JSON
    assert list(table) == ["Co3Dv2"] and set(table["Co3Dv2"]) == set(suite.columns)
    assert all(table["Co3Dv2"][c] == pytest.approx(100.0) for c in ("RRA@30", "RTA@30", "AUC@30", "AUC@5"))
    assert table["Co3Dv2"]["pairs"] == 90 and table["Co3Dv2"]["sequences"] == 2
    assert json.loads(json.dumps(suite.protocol()))["frames"].startswith("10 random")
    # 10.5° about the first view's own centre: the 9 pairs (0, j) have rotation error 10.5° and no
    # translation error (pair i<j maps camera i into j; view 0 is always i); the other 36 pairs are exact.
    rows, table = _run(suite, OraclePredictor(truth, first_view_error_deg=10.5), root)
    apple = rows[0]
    assert apple["rra@5"] == pytest.approx(100 * 36 / 45) and apple["rra@15"] == 100.0
    assert apple["rta@5"] == pytest.approx(100.0)
    assert apple["auc@30"] == pytest.approx(100 * (10 * 0.8 + 20 * 1.0) / 30)   # bins 0..9: 0.8, 10..29: 1
    assert apple["auc@15"] == pytest.approx(100 * (10 * 0.8 + 5 * 1.0) / 15)
    pooled = table["Co3Dv2"]
    assert pooled["AUC@5"] == pytest.approx(100 * (36 + 36) / 90)  # both sequences carry the error
    assert pooled["AUC@30"] == pytest.approx(100 * 28 / 30)
    assert pooled[ps.CO3D_CATEGORY_MEAN] == pytest.approx(100 * 28 / 30)


def test_co3d_conversion_agrees_with_pytorch3d_definition():
    """PyTorch3D: X_cam = X_world · R + T (row vectors), camera x left / y up; OpenCV flips x, y."""
    rng = np.random.default_rng(3)
    r, t = _rot(rng.normal(size=3), 73), rng.normal(size=3)
    x_world = rng.normal(size=3)
    x_p3d = x_world @ r + t
    c2w = ps.pytorch3d_to_opencv_c2w(r.tolist(), t.tolist())
    x_cv = (np.linalg.inv(c2w) @ np.append(x_world, 1))[:3]
    np.testing.assert_allclose(x_cv, [-x_p3d[0], -x_p3d[1], x_p3d[2]], atol=1e-12)
    np.testing.assert_allclose(c2w[:3, 3], -t @ r.T, atol=1e-12)  # the centre C solves C·R + T = 0


def test_co3d_malformed_files_name_the_file(co3d_root):
    root, _ = co3d_root
    (root / "apple" / "frame_annotations.jgz").write_text("not gzip")
    with pytest.raises(DatasetLayoutError, match=r"apple/frame_annotations\.jgz.*gzip"):
        ps.Co3DPose().units(root)
    (root / "bench" / ps.CO3D_SET_LIST).write_text(json.dumps({"train": []}))
    with pytest.raises(DatasetLayoutError, match=r"set_lists_fewview_dev\.json.*'test'"):
        ps._co3d_test_sequences(root, "bench")
    with pytest.raises(DatasetLayoutError, match="no Co3Dv2 category folder"):
        ps.Co3DPose().units(root / "apple")


# --------------------------------------------------------------------------------------------------
# RealEstate10K
# --------------------------------------------------------------------------------------------------
def _look_at_c2w(eye, target):
    """OpenCV camera at `eye` looking at `target` (z forward, y down, world z up), built by hand."""
    z = (target - eye) / np.linalg.norm(target - eye)
    x = np.cross(z, [0.0, 0.0, 1.0])
    x /= np.linalg.norm(x)
    c2w = np.eye(4)
    c2w[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    c2w[:3, 3] = eye
    return c2w


def _write_re10k(root, seq, c2w, code_base=0):
    lines = [f"https://www.youtube.com/watch?v={seq}"]
    for k, pose in enumerate(c2w):
        w2c = np.linalg.inv(pose)[:3]
        lines.append(" ".join([str(1000 * k), "0.5", "0.9", "0.5", "0.5", "0", "0"] + [repr(float(v)) for v in w2c.ravel()]))
        _write_frame(root / seq / "images" / f"{k:04d}.png", code_base + k)
    (root / "metadata" / "test").mkdir(parents=True, exist_ok=True)
    (root / "metadata" / "test" / f"{seq}.txt").write_text("\n".join(lines) + "\n")
    return [(root / seq / "images" / f"{k:04d}.png", c2w[k]) for k in range(len(c2w))]


def test_re10k_reader_convention_and_oracle(tmp_path):
    eyes = [np.array([4.0 * np.cos(a), 4.0 * np.sin(a), 1.5]) for a in np.linspace(0, 1.5, 12)]
    c2w = np.stack([_look_at_c2w(e, np.zeros(3)) for e in eyes])
    truth = _write_re10k(tmp_path, "0a1b2c3d4e5f6789", c2w)
    truth += _write_re10k(tmp_path, "ffff000011112222", c2w[:7], code_base=100)  # < 10 frames: left out
    stamps, read = ps.read_re10k_cameras(tmp_path / "metadata" / "test" / "0a1b2c3d4e5f6789.txt")
    assert stamps[:2] == ["0", "1000"]
    np.testing.assert_allclose(read, c2w, atol=1e-12)
    origin_cam = (np.linalg.inv(read[3]) @ np.array([0.0, 0, 0, 1]))[:3]  # the target is straight ahead
    np.testing.assert_allclose(origin_cam[:2], 0.0, atol=1e-12)
    assert origin_cam[2] > 0
    suite = ps.RealEstate10KPose()
    assert suite.units(tmp_path) == ["0a1b2c3d4e5f6789"]
    predictor = OraclePredictor(_truth_of(truth))
    rows, table = _run(suite, predictor, tmp_path)
    assert rows[0]["frame_ids"] == np.random.RandomState(42).choice(12, 10, replace=False).tolist()
    assert predictor.calls == [10]
    assert table["re10k-pose"]["AUC@30"] == pytest.approx(100.0) and table["re10k-pose"]["pairs"] == 45


def test_re10k_malformed_camera_line_names_file_and_line(tmp_path):
    _write_re10k(tmp_path, "abc", np.stack([np.eye(4)] * 11))
    path = tmp_path / "metadata" / "test" / "abc.txt"
    lines = path.read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:-1])
    path.write_text("\n".join(lines))
    with pytest.raises(DatasetLayoutError, match=r"abc\.txt:4: .*19 fields"):
        ps.RealEstate10KPose().units(tmp_path)


# --------------------------------------------------------------------------------------------------
# TUM RGB-D
# --------------------------------------------------------------------------------------------------
def _write_tum(seq_dir, rng, num_rgb=14):
    """rgb at 30 Hz, groundtruth at 100 Hz (offset 3 ms); rgb frame 5 has no pose within 20 ms."""
    gt_times = [10.0 + 0.01 * k for k in range(int(num_rgb / 30 * 100) + 5)]
    gt_times = [t for t in gt_times if not 10.0 + 5 / 30 - 0.03 < t < 10.0 + 5 / 30 + 0.03]
    c2w = _random_c2w(rng, len(gt_times))
    gt_lines = ["# ground truth trajectory", "# timestamp tx ty tz qx qy qz qw"]
    for t, pose in zip(gt_times, c2w):
        w, x, y, z = geometry.matrix_to_quaternion(pose[:3, :3])
        gt_lines.append(f"{t:.4f} {pose[0, 3]:.17g} {pose[1, 3]:.17g} {pose[2, 3]:.17g} {x:.17g} {y:.17g} {z:.17g} {w:.17g}")
    rgb_lines, truth = ["# color images", "# timestamp filename"], []
    for k in range(num_rgb):
        t = 10.0 + k / 30 + 0.003
        name = f"rgb/{t:.6f}.png"
        rgb_lines.append(f"{t:.6f} {name}")
        _write_frame(seq_dir / name, k)
        nearest = int(np.argmin(np.abs(np.array(gt_times) - t)))
        if abs(gt_times[nearest] - t) <= 0.02:
            truth.append((seq_dir / name, c2w[nearest]))
    (seq_dir / "rgb.txt").write_text("\n".join(rgb_lines) + "\n")
    (seq_dir / "groundtruth.txt").write_text("\n".join(gt_lines) + "\n")
    return truth


def test_tum_quaternion_convention_and_association():
    c2w = ps.tum_pose_to_c2w([1, 2, 3, 0, 0, np.sin(np.radians(30)), np.cos(np.radians(30))])
    c, s = np.cos(np.radians(60)), np.sin(np.radians(60))  # 60° about z, by hand
    np.testing.assert_allclose(c2w[:3, :3], [[c, -s, 0], [s, c, 0], [0, 0, 1]], atol=1e-12)
    np.testing.assert_allclose(c2w[:3, 3], [1, 2, 3])
    gt = [(0.00, "p0"), (0.01, "p1"), (0.10, "p2")]
    assert ps.associate_tum([(0.004, "a"), (0.006, "b"), (0.05, "c")], gt) == [("a", "p0"), ("b", "p1")]
    # one-to-one, smallest |Δt| first (MonST3R prepare_tum.py): y's only candidate q0 is taken by x
    assert ps.associate_tum([(0.002, "y"), (0.001, "x")], [(0.0, "q0"), (0.05, "q1")]) == [("x", "q0")]


def test_tum_oracle_on_raw_layout(tmp_path):
    seq = tmp_path / "rgbd_dataset_freiburg3_walking_xyz"
    truth = _write_tum(seq, np.random.default_rng(5))
    suite = ps.TUMDynamicsPose()
    assert suite.units(tmp_path) == ["rgbd_dataset_freiburg3_walking_xyz"]
    predictor = OraclePredictor(_truth_of(truth))
    rows, table = _run(suite, predictor, tmp_path)
    # 14 rgb frames, frame 5 unmatched -> 13 associated, every 3rd -> frames 0, 3, 7, 10, 13
    assert rows[0]["frames"] == [p.name for p, _ in truth][::3]
    assert predictor.calls == [5] and table["tum-dynamics-pose"]["RRA@30"] == pytest.approx(100.0)
    assert table["tum-dynamics-pose"]["ATE"] == pytest.approx(0, abs=1e-9)
    assert list(table["tum-dynamics-pose"]) == list(suite.columns)


def test_tum_malformed_groundtruth_names_file(tmp_path):
    seq = tmp_path / "rgbd_dataset_freiburg3_sitting_static"
    _write_tum(seq, np.random.default_rng(6))
    with open(seq / "groundtruth.txt", "a") as f:
        f.write("11.5 1 2 3 0 0 0\n")
    with pytest.raises(DatasetLayoutError, match=r"groundtruth\.txt:\d+: expected 8 fields"):
        ps.TUMDynamicsPose().evaluate(OraclePredictor({}), tmp_path, seq.name)


# --------------------------------------------------------------------------------------------------
# ScanNet (prepared color_90 / pose_90.txt)
# --------------------------------------------------------------------------------------------------
def test_scannet_prepared_layout_oracle_and_bad_pose(tmp_path):
    scene = tmp_path / "scene0707_00"
    c2w = _random_c2w(np.random.default_rng(8), 6)
    rows = []
    for k, pose in enumerate(c2w):
        _write_frame(scene / "color_90" / f"{k:03d}.jpg", k)
        rows.append(" ".join(f"{v:.17g}" for v in (pose.ravel() if k % 2 else pose[:3].ravel())))  # 16 or 12
    (scene / "pose_90.txt").write_text("\n".join(rows) + "\n")
    suite = ps.ScanNetPose()
    assert suite.units(tmp_path) == ["scene0707_00"]
    truth = _truth_of([(scene / "color_90" / f"{k:03d}.jpg", c2w[k]) for k in range(6)])
    _, table = _run(suite, OraclePredictor(truth, first_view_error_deg=10.5), tmp_path)
    # 5 of the 15 pairs carry the 10.5° rotation error (view 0 is always i): RRA@5 = 10 / 15
    assert table["scannet-pose"]["pairs"] == 15
    assert table["scannet-pose"]["AUC@5"] == pytest.approx(100 * 10 / 15)
    nan_predictor = OraclePredictor(truth)
    nan_predictor.reconstruct = lambda images: {"c2w": np.full((len(images), 4, 4), np.nan)}
    with pytest.raises(ValueError, match="scene0707_00: predictor returned non-finite camera poses"):
        suite.evaluate(nan_predictor, tmp_path, "scene0707_00")
    (scene / "pose_90.txt").write_text("\n".join(rows[:5] + ["-inf " * 16]) + "\n")
    with pytest.raises(DatasetLayoutError, match=r"pose_90\.txt:6: expected 12 or 16 finite values.*inf"):
        suite.evaluate(OraclePredictor(truth), tmp_path, "scene0707_00")
