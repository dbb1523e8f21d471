"""The semantic expert learns to answer: the README's QA commands (stage-1 run -> `g2vlm export` ->
`g2vlm train --experiment experiments/tiny_synthetic.py:qa --set checkpoint.init_from=EXPORT`) end with a
spatial-QA report whose answers are real answers, and, run in full, answers from the images.

Before the chat layout fed `\\n` after the assistant turn (SPEC 4), the trained model answered every
question with an empty string while its CE fell; these tests read what a user reads: every prediction
of `eval/spatial_qa_answers_step<N>.jsonl` is non-empty and parses as its family's type (a number for
numeric families, an option letter for choice families), and every family has its baseline beside it.
The fast test shortens the runs (steps, held-out questions); `test_readme_qa_recipe_beats_the_baselines`
(marked slow: 38 min on 2 cores, `pytest -m slow tests/test_spatial_qa_answers.py`) runs the README's
commands unchanged and checks the scores the README states.
"""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from g2vlm_jax.metrics import vqa

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = {"distance", "depth", "closer", "count", "direction", "camera_motion", "marker_row", "marker_lower"}


def _g2vlm(*args, timeout):
    proc = subprocess.run([sys.executable, "-m", "g2vlm_jax.cli", *args], cwd=ROOT,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (args, proc.stderr[-3000:])
    return proc


def _readme_qa_chain(tmp_path, stage1_sets=(), qa_sets=(), timeout=900):
    """The README's three QA commands, with `--set` additions; returns (QA run dir, its stderr)."""
    stage1, export, qa = tmp_path / "tiny_synthetic", tmp_path / "tiny_synthetic_export", tmp_path / "qa"
    _g2vlm("train", "--experiment", "experiments/tiny_synthetic.py", "--set", f"workdir={stage1}",
           *[a for s in stage1_sets for a in ("--set", s)], timeout=timeout)
    _g2vlm("export", "--checkpoint", str(stage1), "--out", str(export), timeout=300)
    proc = _g2vlm("train", "--experiment", "experiments/tiny_synthetic.py:qa", "--set", f"workdir={qa}",
                  "--set", f"checkpoint.init_from={export}", *[a for s in qa_sets for a in ("--set", s)],
                  timeout=timeout * 4)
    return qa, proc.stderr


def _answers(workdir, step):
    report = json.loads((workdir / "eval" / "report.json").read_text())["spatial_qa"]
    answers = [json.loads(line) for line in (workdir / "eval" / f"spatial_qa_answers_step{step}.jsonl").read_text()
               .splitlines()]
    return report, answers


def test_qa_experiment_answers_every_question_in_its_type(tmp_path):
    workdir, stderr = _readme_qa_chain(
        tmp_path,
        stage1_sets=("optim.total_steps=10", "optim.warmup_steps=2", "eval.every_steps=0", "eval.num_batches=1"),
        qa_sets=("optim.total_steps=120", "eval.every_steps=0", "eval.qa_per_task=8"))
    report, answers = _answers(workdir, 120)
    assert set(report["per_task"]) == FAMILIES
    assert all(t["count"] == 8 and "baseline" in t for t in report["per_task"].values())
    assert len(answers) == 8 * len(FAMILIES)
    # Beside the answers, the geometry read-out: the generator's rule on the model's own reconstruction, for the
    # families the geometry answers, with one metres-per-unit scale per length family fitted on training questions.
    readout = {t for t, v in report["per_task"].items() if "geometry_readout" in v}
    assert readout == {"distance", "depth", "closer", "direction", "camera_motion"}, report["per_task"]
    assert set(report["readout_scale"]) == {"depth", "distance"} and min(report["readout_scale"].values()) > 0
    for a in answers:
        if a["task"] in readout:
            assert vqa.score_answer(a["readout_answer"], a["answer"], a["answer_type"], num_choices=4) == \
                a["readout_score"], a
        assert a["prediction"], a
        if a["answer_type"] == "numeric":
            assert vqa.extract_number(a["prediction"]) is not None, a
        else:
            assert vqa.extract_choice(a["prediction"], 4) is not None, a
    # Started from the stage-1 export, the geometry tokens carry the image (no 'blank tokens' warning).
    assert "the geometry tokens carry no image" not in stderr
    # A family answered with one constant answer is named in a warning (the score is then the text prior's).
    for task, values in report["per_task"].items():
        named = f"{task}: '" in stderr
        assert named == (values["distinct_predictions"] == 1), (task, values, stderr[-2000:])
    # The baselines are the strongest constants: on the training split no answer the model gave, repeated for
    # every question of its family, scores higher than the family's baseline answer.
    _assert_baselines_beat_every_constant(workdir, answers)


@pytest.mark.slow
@pytest.mark.timeout(4 * 3600)
def test_readme_qa_recipe_beats_the_baselines(tmp_path):
    """The README's QA commands, unchanged: on the held-out split (200 questions a family) the model reads the
    images. `marker_row` (only the marked pixel's position answers it) and `closer` (comparing two marked points)
    beat their baselines, and even the best constant answer chosen on the held-out questions themselves, by 0.04
    or more; `depth` beats them with answers that vary with the image; the geometry read-out beats the best
    constant by 0.08 or more on every geometric family. Measured (seed 0; AVX2 / AVX-512 machines): marker_row
    0.71 / 0.57 vs 0.41, closer 0.57 / 0.56 vs 0.505, depth MRA 0.445 / 0.441 vs 0.422 with r = 0.32 / 0.39;
    seeds 1 and 2 (AVX-512): closer 0.62 / 0.57, marker_row 0.60 / 0.65. Read-out (AVX2): direction 0.92 vs 0.295,
    closer 0.845, depth 0.603 vs 0.422, distance 0.531 vs 0.41, camera_motion 0.59 vs 0.41."""
    import numpy as np

    workdir, _ = _readme_qa_chain(tmp_path, timeout=1800)
    report, answers = _answers(workdir, 1500)

    def best_constant(family):
        candidates = "ABCD" if family[0]["answer_type"] == "choice" else {a["answer"] for a in family}
        return max(np.mean([vqa.score_answer(c, a["answer"], a["answer_type"], num_choices=4) for a in family])
                   for c in candidates)

    for task, margin, min_distinct in (("marker_row", 0.04, 2), ("closer", 0.04, 2), ("depth", 0.01, 5)):
        values, family = report["per_task"][task], [a for a in answers if a["task"] == task]
        assert values["count"] == len(family) == 200
        assert values["score"] >= max(values["baseline"], best_constant(family)) + margin, (task, values)
        assert len({a["prediction"] for a in family}) >= min_distinct, (task, values)
    depth = [a for a in answers if a["task"] == "depth"]
    truth, said = (np.array([float(vqa.extract_number(a[k])) for a in depth]) for k in ("answer", "prediction"))
    assert np.corrcoef(truth, said)[0, 1] > 0.25  # the answers follow the scene, not only their mean
    for task in ("distance", "depth", "closer", "direction", "camera_motion"):
        values = report["per_task"][task]
        assert values["geometry_readout"] >= best_constant([a for a in answers if a["task"] == task]) + 0.08, values
    _assert_baselines_beat_every_constant(workdir, answers)


def _assert_baselines_beat_every_constant(workdir, answers):
    from data_pipelines import pipeline
    from g2vlm_jax import config as config_lib

    cfg = config_lib.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:qa"), [f"workdir={workdir}"])
    scenes = pipeline.open_source(cfg.data.eval_sources[0], cfg.data, "train", workdir)
    train = [qa for i in range(len(scenes)) for qa in scenes[i].qa]
    for task in FAMILIES:
        family = [qa for qa in train if qa.task == task]
        given = {a["prediction"] for a in answers if a["task"] == task}
        baseline = {a["baseline_answer"] for a in answers if a["task"] == task}
        assert len(baseline) == 1, (task, baseline)

        def train_score(answer):
            return sum(vqa.score_answer(answer, qa.answer, qa.answer_type, num_choices=max(len(qa.choices), 1))
                       for qa in family) / len(family)

        best = train_score(baseline.pop())
        assert all(train_score(p) <= best + 1e-9 for p in given), (task, given, best)


def test_blank_geometry_tokens_are_named_once(caplog):
    """A stage-2 QA run whose dino2llm is still all zero (no stage-1 start) is told that its geometry tokens
    carry no image; with a trained dino2llm, or in a stage that trains it, nothing is said."""
    from flax import nnx

    from g2vlm_jax import config as config_lib
    from g2vlm_jax import sharding as sharding_lib
    from g2vlm_jax.core import optim
    from g2vlm_jax.core import state as state_lib
    from g2vlm_jax.training import loop

    cfg = config_lib.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:qa_test"), [])
    spec, state, _ = state_lib.create_train_state(cfg, sharding_lib.make_mesh(cfg.mesh))
    message = "the geometry tokens carry no image"
    with caplog.at_level("WARNING"):
        loop._warn_if_geometry_tokens_are_blank(spec, state, cfg)
    assert caplog.text.count(message) == 1 and "optim.stage='stage2'" in caplog.text
    caplog.clear()
    model = spec.model(state)
    model.dino2llm.kernel[...] = model.dino2llm.kernel[...] + 0.01  # as after stage 1
    _, trainable, frozen = nnx.split(model, nnx.All(nnx.Param, optim.is_trainable(cfg)), ...)
    trained = state.replace(trainable=trainable, frozen=frozen)
    with caplog.at_level("WARNING"):
        loop._warn_if_geometry_tokens_are_blank(spec, trained, cfg)
    assert message not in caplog.text
    trains_it = config_lib.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:qa_test"),
                                           ["optim.stage=stage2_sr", "model.freeze_recon=false"])  # trains dino2llm
    with caplog.at_level("WARNING"):
        loop._warn_if_geometry_tokens_are_blank(spec, state, trains_it)
    assert message not in caplog.text
