"""Point-map suites (7-Scenes, NRGBD, ETH3D) on tiny datasets the tests write in the released layouts:
readers and conventions checked against hand-computed points, an oracle predictor (the GT moved by a
known Sim(3)) scores ~0, and every malformed file is a DatasetLayoutError naming it."""
import json

import numpy as np
import pytest
from PIL import Image

from g2vlm_jax import geometry
from g2vlm_jax.evaluation.benchmarks import SUITES, runner
from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError
from g2vlm_jax.evaluation.benchmarks.pointmap_suites import NeuralRGBD, SevenScenes
from tests.benchmark_fixtures import (POINTMAP_HW, pointmap_pose as _pose, rotation_about_y as _rotation, write_eth3d,
                                      write_nrgbd, write_seven_scenes)

H, W = POINTMAP_HW
SIM3 = (1.7, geometry.quaternion_to_matrix(np.array([0.9, 0.2, -0.3, 0.1])), np.array([0.5, -1.0, 2.0]))


class OraclePredictor:
    """Returns the GT world points of each image moved by a known Sim(3) (at the image's own size)."""

    def __init__(self, truth: dict, intrinsics: np.ndarray | None = None, sim3=SIM3):
        self.truth, self.intrinsics, self.sim3, self.calls = truth, intrinsics, sim3, 0

    def input_size(self, height, width):
        return height, width

    def reconstruct(self, images):
        self.calls += 1
        points = []
        for image in images:
            depth, c2w, *k = self.truth[np.asarray(image).tobytes()]
            k = k[0] if k else self.intrinsics
            points.append(geometry.apply_sim3(*self.sim3, geometry.depth_to_world_points(depth, k, c2w)))
        points = np.stack(points)
        return {"world_points": points, "local_points": points, "c2w": np.tile(np.eye(4), (len(images), 1, 1))}

    def answer(self, question, images, max_new_tokens=32):
        raise AssertionError("point-map suites never ask questions")


def _k_7scenes():
    return np.array([[525.0 * W / 640, 0, (320.5) * W / 640 - 0.5], [0, 525.0 * H / 480, 240.5 * H / 480 - 0.5],
                     [0, 0, 1]])


def _k_nrgbd():
    f = 554.2562584220408
    return np.array([[f * W / 640, 0, 320.5 * W / 640 - 0.5], [0, f * H / 480, 240.5 * H / 480 - 0.5], [0, 0, 1]])


def test_seven_scenes_reader_units_and_conventions(tmp_path):
    write_seven_scenes(tmp_path, frames=41)
    data = SevenScenes()
    assert data.sequences(tmp_path) == ["chess/seq-03"] and data.num_frames(tmp_path, "chess/seq-03") == 41
    frame = data.frame(tmp_path, "chess/seq-03", 40)
    assert frame.depth[0, 1] == pytest.approx(1.5 + 0.040 + 0.4)  # millimetres -> metres
    assert frame.depth[1, 1] == 0 and frame.depth[0, 0] == 0  # 65535 and 0 are "no depth"
    np.testing.assert_allclose(frame.c2w, _pose(40), atol=1e-12)  # pose.txt is camera-to-world
    np.testing.assert_allclose(frame.intrinsics, _k_7scenes())  # 525 / (320, 240) at 640x480, scaled
    # A pixel at the principal point unprojects to the camera centre + depth along the camera's z axis.
    suite = SUITES["7scenes-dense"]
    gt, valid = suite.ground_truth(frame, (H, W))
    assert not valid[1, 1] and not valid[0, 0] and valid.sum() == H * W - 2
    u, v = 5, 4
    cam = np.array([(u - frame.intrinsics[0, 2]) / frame.intrinsics[0, 0],
                    (v - frame.intrinsics[1, 2]) / frame.intrinsics[1, 1], 1.0]) * frame.depth[v, u]
    np.testing.assert_allclose(gt[v, u], _rotation(40) @ cam + _pose(40)[:3, 3], atol=1e-9)
    # At half the size, pixel (2, 2) covers full-size pixels 4..5 (centre 4.5): PIL's nearest neighbour takes
    # the depth of pixel 5 and the scaled intrinsics unproject it at 4.5.
    half, half_valid = suite.ground_truth(frame, (H // 2, W // 2))
    assert half.shape == (H // 2, W // 2, 3) and half_valid.sum() == (H // 2) * (W // 2) - 1  # (1, 1) had 65535
    cam = np.array([(4.5 - frame.intrinsics[0, 2]) / frame.intrinsics[0, 0],
                    (4.5 - frame.intrinsics[1, 2]) / frame.intrinsics[1, 1], 1.0]) * frame.depth[5, 5]
    np.testing.assert_allclose(half[2, 2], _rotation(40) @ cam + _pose(40)[:3, 3], atol=1e-9)


def test_nrgbd_poses_are_converted_from_opengl(tmp_path):
    write_nrgbd(tmp_path, frames=3)
    frame = NeuralRGBD().frame(tmp_path, "kitchen", 2)
    np.testing.assert_allclose(frame.c2w, _pose(2), atol=1e-8)  # OpenGL y-up/z-back columns flipped to OpenCV
    np.testing.assert_allclose(frame.intrinsics, _k_nrgbd())
    assert frame.depth[0, 2] == pytest.approx(1.5 + 0.080 + 0.02)


@pytest.mark.parametrize("name, writer, k, frames_used", [
    ("7scenes-dense", write_seven_scenes, _k_7scenes(), [0, 40, 80]),
    ("nrgbd-dense", write_nrgbd, _k_nrgbd(), [0, 100, 200]),
    ("eth3d", write_eth3d, None, [0, 5]),
])
def test_oracle_under_a_known_sim3_scores_zero(tmp_path, name, writer, k, frames_used):
    truth = writer(tmp_path / "data")
    suite, oracle = SUITES[name], OraclePredictor(truth, k)
    report = runner.run_benchmark(suite, oracle, tmp_path / "data", tmp_path / "out", process_index=0,
                                  process_count=1)
    (row,) = json.loads(next((tmp_path / "out" / "units").iterdir()).read_text())["rows"]
    assert row["frames"] == frames_used and oracle.calls == 1  # keyframes of the protocol, one forward pass
    values = report["table"][suite.label]
    assert values["acc"] < 1e-6 and values["comp"] < 1e-6 and values["acc_med"] < 1e-6
    assert values["nc"] > 1 - 1e-6 and values["nc_med"] > 1 - 1e-6


def test_wrong_pose_convention_is_not_scored_as_zero(tmp_path):
    """The oracle is only ~0 when the reader's conventions match the data: an NRGBD oracle that keeps the
    OpenGL poses (no axis flip) leaves a large error after alignment."""
    truth = write_nrgbd(tmp_path / "data")
    gl = np.diag([1.0, -1.0, -1.0, 1.0])
    wrong = {key: (depth, c2w @ gl) for key, (depth, c2w) in truth.items()}
    report = runner.run_benchmark(SUITES["nrgbd-dense"], OraclePredictor(wrong, _k_nrgbd()), tmp_path / "data",
                                  tmp_path / "out", process_index=0, process_count=1)
    assert report["table"]["NRGBD (dense, every 100th frame)"]["acc"] > 0.01


def _break_7scenes_depth(root):
    path = root / "chess/seq-03/frame-000040.depth.png"
    Image.fromarray(np.zeros((H, W), np.uint8)).save(path)  # 8-bit: a preview, not the mm depth
    return path


def _break_7scenes_pose(root):
    path = root / "chess/seq-03/frame-000080.pose.txt"
    np.savetxt(path, np.eye(4)[:3])
    return path


def _break_nrgbd_poses(root):
    path = root / "kitchen/poses.txt"
    path.write_text("\n".join(path.read_text().splitlines()[:-4]) + "\n")  # one matrix short
    return path


def _break_eth3d_depth(root):
    path = root / "courtyard/ground_truth_depth/custom_undistorted/DSC_0005.JPG"
    path.write_bytes(path.read_bytes()[:-4])
    return path


def _break_eth3d_camera(root):
    path = root / "courtyard/custom_undistorted_cam/DSC_0000.npz"
    np.savez(path, intrinsics=np.eye(3))
    return path


@pytest.mark.parametrize("name, writer, k, breaker", [
    ("7scenes-dense", write_seven_scenes, _k_7scenes(), _break_7scenes_depth),
    ("7scenes-dense", write_seven_scenes, _k_7scenes(), _break_7scenes_pose),
    ("nrgbd-dense", write_nrgbd, _k_nrgbd(), _break_nrgbd_poses),
    ("eth3d", write_eth3d, None, _break_eth3d_depth),
    ("eth3d", write_eth3d, None, _break_eth3d_camera),
])
def test_malformed_file_is_named_and_nothing_is_half_written(tmp_path, name, writer, k, breaker):
    truth = writer(tmp_path / "data")
    bad = breaker(tmp_path / "data")
    with pytest.raises(DatasetLayoutError, match=str(bad.name)):
        runner.run_benchmark(SUITES[name], OraclePredictor(truth, k), tmp_path / "data", tmp_path / "out",
                             process_index=0, process_count=1)
    written = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert written == []  # the only unit failed: no unit file, no temporary file, no report


def test_missing_layout_names_the_expected_files(tmp_path):
    for name, expected in (("7scenes-sparse", "TestSplit.txt"), ("nrgbd-sparse", "poses.txt"),
                           ("eth3d", "custom_undistorted")):
        with pytest.raises(DatasetLayoutError, match=expected):
            SUITES[name].units(tmp_path)
