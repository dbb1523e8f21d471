"""The benchmark runner: resumable after a kill (atomic unit files), units shared across processes with the
one-process report, refusal of another suite's results, the markdown table; and `g2vlm benchmark` as a
user runs it, on a tiny NYU-v2 layout with a real tiny checkpoint."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from g2vlm_jax import cli
from g2vlm_jax.evaluation.benchmarks import SUITES, runner
from g2vlm_jax.evaluation.benchmarks.predictor import ModelPredictor
from g2vlm_jax.evaluation.benchmarks.base import Suite
from tests.benchmark_fixtures import DEPTH_HW, KITTI_DRIVES, write_kitti, write_nyu

ROOT = pathlib.Path(__file__).resolve().parents[1]
UNITS = ("a", "b/c", "d", "e", "f")


class LetterSuite(Suite):
    """Asks the predictor one question per unit; a row per unit with a score from the answer."""

    name, kind, columns, source = "letters", "qa", ("score", "rows"), "tests"

    def __init__(self, name="letters", protocol=None):
        self.name, self._protocol = name, protocol or {"every": 1}

    def protocol(self):
        return self._protocol

    def units(self, data_dir):
        return list(UNITS)

    def evaluate(self, predictor, data_dir, unit):
        return [{"unit": unit, "score": float(len(predictor.answer(unit, [])))}]

    def summarize(self, rows):
        scores = [r["score"] for r in rows]
        return {"all units": {"score": float(np.mean(scores)), "rows": len(rows)},
                "last unit": {"score": scores[-1], "rows": 1}}


class RecordingPredictor:
    """Answers 'x' * len(unit); raises on `fail_on` (a killed run)."""

    def __init__(self, fail_on=None):
        self.fail_on, self.asked = fail_on, []

    def answer(self, question, images, max_new_tokens=32):
        if question == self.fail_on:
            raise KeyboardInterrupt(f"killed while evaluating {question}")
        self.asked.append(question)
        return "x" * len(question) + "!"

    def reconstruct(self, images):
        raise AssertionError("not used")

    def input_size(self, height, width):
        return height, width


def _run(out, predictor, **kwargs):
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return runner.run_benchmark(LetterSuite(), predictor, "data", out, checkpoint="ckpt", **kwargs)


def test_a_killed_benchmark_resumes_with_the_remaining_units(tmp_path):
    whole = _run(tmp_path / "whole", RecordingPredictor())
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path / "killed", RecordingPredictor(fail_on="d"))
    units = tmp_path / "killed" / "units"
    assert sorted(p.name for p in units.iterdir()) == ["a.json", "b__c.json"]  # whole files only
    assert not (tmp_path / "killed" / "report.json").exists()
    again = RecordingPredictor()
    resumed = _run(tmp_path / "killed", again)
    assert again.asked == ["d", "e", "f"] and resumed == whole
    assert json.loads((tmp_path / "killed" / "report.json").read_text()) == whole
    assert whole["table"]["all units"] == {"score": pytest.approx((2 + 4 + 2 + 2 + 2) / 5), "rows": 5}
    assert (whole["suite"], whole["units"], whole["checkpoint"], whole["protocol"]) == ("letters", 5, "ckpt", {"every": 1})


def test_a_kill_while_writing_leaves_no_unit_file(tmp_path, monkeypatch):
    real_replace, calls = os.replace, []

    def killed_at_rename(src, dst):
        calls.append(dst)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed between the write and the rename")
        real_replace(src, dst)

    monkeypatch.setattr(runner.os, "replace", killed_at_rename)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, RecordingPredictor())
    assert sorted(p.name for p in (tmp_path / "units").glob("*.json")) == ["a.json"]  # b/c is not taken as done
    assert [p.name for p in (tmp_path / "units").glob(".b__c.json.*.tmp")]  # what the kill left behind
    monkeypatch.setattr(runner.os, "replace", real_replace)
    again = RecordingPredictor()
    _run(tmp_path, again)
    assert again.asked == ["b/c", "d", "e", "f"]
    assert sorted(p.name for p in (tmp_path / "units").iterdir()) == ["a.json", "b__c.json", "d.json", "e.json",
                                                                      "f.json"]  # the leftover is cleared


def test_processes_share_the_units_and_process_0_writes_the_one_process_report(tmp_path):
    single = _run(tmp_path / "one", RecordingPredictor())
    second, first = RecordingPredictor(), RecordingPredictor()
    assert _run(tmp_path / "two", second, process_index=1, process_count=2) is None  # only process 0 reports
    assert not (tmp_path / "two" / "report.json").exists()
    report = _run(tmp_path / "two", first, process_index=0, process_count=2)
    assert (first.asked, second.asked) == (["a", "d", "f"], ["b/c", "e"])
    assert report == single
    assert (tmp_path / "two" / "report.md").read_text() == (tmp_path / "one" / "report.md").read_text()
    # process 0 alone (its peer died before its units): the report names the missing units, nothing is written
    with pytest.raises(RuntimeError, match="2 of 5 units have no result"):
        _run(tmp_path / "lonely", RecordingPredictor(), process_index=0, process_count=2)
    assert not (tmp_path / "lonely" / "report.json").exists()


def test_results_of_another_suite_or_protocol_are_refused(tmp_path):
    _run(tmp_path, RecordingPredictor(), max_units=2)
    for suite in (LetterSuite(name="other"), LetterSuite(protocol={"every": 2})):
        predictor = RecordingPredictor()
        with pytest.raises(ValueError, match="pass another --out"):
            runner.run_benchmark(suite, predictor, "data", tmp_path, process_index=0, process_count=1)
        assert predictor.asked == []  # refused before any work


def test_report_markdown_is_the_papers_table(tmp_path):
    report = _run(tmp_path, RecordingPredictor(), max_units=3)
    md = (tmp_path / "report.md").read_text()
    assert report["units"] == 3 and report["units_in_dataset"] == 5
    assert "first 3 of 5 units" in md
    table = [line for line in md.splitlines() if line.startswith("|")]
    assert table[0] == "| | score | rows |"
    assert table[2:] == ["| all units | 2.667 | 3.000 |", "| last unit | 2.000 | 1.000 |", "| mean | 2.333 | 2.000 |"]
    with pytest.raises(ValueError, match="--max-units 0"):
        _run(tmp_path, RecordingPredictor(), max_units=0)


def test_cli_benchmark_on_a_tiny_checkpoint(tiny_trained_run, tmp_path):
    write_nyu(tmp_path / "nyu", images=2)
    out = tmp_path / "bench"
    command = [sys.executable, "-m", "g2vlm_jax.cli", "benchmark", "--suite", "nyu-v2-mono", "--data",
               str(tmp_path / "nyu"), "--checkpoint", str(tiny_trained_run), "--width", "28", "--out", str(out)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    values = report["table"]["NYU-v2 (mono)"]
    assert report["units"] == 1 and report["checkpoint"] == str(tiny_trained_run) and report["frame_width"] == 28
    assert 0 <= values["abs_rel"] < 10 and 0 <= values["delta_1.25"] <= 1
    assert "| NYU-v2 (mono) |" in done.stdout and str(out / "report.json") in done.stdout
    (row_a, row_b) = json.loads((out / "units" / "images-0000-0001.json").read_text())["rows"]
    assert row_a["num_valid"] == row_b["num_valid"] == DEPTH_HW[0] * DEPTH_HW[1]  # scored at the GT size, not 28 wide


def test_cli_user_errors_are_one_line(tmp_path, capsys):
    write_nyu(tmp_path / "nyu", images=2)
    base = ["benchmark", "--data", str(tmp_path / "nyu"), "--checkpoint", str(tmp_path / "none"), "--out",
            str(tmp_path / "out")]
    assert cli.main(base + ["--suite", "nyu"]) == cli.USER_ERROR_EXIT_CODE
    assert "choose one of: 7scenes-dense" in capsys.readouterr().err
    assert cli.main(base[:2] + [str(tmp_path / "missing")] + base[3:] + ["--suite", "sintel-mono"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(tmp_path / "missing" / "final" / "alley_2") in err
    assert cli.main(base + ["--suite", "nyu-v2-mono", "--width", "7"]) == 2
    assert "--width 7" in capsys.readouterr().err


def test_cli_two_processes_write_the_one_process_report(tiny_trained_run, tmp_path):
    """Two `g2vlm benchmark` processes (jax.distributed on 127.0.0.1) each evaluate one of the two KITTI drives
    with their own copy of the model; process 0 writes the report one process writes."""
    from tests import multihost

    write_kitti(tmp_path / "kitti")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = [sys.executable, "-m", "g2vlm_jax.cli", "benchmark", "--suite", "kitti-mono", "--data",
            str(tmp_path / "kitti"), "--checkpoint", str(tiny_trained_run), "--width", "28"]
    port = multihost.free_port()
    procs = [subprocess.Popen(base + ["--out", str(tmp_path / "two"), "--coordinator", f"127.0.0.1:{port}",
                                      "--num-processes", "2", "--process-id", str(i)],
                              env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    units = sorted(p.name for p in (tmp_path / "two" / "units").iterdir())
    assert units == [f"{drive}.json" for drive in KITTI_DRIVES]
    # the same suite in this one process, through the library
    model = ModelPredictor.load(tiny_trained_run, width=28)
    one_report = runner.run_benchmark(SUITES["kitti-mono"], model, tmp_path / "kitti", tmp_path / "one",
                                      checkpoint=str(tiny_trained_run))
    two_report = json.loads((tmp_path / "two" / "report.json").read_text())
    for label, values in one_report["table"].items():
        assert two_report["table"][label] == pytest.approx(values, rel=1e-5)  # the same programs, other processes
    assert {k: v for k, v in two_report.items() if k != "table"} == {k: v for k, v in one_report.items() if k != "table"}


def test_model_predictor_sizes_frames_and_answers(tiny_trained_run):
    model = ModelPredictor.load(tiny_trained_run, width=28)
    assert model.width == 28 and model.input_size(42, 56) == (28, 28) and model.input_size(300, 100) == (84, 28)
    images = [np.full((42, 56, 3), 40 * i, np.uint8) for i in range(2)]
    out = model.reconstruct(images)
    assert out["local_points"].shape == out["world_points"].shape == (2, 28, 28, 3) and out["c2w"].shape == (2, 4, 4)
    assert np.isfinite(out["local_points"]).all()
    assert ModelPredictor(model.cfg, model.model, model.tok).width == model.cfg.data.image_size[1]  # the default
    assert isinstance(model.answer("How far is the wall?", [], max_new_tokens=2), str)
    with pytest.raises(ValueError, match="reconstruction only"):  # tiny_synthetic:test has no ViT
        model.answer("How far is the wall?", images)
