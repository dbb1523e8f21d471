"""Camera-pose suites (evaluation/benchmarks/pose_suites.py) on tiny datasets the tests write in
the released layouts: Co3Dv2 (jgz annotations + set lists), RealEstate10K (camera .txt files +
extracted frames), TUM RGB-D (rgb.txt + groundtruth.txt). Predictors here are oracles that look
the true pose of an image up by its pixels, optionally with a scripted rotation error."""
import json

import numpy as np
import pytest

from g2vlm_jax.evaluation.benchmarks import pose_suites as ps
from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError
from tests.benchmark_fixtures import (RE10K_ORBIT, rotation, truth_of, write_co3d, write_re10k,
                                      write_re10k_sequence, write_scannet, write_tum_sequence)


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
        sim[:3, :3], sim[:3, 3] = 3.0 * rotation([1, 2, 3], 40), (5.0, -1.0, 2.0)
        c2w = sim @ c2w
        c2w[:, :3, :3] /= 3.0  # keep the rotation block a rotation; the translations stay scaled
        c2w[0, :3, :3] = c2w[0, :3, :3] @ rotation([0, 1, 1], self.error)
        return {"c2w": c2w}

    def input_size(self, height, width):
        return height, width

    def answer(self, question, images, max_new_tokens=32):
        raise AssertionError("pose suites never ask questions")


def _run(suite, predictor, root):
    rows = [r for unit in suite.units(root) for r in suite.evaluate(predictor, root, unit)]
    return rows, suite.summarize(rows)


# --------------------------------------------------------------------------------------------------
# Co3Dv2
# --------------------------------------------------------------------------------------------------
@pytest.fixture()
def co3d_root(tmp_path):
    return tmp_path, write_co3d(tmp_path)  # apple/110_good, bench/200_good and three left-out sequences


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
    r, t = rotation(rng.normal(size=3), 73), rng.normal(size=3)
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
def test_re10k_reader_convention_and_oracle(tmp_path):
    c2w = RE10K_ORBIT
    truth = write_re10k(tmp_path)  # and a 7-frame sequence (< 10 frames: left out)
    stamps, read = ps.read_re10k_cameras(tmp_path / "metadata" / "test" / "0a1b2c3d4e5f6789.txt")
    assert stamps[:2] == ["0", "1000"]
    np.testing.assert_allclose(read, c2w, atol=1e-12)
    origin_cam = (np.linalg.inv(read[3]) @ np.array([0.0, 0, 0, 1]))[:3]  # the target is straight ahead
    np.testing.assert_allclose(origin_cam[:2], 0.0, atol=1e-12)
    assert origin_cam[2] > 0
    suite = ps.RealEstate10KPose()
    assert suite.units(tmp_path) == ["0a1b2c3d4e5f6789"]
    predictor = OraclePredictor(truth)
    rows, table = _run(suite, predictor, tmp_path)
    assert rows[0]["frame_ids"] == np.random.RandomState(42).choice(12, 10, replace=False).tolist()
    assert predictor.calls == [10]
    assert table["re10k-pose"]["AUC@30"] == pytest.approx(100.0) and table["re10k-pose"]["pairs"] == 45


def test_re10k_malformed_camera_line_names_file_and_line(tmp_path):
    write_re10k_sequence(tmp_path, "abc", np.stack([np.eye(4)] * 11))
    path = tmp_path / "metadata" / "test" / "abc.txt"
    lines = path.read_text().splitlines()
    lines[3] = " ".join(lines[3].split()[:-1])
    path.write_text("\n".join(lines))
    with pytest.raises(DatasetLayoutError, match=r"abc\.txt:4: .*19 fields"):
        ps.RealEstate10KPose().units(tmp_path)


# --------------------------------------------------------------------------------------------------
# TUM RGB-D
# --------------------------------------------------------------------------------------------------
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
    truth = write_tum_sequence(seq, np.random.default_rng(5))
    suite = ps.TUMDynamicsPose()
    assert suite.units(tmp_path) == ["rgbd_dataset_freiburg3_walking_xyz"]
    predictor = OraclePredictor(truth_of(truth))
    rows, table = _run(suite, predictor, tmp_path)
    # 14 rgb frames, frame 5 unmatched -> 13 associated, every 3rd -> frames 0, 3, 7, 10, 13
    assert rows[0]["frames"] == [p.name for p, _ in truth][::3]
    assert predictor.calls == [5] and table["tum-dynamics-pose"]["RRA@30"] == pytest.approx(100.0)
    assert table["tum-dynamics-pose"]["ATE"] == pytest.approx(0, abs=1e-9)
    assert list(table["tum-dynamics-pose"]) == list(suite.columns)


def test_tum_malformed_groundtruth_names_file(tmp_path):
    seq = tmp_path / "rgbd_dataset_freiburg3_sitting_static"
    write_tum_sequence(seq, np.random.default_rng(6))
    with open(seq / "groundtruth.txt", "a") as f:
        f.write("11.5 1 2 3 0 0 0\n")
    with pytest.raises(DatasetLayoutError, match=r"groundtruth\.txt:\d+: expected 8 fields"):
        ps.TUMDynamicsPose().evaluate(OraclePredictor({}), tmp_path, seq.name)


# --------------------------------------------------------------------------------------------------
# ScanNet (prepared color_90 / pose_90.txt)
# --------------------------------------------------------------------------------------------------
def test_scannet_prepared_layout_oracle_and_bad_pose(tmp_path):
    scene = tmp_path / "scene0707_00"
    truth = write_scannet(tmp_path)  # 6 frames; pose rows of 12 and 16 values
    rows = (scene / "pose_90.txt").read_text().splitlines()
    suite = ps.ScanNetPose()
    assert suite.units(tmp_path) == ["scene0707_00"]
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
