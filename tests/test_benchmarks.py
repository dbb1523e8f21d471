"""Smoke tests of the benchmarks: each runs end to end at the smallest size, so a change to the
library cannot silently break the commands behind docs/PERFORMANCE.md."""
import pathlib

import numpy as np
import pytest

from g2vlm_jax import config as C
from g2vlm_jax.model.mask import MaskInfo, build_mask
from g2vlm_jax import aot
from tools import bench_train, bench_tpu_attention
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
