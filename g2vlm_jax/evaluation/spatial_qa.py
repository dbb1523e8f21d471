"""The `spatial_qa` evaluator: generate answers to held-out questions and score them (SPEC 5).

Questions come from the experiment's `data.eval_sources` that carry QA (kinds 'recon_qa' and
'vqa'), split `data.eval_split`: up to `eval.qa_per_task` questions of every task family, taken
in scene order (deterministic), each with views sampled without augmentation from the evaluation
bucket and the semantic image built exactly as for training (`pipeline.qa_inputs`). Answers are
generated greedily with the KV cache (inference/generate.py), `eval.qa_batch_size` questions at a
time, and scored by `metrics.vqa.score_answer`: MRA for numeric answers, exact option letter for
multiple choice.

Beside each family's score stands its trivial baseline, computed from the training split of the
same sources and scored on the same held-out questions: the best constant answer of the training
split (for numeric families the number with the highest mean MRA over the training answers, for
choice families the most frequent correct letter). No answer that ignores the images does better
on the training distribution, so a model that beats it uses the images; one that matches it has
learnt the answer distribution only.

Report:
    num_questions, overall (mean score), overall_baseline,
    per_task {task: {score, baseline, baseline_answer, metric, count}},
    per_answer_type {numeric: MRA, choice: accuracy}, examples [{task, question, answer, prediction, score}]
"""
from __future__ import annotations

import collections
import functools
import pathlib

import numpy as np
from absl import logging

from data_pipelines import pipeline
from g2vlm_jax import config as config_lib
from g2vlm_jax.inference import generate as gen
from g2vlm_jax.metrics import vqa as vqa_metrics
from g2vlm_jax.tokenizer import load_tokenizer

QA_KINDS = ("recon_qa", "vqa")
NUM_EXAMPLES = 8  # question/answer/prediction triples kept in the report


def _qa_sources(data: config_lib.DataConfig):
    sources = [s for s in data.eval_sources if s.kind in QA_KINDS]
    if not sources:
        raise ValueError(f"evaluator 'spatial_qa' needs an eval source of kind {list(QA_KINDS)}; "
                         f"data.eval_sources has kinds {[s.kind for s in data.eval_sources]}")
    return sources


def eval_questions(cfg: config_lib.ExperimentConfig, per_task: int) -> list[tuple[gen.Prompt, object]]:
    """(prompt, QAPair) of up to `per_task` held-out questions of every task family (deterministic:
    scenes in order, each scene's questions in order), families interleaved."""
    d = cfg.data
    bucket = pipeline.eval_bucket(d)
    by_task: dict[str, list] = collections.defaultdict(list)
    for k, source in enumerate(_qa_sources(d)):
        scenes = pipeline.open_source(source, d, d.eval_split, cfg.run_dir)
        for i in range(len(scenes)):
            scene = scenes[i]
            for j, qa in enumerate(scene.qa):
                if len(by_task[qa.task]) < per_task:
                    by_task[qa.task].append((k, source, i, j, scene, qa))
    if not by_task:
        raise ValueError(f"the eval sources {[s.name for s in _qa_sources(d)]} ({d.eval_split}) hold no questions; "
                         "the spatial_qa evaluator needs QA scenes in every eval source of kind recon_qa/vqa")
    out = []
    for rank in range(per_task):  # interleave: the first question of every family, then the second, ...
        for task in sorted(by_task):
            if rank >= len(by_task[task]):
                continue
            k, source, i, j, scene, qa = by_task[task][rank]
            rng = np.random.default_rng([10_000 + d.seed, k, i, j])
            view_sample, sem = pipeline.qa_inputs(scene, qa, bucket, d.vit_image_size, rng, augment=False)
            geo = view_sample.images if source.kind == "recon_qa" else np.zeros((0, 14, 14, 3), np.float32)
            out.append((gen.Prompt(qa.question, geo, sem[None]), qa))
    return out


def baseline_answers(cfg: config_lib.ExperimentConfig) -> dict[str, str]:
    """task -> the trivial answer learnt from the training split of the eval sources: the best constant
    number of a numeric family (`vqa.best_constant_number`, 2 decimals), the most frequent correct
    letter of a choice family.

    Read from the first BASELINE_SCENES scenes of each source (a large split would otherwise be read
    whole at every evaluation), once per data config and run directory.
    """
    return _baseline_answers(cfg.data, cfg.run_dir)


BASELINE_SCENES = 2000


@functools.lru_cache(maxsize=8)
def _baseline_answers(data: config_lib.DataConfig, run_dir: pathlib.Path) -> dict[str, str]:
    answers: dict[str, list] = collections.defaultdict(list)
    kinds: dict[str, str] = {}
    for source in _qa_sources(data):
        scenes = pipeline.open_source(source, data, "train", run_dir)
        for i in range(min(len(scenes), BASELINE_SCENES)):
            for qa in scenes[i].qa:
                answers[qa.task].append(qa.answer)
                kinds[qa.task] = qa.answer_type
    out = {}
    for task, values in answers.items():
        if kinds[task] == "numeric":
            out[task] = f"{vqa_metrics.best_constant_number([vqa_metrics.extract_number(v) for v in values]):.2f}"
        else:
            out[task] = collections.Counter(values).most_common(1)[0][0]
    return out


def score_report(records: list[dict]) -> dict:
    """records: [{task, answer_type, score, baseline_score?, ...}] -> the report of the module docstring."""
    if not records:
        raise ValueError("spatial_qa: no questions were evaluated")
    per_task: dict = collections.defaultdict(list)
    per_type: dict = collections.defaultdict(list)
    for r in records:
        per_task[r["task"]].append(r)
        per_type[r["answer_type"]].append(r["score"])
    metric = {"numeric": "MRA", "choice": "accuracy"}
    report = {
        "num_questions": len(records),
        "overall": float(np.mean([r["score"] for r in records])),
        "per_task": {t: {"score": float(np.mean([r["score"] for r in rs])), "count": len(rs),
                         "metric": metric[rs[0]["answer_type"]],
                         # 1 = the same answer to every question: a prior learnt from the text, not the images
                         "distinct_predictions": len({r.get("prediction") for r in rs})}
                     for t, rs in sorted(per_task.items())},
        "per_answer_type": {t: float(np.mean(s)) for t, s in sorted(per_type.items())},
        "examples": records[:NUM_EXAMPLES],
    }
    if all("baseline_score" in r for r in records):
        report["overall_baseline"] = float(np.mean([r["baseline_score"] for r in records]))
        for t, rs in per_task.items():
            report["per_task"][t].update(baseline=float(np.mean([r["baseline_score"] for r in rs])),
                                         baseline_answer=rs[0]["baseline_answer"])
    return report


def run_spatial_qa(spec, cfg: config_lib.ExperimentConfig, state, *, num_batches: int) -> tuple[dict, list[dict]]:
    """Answers up to `eval.qa_per_task` held-out questions per task family with the model of `state`
    (`num_batches` is the reconstruction evaluator's; unused here).

    Returns (report, one record per question: task, question, answer, prediction, score, baseline).
    """
    tok = load_tokenizer(cfg.data.tokenizer)
    model = spec.model(state)
    questions = eval_questions(cfg, cfg.eval.qa_per_task)
    baselines = baseline_answers(cfg)
    records = []
    step = cfg.eval.qa_batch_size
    for start in range(0, len(questions), step):
        chunk = questions[start:start + step]
        result = gen.generate(model, tok, [p for p, _ in chunk], max_new_tokens=cfg.eval.max_new_tokens,
                              preset=cfg.mesh.preset)
        for (prompt, qa), text in zip(chunk, result.texts):
            num_choices = len(qa.choices) or 26
            score = vqa_metrics.score_answer(text, qa.answer, qa.answer_type, num_choices=num_choices)
            record = {"task": qa.task, "answer_type": qa.answer_type, "question": qa.question,
                      "answer": qa.answer, "prediction": text, "score": float(score)}
            if qa.task in baselines:
                record.update(baseline_answer=baselines[qa.task], baseline_score=float(vqa_metrics.score_answer(
                    baselines[qa.task], qa.answer, qa.answer_type, num_choices=num_choices)))
            records.append(record)
    report = score_report(records)
    _warn_constant_answers(report, records)
    return report, records


def _warn_constant_answers(report: dict, records: list[dict]) -> None:
    """One warning naming the families whose questions (5 or more) all got the same answer: their score then
    measures the text prior, not whether the model looks at the images."""
    constant = {task: next(r["prediction"] for r in records if r["task"] == task)
                for task, values in report["per_task"].items()
                if values["count"] >= 5 and values["distinct_predictions"] == 1}
    if constant:
        logging.warning("spatial_qa: one answer to every question of %d of %d families (%s): the model answers them "
                        "from the question text, not from the images (train on more scenes / for longer)",
                        len(constant), len(report["per_task"]),
                        ", ".join(f"{task}: {answer[:12]!r}" for task, answer in constant.items()))
