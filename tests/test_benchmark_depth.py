"""Depth suites (Sintel, Bonn, KITTI, NYU-v2; monocular and video) on tiny datasets the tests write in the
released formats: .dpt with its TAG header, 16-bit PNGs at 5000 / 256 per metre, .npy metres. Scores are
checked against hand-computed values and every malformed file is a DatasetLayoutError naming it."""
import json

import numpy as np
import pytest
from PIL import Image

from g2vlm_jax.evaluation.benchmarks import SUITES, formats, runner
from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError
from g2vlm_jax.evaluation.benchmarks.depth_suites import BONN_SEQUENCES
from tests.benchmark_fixtures import (DEPTH_FRAMES, DEPTH_HW, depth_wall as _gt, write_bonn, write_kitti, write_nyu,
                                      write_sintel)

H, W = DEPTH_HW
FRAMES = DEPTH_FRAMES


class DepthOracle:
    """local z = transform(GT depth) of each image at its own size; pixels without GT get depth 1."""

    def __init__(self, truth: dict, transform):
        self.truth, self.transform, self.views = truth, transform, []

    def input_size(self, height, width):
        return height, width

    def reconstruct(self, images):
        self.views.append(len(images))
        z = []
        for i, image in enumerate(images):
            gt = self.truth[np.asarray(image).tobytes()]
            z.append(np.where(np.isfinite(gt) & (gt > 0), self.transform(gt, i), 1.0))
        z = np.stack(z)
        points = np.stack([np.zeros_like(z), np.zeros_like(z), z], axis=-1)
        return {"local_points": points, "world_points": points, "c2w": np.tile(np.eye(4), (len(images), 1, 1))}

    def answer(self, question, images, max_new_tokens=32):
        raise AssertionError("depth suites never ask questions")


def _run(tmp_path, name, writer, oracle_transform, out="out"):
    truth = writer(tmp_path / "data")
    oracle = DepthOracle(truth, oracle_transform)
    report = runner.run_benchmark(SUITES[name], oracle, tmp_path / "data", tmp_path / out, process_index=0,
                                  process_count=1)
    return report, oracle


def test_sintel_reader_and_cap(tmp_path):
    write_sintel(tmp_path)
    depth = formats.read_sintel_dpt(tmp_path / "depth" / "alley_2" / "frame_0002.dpt")
    np.testing.assert_allclose(depth[1:, 1:], _gt(1)[1:, 1:], rtol=1e-6)
    assert depth.shape == (H, W) and depth[0, 0] == 80.0
    # every frame off by its own scale: monocular alignment fits one scale per frame
    report, oracle = _run(tmp_path / "run", "sintel-mono", write_sintel, lambda gt, i: gt / (2.0 + gt[0, 1]))
    values = report["table"]["Sintel (mono)"]
    assert values["abs_rel"] < 1e-6 and values["delta_1.25"] == pytest.approx(1.0)
    assert report["units"] == 14 and oracle.views == [1] * 28  # one image per forward pass
    rows = [r for p in sorted((tmp_path / "run" / "out" / "units").iterdir()) for r in json.loads(p.read_text())["rows"]]
    assert all(r["num_valid"] == H * W - 1 for r in rows)  # the 80 m pixel is beyond the 70 m cap


def test_known_outliers_give_the_hand_computed_abs_rel(tmp_path):
    """A quarter of the pixels predicted 1.5x too deep: the L1-optimal scale stays 1 (the weighted median of
    the ratios), so AbsRel = 1/4 * 0.5 = 0.125 and δ<1.25 = 3/4 (the reference's 10 IRLS steps get within
    1e-5 of that scale)."""
    def outliers(gt, i):
        pred = gt.copy()
        pred[:, : W // 4] *= 1.5
        return pred

    report, _ = _run(tmp_path, "nyu-v2-mono", write_nyu, outliers)
    values = report["table"]["NYU-v2 (mono)"]
    assert values["abs_rel"] == pytest.approx(0.125, abs=5e-5) and values["delta_1.25"] == pytest.approx(0.75)


def test_video_aligns_one_scale_per_sequence(tmp_path):
    """One scale for the whole sequence: video depth scores ~0 (the released Adam alignment starts at the
    median scale and wanders by about its step size, 1e-4); a different scale per frame is no one sequence
    scale, so video depth sees it while monocular depth (a scale per frame) does not."""
    video, oracle = _run(tmp_path, "bonn-video", write_bonn, lambda gt, i: gt / 3.0)
    assert video["table"]["Bonn (video)"]["abs_rel"] < 1e-4 and oracle.views == [FRAMES] * 5
    per_frame, _ = _run(tmp_path / "pf", "bonn-video", write_bonn, lambda gt, i: gt * (1.0 + i))
    assert per_frame["table"]["Bonn (video)"]["abs_rel"] > 0.05
    mono, _ = _run(tmp_path / "mono", "bonn-mono", write_bonn, lambda gt, i: gt * (1.0 + gt[0, 0]))
    assert mono["table"]["Bonn (mono)"]["abs_rel"] < 1e-6


def test_png_depth_units(tmp_path):
    kitti = write_kitti(tmp_path / "kitti")
    path = tmp_path / "kitti/groundtruth_depth_gathered/2011_09_26_drive_0002_sync_02/0000000001.png"
    depth = formats.read_png_depth(path, 256.0)
    raw = np.asarray(Image.open(path))
    assert raw.dtype == np.uint16 and depth[0, 0] == 0 and depth[1, 1] == pytest.approx(raw[1, 1] / 256.0)
    assert depth[1, 1] == pytest.approx(_gt(1)[1, 1] * 10, abs=1 / 256)
    assert kitti and SUITES["kitti-video"].units(tmp_path / "kitti") == ["2011_09_26_drive_0002_sync_02",
                                                                         "2011_09_26_drive_0005_sync_03"]
    write_bonn(tmp_path / "bonn")
    bonn = formats.read_png_depth(tmp_path / "bonn" / BONN_SEQUENCES[0] / "depth_110" / "1548266469.100000.png",
                                  5000.0)
    assert bonn[1, 1] == 0 and bonn[0, 0] == pytest.approx(1.5, abs=1 / 5000)  # 5000 per metre


def test_kitti_video_oracle(tmp_path):
    report, oracle = _run(tmp_path, "kitti-video", write_kitti, lambda gt, i: gt * 0.1)
    assert report["table"]["KITTI (video)"]["abs_rel"] < 1e-4 and oracle.views == [FRAMES, FRAMES]


def test_nyu_units_are_chunks_in_file_order(tmp_path, monkeypatch):
    from g2vlm_jax.evaluation.benchmarks import depth_suites

    monkeypatch.setattr(depth_suites, "NYU_CHUNK", 2)
    write_nyu(tmp_path, images=5)
    suite = SUITES["nyu-v2-mono"]
    assert suite.units(tmp_path) == ["images-0000-0001", "images-0002-0003", "images-0004-0004"]
    assert [p[0].name for p in suite.dataset.pairs(tmp_path, "images-0002-0003")] == ["00002.png", "00003.png"]


def _break_dpt_tag(root):
    path = root / "depth" / "cave_2" / "frame_0002.dpt"
    path.write_bytes(np.float32(1.0).tobytes() + path.read_bytes()[4:])
    return path, "Sintel tag"


def _break_dpt_length(root):
    path = root / "depth" / "temple_3" / "frame_0001.dpt"
    path.write_bytes(path.read_bytes()[:-8])
    return path, "truncated"


def _break_bonn_png(root):
    path = sorted((root / BONN_SEQUENCES[2] / "depth_110").iterdir())[1]
    Image.fromarray(np.zeros((H, W), np.uint8)).save(path)
    return path, "16-bit"


def _break_kitti_count(root):
    path = sorted((root / "groundtruth_depth_gathered" / "2011_09_26_drive_0005_sync_03").iterdir())[0]
    path.unlink()
    return path.parent, "every image needs its depth map"


def _break_nyu_npy(root):
    path = root / "nyu_depths" / "00001.npy"
    np.save(path, np.zeros((2, H, W), np.float32))
    return path, "2-D depth map"


def _break_sintel_sequence(root):
    path = root / "final" / "market_5"
    for f in path.iterdir():
        f.unlink()
    path.rmdir()
    return path, "evaluation sequences"


@pytest.mark.parametrize("name, writer, breaker", [
    ("sintel-mono", write_sintel, _break_dpt_tag),
    ("sintel-video", write_sintel, _break_dpt_length),
    ("sintel-mono", write_sintel, _break_sintel_sequence),
    ("bonn-mono", write_bonn, _break_bonn_png),
    ("kitti-mono", write_kitti, _break_kitti_count),
    ("nyu-v2-mono", write_nyu, _break_nyu_npy),
])
def test_malformed_file_is_named_and_no_unit_is_half_written(tmp_path, name, writer, breaker):
    truth = writer(tmp_path / "data")
    bad, why = breaker(tmp_path / "data")
    with pytest.raises(DatasetLayoutError, match=why) as error:
        runner.run_benchmark(SUITES[name], DepthOracle(truth, lambda gt, i: gt), tmp_path / "data", tmp_path / "out",
                             process_index=0, process_count=1)
    assert str(bad) in str(error.value)
    units = tmp_path / "out" / "units"
    for path in (units.iterdir() if units.exists() else []):  # units before the bad one are whole files
        assert path.suffix == ".json" and not path.name.startswith(".") and json.loads(path.read_text())["rows"]
    assert not (tmp_path / "out" / "report.json").exists()
