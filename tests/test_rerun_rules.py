"""Re-running into an existing run directory (issue #21 item 1), through the real `g2vlm` entry point.

The rule (README, "Training, checkpoints, evaluation"): a run continues only with the config it was
written with (where and how it runs may change: mesh, workers, checkpoint directory, logging); another
config is refused in one line naming the differing fields, unless `--allow-config-change`. A finished
run is not evaluated or logged again, and no evaluation ever overwrites an earlier report.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = str(ROOT / "experiments/tiny_synthetic.py:test")


def _g2vlm(*args, timeout=600) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "g2vlm_jax.cli", *args], env=env, cwd=str(ROOT),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("rerun")
    done = _g2vlm("train", "--experiment", EXPERIMENT, "--workdir", str(workdir))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "finished at step 6" in done.stdout
    (workdir.parent / "console.txt").write_text(done.stdout + done.stderr)
    return workdir


def _snapshot(workdir: pathlib.Path) -> dict:
    files = [workdir / "metrics.jsonl", *sorted((workdir / "eval").glob("report*.json"))]
    return {f.name: f.read_bytes() for f in files}


def test_rerunning_a_finished_run_changes_nothing(finished):
    before = _snapshot(finished)
    again = _g2vlm("train", "--experiment", EXPERIMENT, "--workdir", str(finished))
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"already finished at step 6; its report is {finished / 'eval' / 'report_step6.json'}" in again.stdout
    assert _snapshot(finished) == before  # no second evaluation, no metrics appended


def test_another_config_is_refused_naming_the_fields(finished):
    before = _snapshot(finished)
    changed = _g2vlm("train", "--experiment", EXPERIMENT, "--workdir", str(finished),
                     "--set", "data.packs_per_step=4", "--set", "optim.learning_rate=0.001")
    assert changed.returncode == 2
    lines = changed.stderr.strip().splitlines()
    assert lines[-1].startswith("g2vlm train: ") and "Traceback" not in changed.stderr
    assert "holds a run written with another config (data.packs_per_step: 2 -> 4; optim.learning_rate:" in lines[-1]
    assert "--allow-config-change" in lines[-1]
    assert _snapshot(finished) == before
    # Where and how it runs may change: the log period is not part of what the run computes.
    moved = _g2vlm("train", "--experiment", EXPERIMENT, "--workdir", str(finished), "--set", "log_every=2")
    assert moved.returncode == 0, moved.stderr[-2000:]
    # The explicit flag continues it (here: nothing left to train, so nothing is written either).
    allowed = _g2vlm("train", "--experiment", EXPERIMENT, "--workdir", str(finished), "--set", "data.packs_per_step=4",
                     "--allow-config-change")
    assert allowed.returncode == 0, allowed.stderr[-2000:]
    assert _snapshot(finished) == before


def test_evaluating_again_writes_a_new_report(finished):
    first = (finished / "eval" / "report_step6.json").read_bytes()
    result = _g2vlm("eval", "--experiment", EXPERIMENT, "--checkpoint", str(finished))
    assert result.returncode == 0, result.stderr[-2000:]
    assert (finished / "eval" / "report_step6.json").read_bytes() == first
    second = json.loads((finished / "eval" / "report_step6.2.json").read_text())
    assert second["step"] == 6 and second["reconstruction"]["num_samples"] > 0


def _tensorboard_events(workdir: pathlib.Path) -> list:
    """Every Event of the run's TensorBoard files (TFRecord framing: length, crc, payload, crc)."""
    import struct

    from tensorboardX.proto import event_pb2

    events = []
    for path in sorted((workdir / "tensorboard").glob("events.out.tfevents.*")):
        data, offset = path.read_bytes(), 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset:offset + 8])
            events.append(event_pb2.Event.FromString(data[offset + 12:offset + 12 + length]))
            offset += 12 + length + 4
    return events


def test_the_run_logs_what_a_user_reads(finished):
    """metrics.jsonl eval rows carry their step; TensorBoard tags are not doubled and the evaluation's
    pictures are there too (issue #21 item 10)."""
    rows = [json.loads(line) for line in (finished / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if r["kind"] == "eval"]
    assert evals and all(r["step"] == 6 for r in evals)
    values = [v for e in _tensorboard_events(finished) for v in e.summary.value]
    tags = {v.tag for v in values}
    assert "eval/reconstruction/vg_loss" in tags and "train/loss" in tags
    assert not any(t.startswith("eval/eval/") for t in tags)
    images = {v.tag for v in values if v.HasField("image")}
    assert {"eval/depth_0", "eval/trajectory_0"} <= images


def test_captured_output_is_lines_without_noise(finished):
    """In a log (not a terminal): no progress-bar carriage returns or cursor moves, none of the library
    noise of issue #21 item 9, and a line before the first (compiling) step and before the evaluation."""
    console = (finished.parent / "console.txt").read_text()
    assert "\r" not in console and "\x1b[A" not in console
    for noise in ("Using custom data configuration", "Downloading and preparing dataset", "has no dataset_info.json",
                  "CheckpointManagerOptions.read_only", "Generating splits"):
        assert noise not in console, noise
    assert "[train] step 0 of 6: compiling the train step" in console
    assert "[eval] step 6: running the held-out evaluators" in console


def test_a_terminal_shows_a_progress_bar_with_rate_and_eta(tmp_path):
    """On a terminal (a pseudo-terminal here) training shows tqdm's bar: steps done, rate and ETA."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a 120 x 40 terminal
    env = dict(os.environ, PYTHONPATH=str(ROOT), COLUMNS="120")
    proc = subprocess.Popen([sys.executable, "-m", "g2vlm_jax.cli", "train", "--experiment", EXPERIMENT, "--workdir",
                             str(tmp_path), "--set", "eval.evaluators=", "--set", "eval.every_steps=0"],
                            stdin=follower, stdout=follower, stderr=follower, env=env, cwd=str(ROOT), close_fds=True)
    os.close(follower)
    chunks = []
    while True:
        ready, _, _ = select.select([leader], [], [], 600)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(leader, 65536)
        except OSError:  # the terminal closed: the process ended
            break
        if not data:
            break
        chunks.append(data)
    assert proc.wait(timeout=60) == 0
    os.close(leader)
    screen = b"".join(chunks).decode(errors="replace")
    assert "train: 100%" in screen and "6/6" in screen and ("step/s" in screen or "s/step" in screen)
    assert "finished at step 6" in screen
