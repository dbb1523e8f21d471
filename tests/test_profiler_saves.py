"""A profiling window that ends while an async checkpoint save is in flight must not crash the trainer.

CI once died with `Fatal Python error: Segmentation fault` in `jax.profiler.stop_trace`, called by
the loop while Orbax's async save thread was finalising. The loop now waits for the save before it
stops the trace (training/loop.py `_toggle_profiler` and the `finally:` branch). This test repeats
both cases in a separate process, so a crash fails this test (with the process's exit signal)
instead of taking a pytest worker down:
- the window ends at a step boundary right after a save was started (`profile_steps=1,2`,
  a save every step);
- the run ends inside the window (`profile_steps=1,99`): the final save, then the trace stops.
"""
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPEATS = 4
SCRIPT = """
import sys
from g2vlm_jax import config as C
from g2vlm_jax.training import loop
base, repeats = sys.argv[1], int(sys.argv[2])
for i in range(repeats):
    window = '1,2' if i % 2 == 0 else '1,99'
    cfg = C.load_experiment('experiments/tiny_synthetic.py:test', [
        f'workdir={base}/run{i}', 'optim.total_steps=3', 'checkpoint.every_steps=1', 'checkpoint.async_save=true',
        f'profile_steps={window}', 'eval.evaluators='])
    result = loop.train(cfg, run_final_eval=False)
    print('RUN', i, window, result.final_step, flush=True)
"""


def test_profile_window_ending_during_async_saves_does_not_crash(tmp_path):
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path), str(REPEATS)], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=800)
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr[-3000:]}"
    runs = [line.split() for line in proc.stdout.splitlines() if line.startswith("RUN")]
    assert [(r[2], r[3]) for r in runs] == [("1,2", "3"), ("1,99", "3")] * (REPEATS // 2)
    for i in range(REPEATS):
        assert any((tmp_path / f"run{i}" / "profile").rglob("*.xplane.pb")), f"run {i} wrote no trace"
        assert (tmp_path / f"run{i}" / "checkpoints" / "3").is_dir(), f"run {i} lost its last checkpoint"
