"""Every benchmark suite through `g2vlm benchmark` (cli.main, in-process; the subprocess path is
test_benchmark_runner.py's) on its tiny dataset in the released layout (tests/benchmark_fixtures.py),
with a tiny real checkpoint: what a user looks at, the report files and the printed table, is whole,
and the same command run again evaluates nothing.

Every suite runs on `tiny_qa_checkpoint` (conftest.py: tiny_synthetic:qa_test at init, params-only): one
checkpoint with both experts and no training step to pay for; an untrained model is also the harshest input
for the metrics (it put every camera in one place, which used to stop the trajectory suites). The QA
fixtures are cut to their first questions: the suites' max_new_tokens are their protocols' (16 / 100 / 32,
recorded in every unit file; the CLI rightly has no flag for it), every question shape (image count, answer
length) compiles its own generation programs, which is what costs time here, and one question per unit
already goes through the whole read-ask-score-report path.
"""
import json
import math

import pytest

from g2vlm_jax import cli
from g2vlm_jax.evaluation.benchmarks import SUITES, runner
from g2vlm_jax.evaluation.benchmarks.predictor import ModelPredictor
from tests import benchmark_fixtures as fx

# suite name -> (writer of its dataset, units that dataset holds, counted from the writer's docstring)
FIXTURES = {
    "7scenes-sparse": (fx.write_seven_scenes, 1), "7scenes-dense": (fx.write_seven_scenes, 1),
    "nrgbd-sparse": (fx.write_nrgbd, 1), "nrgbd-dense": (fx.write_nrgbd, 1), "eth3d": (fx.write_eth3d, 1),
    "sintel-mono": (fx.write_sintel, 14), "sintel-video": (fx.write_sintel, 14),
    "bonn-mono": (fx.write_bonn, 5), "bonn-video": (fx.write_bonn, 5),
    "kitti-mono": (fx.write_kitti, 2), "kitti-video": (fx.write_kitti, 2), "nyu-v2-mono": (fx.write_nyu, 1),
    "co3d-pose": (fx.write_co3d, 2), "re10k-pose": (fx.write_re10k, 1), "tum-dynamics-pose": (fx.write_tum, 1),
    "scannet-pose": (fx.write_scannet, 1),
    "vsibench": (lambda root: fx.write_vsibench(root, fx.VSI_QUESTIONS[:1]), 1),  # one question, one video
    "sparbench": (lambda root: fx.write_sparbench(root, fx.SPAR_QUESTIONS[:1]), 1),
    "mindcube": (lambda root: fx.write_mindcube(root, fx.MINDCUBE_QUESTIONS[:1]), 1),
    "omnispatial": (fx.write_omnispatial, 1),
}

# QA tables have a column for each question category the dataset asks about; these are the fixtures'.
QA_COLUMNS_ASKED = {
    "vsibench": {"Overall", "object_rel_direction", "Overall (official first-word parser)"},
    "sparbench": {"Overall", "Low", "depth_prediction_oc"},
    "mindcube": {"Overall", "among"},
    "omnispatial": {"Overall", "Dynamic_Reasoning", "Perspective_Taking"},
}


@pytest.fixture(scope="module", autouse=True)
def one_model_load_per_checkpoint():
    """`g2vlm benchmark` loads its checkpoint on every call (1-3 s each on this machine, 40 calls here): the
    first call per checkpoint loads it for real, later calls get a new ModelPredictor around the same model
    (with their own --width), which also keeps the compiled programs of one model warm across suites."""
    real_load, loaded = ModelPredictor.load.__func__, {}

    def load_once(cls, checkpoint, *, width=None, overrides=(), devices=None):
        key = (str(checkpoint), tuple(overrides))
        if key not in loaded:
            loaded[key] = real_load(cls, checkpoint, width=width, overrides=overrides, devices=devices)
        first = loaded[key]
        return cls(first.cfg, first.model, first.tok, width=width, checkpoint=str(checkpoint))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ModelPredictor, "load", classmethod(load_once))
        yield


def _strict_json(text: str):
    """json.loads that refuses NaN / Infinity (Python writes them; JSON and other readers do not)."""
    def refuse(token):
        raise ValueError(f"report.json holds {token}, which is not JSON")
    return json.loads(text, parse_constant=refuse)


def _files(folder):
    return {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


def _benchmark(name, data, checkpoint, out):
    return cli.main(["benchmark", "--suite", name, "--data", str(data), "--checkpoint", str(checkpoint),
                     "--out", str(out), "--width", "28"])


def _check_table(suite, report):
    """Every column the protocol defines on this dataset is a finite number, the rest are not made up."""
    (label, values), = report["table"].items()
    extra = set(values) - set(suite.columns)
    assert not extra, f"{label}: columns not in suite.columns: {extra}"
    defined = QA_COLUMNS_ASKED[suite.name] if suite.kind == "qa" else set(suite.columns)
    assert defined <= set(values), f"{label}: no value for {defined - set(values)}"
    bad = {c: v for c, v in values.items() if not (isinstance(v, (int, float)) and math.isfinite(v))}
    assert not bad, f"{label}: not finite numbers {bad}"
    return label


@pytest.mark.parametrize("name", sorted(SUITES))
def test_every_suite_runs_from_the_cli_and_resumes(name, tiny_qa_checkpoint, tmp_path, monkeypatch, capsys):
    checkpoint = tiny_qa_checkpoint
    if name not in FIXTURES:
        pytest.fail(f"benchmark suite {name!r} has no fixture writer: add one to tests/benchmark_fixtures.py and "
                    "an entry to FIXTURES in tests/test_benchmark_cli.py")
    suite, (write, units) = SUITES[name], FIXTURES[name]
    monkeypatch.setenv("G2VLM_TRACEBACK", "1")  # a failure shows its traceback, not the one-line user message
    write(tmp_path / "data")
    out = tmp_path / "out"

    assert _benchmark(name, tmp_path / "data", checkpoint, out) == 0
    printed = capsys.readouterr().out
    report = _strict_json((out / "report.json").read_text())
    assert (report["suite"], report["kind"], report["frame_width"]) == (name, suite.kind, 28)
    assert report["units"] == report["units_in_dataset"] == units
    assert report["checkpoint"] == str(checkpoint) and report["columns"] == list(suite.columns)
    label = _check_table(suite, report)
    header = "| | " + " | ".join(suite.columns) + " |"
    markdown = (out / "report.md").read_text()
    assert header in markdown.splitlines() and f"| {label} |" in markdown
    assert header in printed and str(out / "report.json") in printed  # the table the user sees
    assert len(list((out / "units").glob("*.json"))) == units

    unit_files, report_text = _files(out / "units"), (out / "report.json").read_text()
    monkeypatch.setattr(suite, "evaluate", lambda *a: pytest.fail(f"{name}: the second run evaluated unit {a[-1]}"))
    assert _benchmark(name, tmp_path / "data", checkpoint, out) == 0
    assert _files(out / "units") == unit_files  # not rewritten
    assert (out / "report.json").read_text() == report_text
    assert runner.report_markdown(report) == (out / "report.md").read_text()
