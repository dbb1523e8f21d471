"""The `spatial_qa` evaluator: generate answers to held-out questions and score them (SPEC 5).

Questions come from the experiment's `data.eval_sources` that carry QA (kinds 'recon_qa' and
'vqa'), split `data.eval_split`. Question i is a fixed function of (seed, i): scene i mod #scenes,
its (i div #scenes)-th question, views sampled without augmentation from the largest view bucket,
the semantic image built exactly as for training (`pipeline.qa_inputs`). Answers are generated
greedily with the KV cache (inference/generate.py) and scored by `metrics.vqa.score_answer`:
MRA for numeric answers, exact option letter for multiple choice.

Report:
    num_questions, overall (mean score), per_task {task: {score, metric, count}},
    per_answer_type {numeric: MRA, choice: accuracy}, examples [{question, answer, prediction, score}]
"""
from __future__ import annotations

import collections

import numpy as np

from data_pipelines import pipeline
from g2vlm_jax import config as config_lib
from g2vlm_jax.inference import generate as gen
from g2vlm_jax.metrics import vqa as vqa_metrics
from g2vlm_jax.tokenizer import load_tokenizer

QA_KINDS = ("recon_qa", "vqa")
NUM_EXAMPLES = 8  # question/answer/prediction triples kept in the report


def eval_questions(cfg: config_lib.ExperimentConfig, num_questions: int) -> list[tuple[gen.Prompt, object]]:
    """(prompt, QAPair) of the first `num_questions` held-out questions (deterministic)."""
    d = cfg.data
    sources = [s for s in d.eval_sources if s.kind in QA_KINDS]
    if not sources:
        raise ValueError(f"evaluator 'spatial_qa' needs an eval source of kind {list(QA_KINDS)}; "
                         f"data.eval_sources has kinds {[s.kind for s in d.eval_sources]}")
    bucket = pipeline.eval_bucket(d)
    out = []
    for k, source in enumerate(sources):
        scenes = pipeline.open_source(source, d, d.eval_split, cfg.run_dir)
        share = num_questions // len(sources) + (k < num_questions % len(sources))
        for i in range(share):
            scene = scenes[i % len(scenes)]
            if not scene.qa:
                raise ValueError(f"{source.name}[{i % len(scenes)}] ({d.eval_split}) has no questions; "
                                 "the spatial_qa evaluator needs QA scenes in every eval source of kind recon_qa/vqa")
            qa = scene.qa[(i // len(scenes)) % len(scene.qa)]
            rng = np.random.default_rng([10_000 + d.seed, k, i])
            view_sample, sem = pipeline.qa_inputs(scene, qa, bucket, d.vit_image_size, rng, augment=False)
            geo = view_sample.images if source.kind == "recon_qa" else np.zeros((0, 14, 14, 3), np.float32)
            out.append((gen.Prompt(qa.question, geo, sem[None]), qa))
    return out


def score_report(records: list[dict]) -> dict:
    """records: [{task, answer_type, score, ...}] -> the report of the module docstring."""
    if not records:
        raise ValueError("spatial_qa: no questions were evaluated")
    per_task: dict = collections.defaultdict(list)
    per_type: dict = collections.defaultdict(list)
    for r in records:
        per_task[r["task"]].append(r)
        per_type[r["answer_type"]].append(r["score"])
    metric = {"numeric": "MRA", "choice": "accuracy"}
    return {
        "num_questions": len(records),
        "overall": float(np.mean([r["score"] for r in records])),
        "per_task": {t: {"score": float(np.mean([r["score"] for r in rs])), "count": len(rs),
                         "metric": metric[rs[0]["answer_type"]]} for t, rs in sorted(per_task.items())},
        "per_answer_type": {t: float(np.mean(s)) for t, s in sorted(per_type.items())},
        "examples": records[:NUM_EXAMPLES],
    }


def run_spatial_qa(spec, cfg: config_lib.ExperimentConfig, state, *, num_batches: int) -> tuple[dict, list[dict]]:
    """Answers `num_batches * data.packs_per_step` held-out questions with the model of `state`.

    Returns (report, one record per question: task, question, answer, prediction, score).
    """
    tok = load_tokenizer(cfg.data.tokenizer)
    model = spec.model(state)
    questions = eval_questions(cfg, num_batches * cfg.data.packs_per_step)
    records = []
    step = cfg.data.packs_per_step
    for start in range(0, len(questions), step):
        chunk = questions[start:start + step]
        result = gen.generate(model, tok, [p for p, _ in chunk], max_new_tokens=cfg.eval.max_new_tokens,
                              preset=cfg.mesh.preset)
        for (prompt, qa), text in zip(chunk, result.texts):
            num_choices = len(qa.choices) or 26
            score = vqa_metrics.score_answer(text, qa.answer, qa.answer_type, num_choices=num_choices)
            records.append({"task": qa.task, "answer_type": qa.answer_type, "question": qa.question,
                            "answer": qa.answer, "prediction": text, "score": float(score)})
    return score_report(records), records
