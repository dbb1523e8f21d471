"""Shared test set-up.

- Grain worker processes read absl flags; mark them parsed so tests that start workers do not fail.
- Tests run on one CPU device unless a test re-launches itself with fake devices (see
  tests/multidevice.py); XLA_FLAGS must be set before jax is imported, so this file never imports jax
  at module level for anything that would fix the device count.
"""
import os
import pathlib
import sys

from absl import flags

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT.parent / "shared" / "fixtures"
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The suite runs on CPU. With the tpu-aot extra installed, jax would otherwise probe for a TPU in
# every process it starts (seconds each); the AOT tests describe TPU slices without opening one.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The AOT tests open libtpu only to describe TPU slices (compile-only, no chip). libtpu takes a
# machine-wide lockfile, so a `g2vlm aot` running beside the tests would make them skip; compile-only
# clients may share it.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Persistent XLA compilation cache shared by the test process and the subprocesses it starts:
# integration tests compile the same tiny train step several times (~2x faster from the cache).
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(ROOT / ".pytest_cache" / "jax_compilation_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


import pytest  # noqa: E402

import ci_guard  # noqa: E402


def pytest_configure(config):
    # The suite's last guard names the tests still running when CI stops it (tests/ci_guard.py).
    config.pluginmanager.register(ci_guard, "ci_guard")


@pytest.fixture(scope="session")
def tiny_trained_run(tmp_path_factory):
    """A run directory of `tiny_synthetic:test` trained 3 steps (checkpoint at step 3), for inference tests."""
    from g2vlm_jax import config as C
    from g2vlm_jax.training import loop

    workdir = tmp_path_factory.mktemp("tiny_trained")
    cfg = C.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:test"), [f"workdir={workdir}"])
    loop.train(cfg, stop_after_steps=3, run_final_eval=False)
    return workdir


@pytest.fixture(scope="session")
def tiny_qa_checkpoint(tmp_path_factory):
    """A params-only checkpoint of a freshly initialised `tiny_synthetic:qa_test` model (semantic expert + ViT),
    written through the export path (no training: answers are random text, which is all the spatial-QA
    plumbing tests need)."""
    from flax import nnx

    from g2vlm_jax import config as C, export
    from g2vlm_jax.model.g2vlm import G2VLM

    workdir = tmp_path_factory.mktemp("tiny_qa")
    cfg = C.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:qa_test"), [f"workdir={workdir / 'run'}"])
    model = G2VLM(cfg.model, rngs=nnx.Rngs(cfg.seed))
    return export.save_model(model, cfg, workdir / "checkpoint", dtype="float32", source="tests: qa_test at init")
