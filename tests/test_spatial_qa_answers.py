"""The semantic expert learns to answer: `g2vlm train --experiment experiments/tiny_synthetic.py:qa` (the
README's QA command) ends with a spatial-QA report whose answers are real answers.

Before the chat layout fed `\\n` after the assistant turn (SPEC 4), the trained model answered every
question with an empty string while its CE fell; this test reads what a user reads: every prediction
of `eval/spatial_qa_answers_step300.jsonl` is non-empty and parses as its family's type (a number for
numeric families, an option letter for choice families), and every family has its baseline beside it.
"""
import json
import os
import pathlib
import subprocess
import sys

from g2vlm_jax.metrics import vqa

ROOT = pathlib.Path(__file__).resolve().parents[1]
FAMILIES = {"distance", "depth", "closer", "count", "direction", "camera_motion"}


def test_qa_experiment_answers_every_question_in_its_type(tmp_path):
    workdir = tmp_path / "qa"
    cmd = [sys.executable, "-m", "g2vlm_jax.cli", "train", "--experiment", "experiments/tiny_synthetic.py:qa",
           "--set", f"workdir={workdir}", "--set", "eval.every_steps=0", "--set", "eval.qa_per_task=8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                          timeout=800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((workdir / "eval" / "report.json").read_text())["spatial_qa"]
    assert set(report["per_task"]) == FAMILIES
    assert all(t["count"] == 8 and "baseline" in t for t in report["per_task"].values())
    answers = [json.loads(line) for line in (workdir / "eval" / "spatial_qa_answers_step300.jsonl").read_text()
               .splitlines()]
    assert len(answers) == 48
    for a in answers:
        assert a["prediction"], a
        if a["answer_type"] == "numeric":
            assert vqa.extract_number(a["prediction"]) is not None, a
        else:
            assert vqa.extract_choice(a["prediction"], 4) is not None, a
    # The README's QA run starts from no stage-1 run: its geometry tokens are blank, and it says so once.
    assert proc.stderr.count("the geometry tokens carry no image") == 1, proc.stderr[-2000:]
    # A family answered with one constant answer is named in a warning (the score is then the text prior's).
    for task, values in report["per_task"].items():
        named = f"{task}: '" in proc.stderr
        assert named == (values["distinct_predictions"] == 1), (task, values, proc.stderr[-2000:])
    # The baselines are the strongest constants: on the training split no answer the model gave, repeated for
    # every question of its family, scores higher than the family's baseline answer.
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
