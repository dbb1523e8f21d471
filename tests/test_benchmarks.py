"""Smoke tests of the benchmarks: each runs end to end at the smallest size, so a change to the
library cannot silently break the commands behind docs/PERFORMANCE.md."""
import pathlib

import numpy as np
import pytest

from g2vlm_jax import config as C
from g2vlm_jax.model.mask import MaskInfo, build_mask
from g2vlm_jax import aot
from tools import bench_train, bench_tpu_attention, bench_vs_official
from tools.bench_common import recon_batch

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_bench_train_runs_the_real_step(tmp_path):
    cfg = C.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:test"), [f"workdir={tmp_path}"])
    result = bench_train.run(cfg, steps=2)
    assert len(result["records"]) == 2 and len(result["programs"]) == 1
    assert result["step_compiles"] == 0  # compiled ahead of the first step, then called directly
    assert all(r["finite"] and np.isfinite(r["loss"]) and r["tokens"] > 0 and r["flops"] > 0
               for r in result["records"])


def test_bench_tpu_attention_fractions_and_compile():
    info = MaskInfo.from_batch(recon_batch(3, samples=2, hw=(112, 112)))  # 2 documents of 3 x 64 tokens
    allowed, live, full = bench_tpu_attention.pair_fractions(info, 64)
    exact = float(np.mean(np.asarray(build_mask(info, info, "global"))))
    assert allowed == pytest.approx(exact)
    assert 0 < full <= live <= 1 and live < 1  # cross-document tiles are skipped
    try:
        device = aot.slice_devices("v5p:2x2x1")[0]
    except RuntimeError as e:
        pytest.skip(str(e))
    temp, seconds = bench_tpu_attention.compile_attention("tpu_flash", 512, device, 128)
    assert temp > 0 and seconds > 0


def test_bench_vs_official_our_side_runs_the_tiny_and_train_rows(capsys):
    """Our side of tools/bench_vs_official.py end to end (driver + fresh worker processes, no torch): the tiny
    reconstruct row and the train row, one process x one timed call each."""
    bench_vs_official.main(["--cases", "tiny-2v-126,train-tiny-4v-126", "--rounds", "1", "--repeats", "1"])
    rows = {line.split(" (")[0].strip("| "): line.split(" | ") for line in capsys.readouterr().out.splitlines()
            if line.startswith("| tiny-2v-126") or line.startswith("| train-tiny-4v-126")}
    assert sorted(rows) == ["tiny-2v-126", "train-tiny-4v-126"]
    # tokens L: 2 frames of 9 x 7 patches + 2 markers each (recon prompt apart); the train row's sequence
    # is the 8 prompt tokens + 4 x (63 + 2), padded to the expert-grouped layout's multiple of 8.
    assert int(rows["train-tiny-4v-126"][4]) == 8 + 4 * 65 and int(rows["tiny-2v-126"][4]) > 2 * 65
    for cells in rows.values():
        assert cells[5] == "-" and float(cells[6]) > 0  # no official side; our median step / call in s


def test_bench_vs_official_train_batch_is_the_fixture_geometry(tmp_path):
    """The train row's batch (both sides read it): GT world points project back onto their pixels at the
    fixture depth, and the official sequence order lists every token of the sample once."""
    case = next(c for c in bench_vs_official.CASES if c.train)
    bench_vs_official.prepare_images(tmp_path / "images")
    bench_vs_official.write_train_batch(case, tmp_path / "images", tmp_path / "batch.npz")
    b = np.load(tmp_path / "batch.npz")
    world, valid = b["gt_world_points"][0, 0], b["gt_valid"][0, 0]  # [V, H, W, 3], [V, H, W]
    poses, intrinsics, depths = b["gt_poses"][0, 0], b["gt_intrinsics"][0, 0], b["official_depths"]
    assert world.shape == (4, 98, 126, 3) and valid.mean() > 0.5 and np.array_equal(valid, depths > 0)
    w2c = np.linalg.inv(poses.astype(np.float64))
    cam = np.einsum("vij,vhwj->vhwi", w2c[:, :3, :3], world) + w2c[:, None, None, :3, 3]
    np.testing.assert_allclose(cam[..., 2], depths, rtol=1e-4, atol=1e-5)
    pix = np.einsum("vij,vhwj->vhwi", intrinsics, cam)
    v, u = np.meshgrid(np.arange(98), np.arange(126), indexing="ij")
    np.testing.assert_allclose(pix[..., 0][valid] / pix[..., 2][valid], np.broadcast_to(u, valid.shape)[valid],
                               atol=1e-2)
    np.testing.assert_allclose(pix[..., 1][valid] / pix[..., 2][valid], np.broadcast_to(v, valid.shape)[valid],
                               atol=1e-2)
    order, is_text, is_dino = b["official_order"], b["official_is_text"], b["official_is_dino"]
    assert len(np.unique(order)) == len(order) == 8 + 4 * 65 and is_dino.sum() == 4 * 63
    assert np.array_equal(is_text, ~is_dino)
    assert np.all(np.diff(b["seq_order"][0][order]) > 0)  # sequence (reading) order
