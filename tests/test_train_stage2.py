"""Stage 2 end to end: CE on synthetic spatial QA falls, then the spatial-QA evaluator reports.

Also checks the evaluator's bookkeeping on hand-made records (`score_report`).
"""
import json
import pathlib

import numpy as np
import pytest

from data_pipelines.synthetic import spatial_qa as qa_generator
from g2vlm_jax import cli
from g2vlm_jax import config as C
from g2vlm_jax import evaluation
from g2vlm_jax.evaluation import spatial_qa
from g2vlm_jax.training import loop

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def qa_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("qa")
    cfg = C.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:qa_test"), [f"workdir={workdir}"])
    return cfg, loop.train(cfg, evaluate=evaluation.training_hook(cfg))  # as `g2vlm train` runs it


def test_stage2_ce_falls_without_geometry_loss(qa_run):
    cfg, result = qa_run
    rows = [json.loads(line) for line in (result.workdir / "metrics.jsonl").read_text().splitlines()]
    ce = {r["step"]: r["ce"] for r in rows if r["kind"] == "train"}
    assert sorted(ce) == list(range(1, 17))
    first, last = np.mean([ce[s] for s in (1, 2, 3)]), np.mean([ce[s] for s in (14, 15, 16)])
    # Chance level is ln(512) = 6.24 nats; the answer format is learnt within a few steps.
    assert first > 5.0 and last < first - 1.0, (first, last)
    assert all(r.get("vg", 0.0) == 0.0 for r in rows if r["kind"] == "train")


def test_spatial_qa_report_and_eval_command(qa_run):
    cfg, result = qa_run
    report = result.eval_report["spatial_qa"]
    per_task = report["per_task"]
    # Every task family of the generator, up to eval.qa_per_task (2) questions each, with its baseline.
    assert set(per_task) == set(qa_generator.TASKS)
    assert all(1 <= t["count"] <= cfg.eval.qa_per_task == 2 for t in per_task.values())
    assert report["num_questions"] == sum(t["count"] for t in per_task.values())
    assert 0.0 <= report["overall"] <= 1.0 and 0.0 <= report["overall_baseline"] <= 1.0
    assert all(0.0 <= t["baseline"] <= 1.0 and t["baseline_answer"] for t in per_task.values())
    answers = [json.loads(line) for line in (result.workdir / "eval" / "spatial_qa_answers_step16.jsonl")
               .read_text().splitlines()]
    assert len(answers) == report["num_questions"]
    for ex in answers:  # the geometric families also carry the geometry read-out's answer
        readout = {"readout_answer", "readout_score"} if ex["task"] in qa_generator.GEOMETRY_TASKS else set()
        assert set(ex) == {"task", "answer_type", "question", "answer", "prediction", "score", "baseline_answer",
                           "baseline_score"} | readout
    # `g2vlm eval` on the checkpoint reproduces the same report (greedy decoding is deterministic).
    assert cli.main(["eval", "--experiment", str(ROOT / "experiments/tiny_synthetic.py:qa_test"),
                     "--set", f"workdir={result.workdir}", "--checkpoint", str(result.workdir)]) == 0
    again = json.loads((result.workdir / "eval" / "report.json").read_text())["spatial_qa"]
    assert again["overall"] == pytest.approx(report["overall"], abs=1e-6)
    assert again["readout_scale"] == pytest.approx(report["readout_scale"])
    assert [e["prediction"] for e in again["examples"]] == [e["prediction"] for e in report["examples"]]
    assert (result.workdir / "eval" / "qa_accuracy.png").stat().st_size > 1000


def test_score_report_bookkeeping():
    records = [{"task": "distance", "answer_type": "numeric", "score": 0.5, "prediction": "2.1"},
               {"task": "distance", "answer_type": "numeric", "score": 1.0, "prediction": "3.4"},
               {"task": "closer", "answer_type": "choice", "score": 0.0, "prediction": "B"}]
    report = spatial_qa.score_report(records)
    assert report["overall"] == pytest.approx(0.5)
    assert report["per_task"] == {"closer": {"score": 0.0, "count": 1, "metric": "accuracy", "distinct_predictions": 1},
                                  "distance": {"score": 0.75, "count": 2, "metric": "MRA", "distinct_predictions": 2}}
    assert report["per_answer_type"] == {"choice": 0.0, "numeric": 0.75}
    assert "overall_baseline" not in report
    with_baseline = [{**r, "baseline_answer": "X", "baseline_score": b} for r, b in zip(records, (0.25, 0.75, 1.0))]
    report = spatial_qa.score_report(with_baseline)
    assert report["overall_baseline"] == pytest.approx(2 / 3)
    assert report["per_task"]["distance"]["baseline"] == pytest.approx(0.5)
    assert report["per_task"]["closer"] == {"score": 0.0, "count": 1, "metric": "accuracy", "baseline": 1.0,
                                            "baseline_answer": "X", "distinct_predictions": 1}
    with pytest.raises(ValueError, match="no questions"):
        spatial_qa.score_report([])


def test_spatial_qa_needs_a_qa_source():
    cfg = C.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:test"))
    with pytest.raises(ValueError, match="needs an eval source of kind"):
        spatial_qa.eval_questions(cfg, 2)
