"""Real signals to a real training process: SIGTERM saves and exits cleanly; SIGKILL at random
points (10 seeded trials, many during async checkpoint writes) never leaves a partial checkpoint
that a restart would pick; both end with exactly the parameters of an uninterrupted run."""
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import config as C
from g2vlm_jax import sharding
from g2vlm_jax.training import loop
from g2vlm_jax.core import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]
KILL_TRIALS = 10
# Each kill trial lets the run advance at most ~2 logged steps (`_sleep_unless_a_step_logs`), so 3 steps per
# trial keep the run from finishing before all trials have killed it, however fast the machine steps.
TOTAL = 3 * KILL_TRIALS


def _overrides(workdir, every):
    return [f"workdir={workdir}", "eval.evaluators=", f"optim.total_steps={TOTAL}", f"checkpoint.every_steps={every}",
            "checkpoint.keep_last=2", "checkpoint.async_save=true"]


def _cfg(workdir, every):
    return C.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:test"), _overrides(workdir, every))


def _start(workdir, every) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "g2vlm_jax.cli", "train", "--experiment", str(ROOT / "experiments/tiny_synthetic.py:test")]
    for o in _overrides(workdir, every):
        cmd += ["--set", o]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    log = open(pathlib.Path(workdir) / "train.log", "ab")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT))


def _logged_steps(workdir) -> list[int]:
    path = pathlib.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"kind": "train"' in line]


def _wait_for_steps(proc, workdir, count_before: int, timeout: float = 300) -> bool:
    """Waits until the run logs a new training step; False if the process ended first."""
    deadline = time.monotonic() + timeout
    while len(_logged_steps(workdir)) <= count_before:
        if proc.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the training process logged no step in time"
        time.sleep(0.1)
    return True


def _sleep_unless_a_step_logs(workdir, seconds: float, count: int) -> None:
    """Sleeps `seconds`, or less: until the run has logged more than `count` steps (a random point inside the
    current step, whatever the machine's speed, instead of a fixed time that a fast machine fills with steps)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and len(_logged_steps(workdir)) <= count:
        time.sleep(0.02)


def _final_params(state) -> list[np.ndarray]:
    return [np.asarray(x) for x in jax.tree.leaves((state.trainable, state.opt_state))]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (same config, in this process: the same compiled programs)."""
    workdir = tmp_path_factory.mktemp("reference")
    return _final_params(loop.train(_cfg(workdir, every=2), run_final_eval=False).state)


def _assert_newest_checkpoint_is_complete(workdir, cfg) -> int:
    """The checkpoint a restart picks (the newest visible step) restores completely.

    A kill can also land while Orbax deletes a rotated-out *older* step (a plain recursive delete),
    leaving a partial directory behind; such leftovers are older than the newest step, so a restart
    never picks them (and the trainer's fallback would skip them with a warning).
    """
    manager = ckpt_lib.make_manager(pathlib.Path(workdir) / "checkpoints", cfg.checkpoint, read_only=True)
    steps = manager.all_steps()
    if not steps:
        return 0
    _, fresh, shardings = state_lib.create_train_state(cfg, sharding.make_mesh(cfg.mesh))
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
    newest = max(steps)
    state, data_state = ckpt_lib.restore(manager, newest, abstract, shardings, cfg)  # raises if partial
    assert data_state["step"] == newest and int(state.step) == newest
    return newest


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_saves_exits_cleanly_and_resumes_exactly(tmp_path, reference, capsys, sig):
    """SIGTERM (preemption) and Ctrl-C (SIGINT) alike: a checkpoint at the step boundary, one line, resumable."""
    proc = _start(tmp_path, every=100)  # no scheduled save before the end: only the signal saves
    assert _wait_for_steps(proc, tmp_path, 2)
    proc.send_signal(sig)
    assert proc.wait(timeout=120) == 0
    log = (tmp_path / "train.log").read_text()
    manager = ckpt_lib.make_manager(tmp_path / "checkpoints", C.CheckpointConfig(), read_only=True)
    saved = manager.latest_step()
    assert saved is not None and 3 <= saved < TOTAL, log[-2000:]
    assert f"stopped by {sig.name} at step {saved} of {TOTAL}; the checkpoint is saved: run the same command to resume" \
        in log.splitlines()[-1]
    assert "KeyboardInterrupt" not in log and "Traceback" not in log
    resumed = loop.train(_cfg(tmp_path, every=2), run_final_eval=False)
    assert resumed.start_step == saved and resumed.final_step == TOTAL
    assert f"resumed from step {saved} of {TOTAL}" in capsys.readouterr().out
    for a, b in zip(reference, _final_params(resumed.state)):
        np.testing.assert_array_equal(a, b)


def test_sigkill_at_random_points_always_resumes_from_a_complete_checkpoint(tmp_path, reference):
    cfg = _cfg(tmp_path, every=1)  # a checkpoint (async) every step: most kills land inside a write
    rng = np.random.default_rng(1234)
    kills = last_newest = 0
    for trial in range(KILL_TRIALS):
        before = len(_logged_steps(tmp_path))
        proc = _start(tmp_path, every=1)
        if not _wait_for_steps(proc, tmp_path, before):
            assert proc.returncode == 0, (tmp_path / "train.log").read_text()[-2000:]
            break  # the run finished before this trial could kill it
        _sleep_unless_a_step_logs(tmp_path, float(rng.uniform(0.0, 1.5)), len(_logged_steps(tmp_path)))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        kills += 1
        newest = _assert_newest_checkpoint_is_complete(tmp_path, cfg)
        assert newest >= last_newest, "a restart went back to an older checkpoint"
        last_newest = newest
    assert kills >= KILL_TRIALS - 2, f"only {kills} kills landed before the run finished"
    final = loop.train(_cfg(tmp_path, every=2), run_final_eval=False)
    assert final.final_step == TOTAL
    for a, b in zip(reference, _final_params(final.state)):
        np.testing.assert_array_equal(a, b)


def test_multi_process_runs_agree_on_sigterm_every_n_steps_only(monkeypatch):
    """One process reads its flag every step; several agree by an all-gather, but only on every Nth step
    (a host sync per step would stall the dispatched steps); all processes then stop at that step."""
    from jax.experimental import multihost_utils

    gathers = []

    def allgather(x):
        gathers.append(bool(x[0]))
        return np.array([[x[0]], [False]])  # this process and a peer that saw nothing

    watcher = loop.PreemptionWatcher(enabled=False, check_every=5)
    watcher.requested.set()
    assert [watcher.should_stop(s) for s in (1, 2)] == [True, True]  # one process: every step, no gather
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", allgather)
    assert [watcher.should_stop(s) for s in range(1, 11)] == [False] * 4 + [True] + [False] * 4 + [True]
    assert gathers == [True, True]
    watcher.requested.clear()
    assert not watcher.should_stop(15) and gathers == [True, True, False]
