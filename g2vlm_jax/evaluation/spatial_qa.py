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

On the other side stands the geometry read-out, for the synthetic generator's geometric families (distance,
depth, closer, direction, camera_motion): the generator's own answer rule applied to the model's reconstruction
of the question's frames (the prefill's point maps read at the marked pixels, its camera poses), with one
metres-per-unit scale per length family fitted on the training split (`readout_scales`). It is what the
geometry expert in the semantic expert's context knows: a family where the read-out beats the baseline and the
answers do not is one the semantic expert fails to read; one where the read-out does not is beyond this model's
reconstruction.

Report:
    num_questions, overall (mean score), overall_baseline, readout_scale {depth, distance: metres per unit},
    per_task {task: {score, baseline, baseline_answer, geometry_readout, metric, count, distinct_predictions}},
    per_answer_type {numeric: MRA, choice: accuracy}, examples [{task, question, answer, prediction, score}]
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import pathlib

import numpy as np
from absl import logging

from data_pipelines import pipeline
from data_pipelines.scene import QAPair
from data_pipelines.synthetic import spatial_qa as qa_generator
from g2vlm_jax import config as config_lib
from g2vlm_jax import geometry as geometry_lib
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


@dataclasses.dataclass(frozen=True)
class EvalQuestion:
    """One held-out question as the evaluator poses it."""

    prompt: gen.Prompt
    qa: QAPair
    # qa.markers as (frame, u, v, label) in the pixels of the geometry frames (frame = index in prompt.geo_images)
    markers: tuple[tuple[int, float, float, str], ...]
    synthetic: bool  # written by the synthetic generator, whose answer rules the geometry read-out applies


def _frame_markers(scene, qa, view_sample) -> tuple[tuple[int, float, float, str], ...]:
    """qa.markers mapped from the scene's pixels into the cropped and resized geometry frames (K_out K_in^-1)."""
    out = []
    for view, u, v, label in qa.markers:
        if view not in view_sample.frames:
            continue
        frame = view_sample.frames.index(view)
        uvw = view_sample.intrinsics[frame].astype(np.float64) @ np.linalg.solve(
            scene.intrinsics[view].astype(np.float64), np.array([u, v, 1.0]))
        out.append((frame, float(uvw[0]), float(uvw[1]), label))
    return tuple(out)


def eval_questions(cfg: config_lib.ExperimentConfig, per_task: int, *, split: str | None = None,
                   tasks: tuple[str, ...] | None = None) -> list[EvalQuestion]:
    """Up to `per_task` questions of every task family (or of `tasks`) of `split` (default: the held-out
    `data.eval_split`), deterministic (scenes in order, each scene's questions in order), families interleaved."""
    d = cfg.data
    split = split or d.eval_split
    bucket = pipeline.eval_bucket(d)
    by_task: dict[str, list] = collections.defaultdict(list)
    for k, source in enumerate(_qa_sources(d)):
        scenes = pipeline.open_source(source, d, split, cfg.run_dir)
        for i in range(len(scenes)):
            scene = scenes[i]
            for j, qa in enumerate(scene.qa):
                if len(by_task[qa.task]) < per_task and (tasks is None or qa.task in tasks):
                    by_task[qa.task].append((k, source, i, j, scene, qa))
    if not by_task and tasks is None:  # a request for some families only may find none
        raise ValueError(f"the eval sources {[s.name for s in _qa_sources(d)]} ({split}) hold no questions; "
                         "the spatial_qa evaluator needs QA scenes in every eval source of kind recon_qa/vqa")
    out = []
    for rank in range(per_task):  # interleave: the first question of every family, then the second, ...
        for task in sorted(by_task):
            if rank >= len(by_task[task]):
                continue
            k, source, i, j, scene, qa = by_task[task][rank]
            rng = np.random.default_rng([10_000 + d.seed, k, i, j])
            view_sample, sem = pipeline.qa_inputs(scene, qa, bucket, d.vit_image_size, rng, augment=False)
            recon = source.kind == "recon_qa"
            geo = view_sample.images if recon else np.zeros((0, 14, 14, 3), np.float32)
            out.append(EvalQuestion(gen.Prompt(qa.question, geo, sem[None]), qa,
                                    _frame_markers(scene, qa, view_sample) if recon else (),
                                    recon and scene.dataset == "synthetic_qa"))
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
    for t, rs in per_task.items():
        if all("readout_score" in r for r in rs):
            report["per_task"][t]["geometry_readout"] = float(np.mean([r["readout_score"] for r in rs]))
    return report


def _readable(q: EvalQuestion) -> bool:
    """Whether the geometry read-out answers q: a synthetic question (always with its frames) of a geometric family."""
    return q.synthetic and q.qa.task in qa_generator.GEOMETRY_TASKS


def _marked_points(geometry: dict, row: int, q: EvalQuestion) -> tuple[dict[str, np.ndarray], tuple | None]:
    """The model's geometry of generation row `row` (the prefill's local_points [B, 1, V, H, W, 3] and
    camera_poses [B, 1, V, 4, 4]) read at q's marked pixels: ({label: float64[3] in frame 0's camera frame},
    (centre, yaw) of frame 1's camera in frame 0's, or None with one frame)."""
    local = np.asarray(geometry["local_points"][row, 0], np.float64)
    c2w = np.asarray(geometry["camera_poses"][row, 0], np.float64)
    h, w = local.shape[1:3]
    marked = {}
    for frame, u, v, label in q.markers:
        point = local[frame, min(max(round(v), 0), h - 1), min(max(round(u), 0), w - 1)]
        marked[label] = qa_generator.camera_coords(c2w[0], geometry_lib.transform_points(c2w[frame], point))
    motion = qa_generator.relative_motion(c2w[0], c2w[1]) if len(c2w) > 1 else None
    return marked, motion


READOUT_FIT_QUESTIONS = 100  # training questions per length family that fix the read-out's metres per unit


def readout_scales(model, tok, cfg: config_lib.ExperimentConfig, tasks: tuple[str, ...]) -> dict[str, float]:
    """Metres per unit of the model's geometry for the length families `tasks` (depth, distance): the median of
    truth / read-out over the first READOUT_FIT_QUESTIONS training questions of each. The geometry is trained up
    to scale (SPEC 2.1), so the read-out, like the baseline, learns one number per family from the training
    split; a family the training split does not ask gets none (and no read-out)."""
    questions = [q for q in eval_questions(cfg, READOUT_FIT_QUESTIONS, split="train", tasks=tasks) if _readable(q)]
    ratios: dict[str, list] = collections.defaultdict(list)
    for start in range(0, len(questions), cfg.eval.qa_batch_size):
        chunk = questions[start:start + cfg.eval.qa_batch_size]
        result = gen.generate(model, tok, [q.prompt for q in chunk], max_new_tokens=1, preset=cfg.mesh.preset)
        for row, q in enumerate(chunk):
            length = qa_generator.length_from_geometry(q.qa, _marked_points(result.geometry, row, q)[0])
            if length > 1e-6:
                ratios[q.qa.task].append(float(q.qa.answer) / length)
    return {task: float(np.median(values)) for task, values in ratios.items()}


def run_spatial_qa(spec, cfg: config_lib.ExperimentConfig, state, *, num_batches: int) -> tuple[dict, list[dict]]:
    """Answers up to `eval.qa_per_task` held-out questions per task family with the model of `state`
    (`num_batches` is the reconstruction evaluator's; unused here).

    Returns (report, one record per question: task, question, answer, prediction, score, baseline, and for the
    synthetic geometric families the geometry read-out: readout_answer, readout_score).
    """
    tok = load_tokenizer(cfg.data.tokenizer)
    model = spec.model(state)
    questions = eval_questions(cfg, cfg.eval.qa_per_task)
    baselines = baseline_answers(cfg)
    lengths = tuple(sorted({q.qa.task for q in questions if _readable(q) and q.qa.task in qa_generator.LENGTH_TASKS}))
    scales = readout_scales(model, tok, cfg, lengths) if lengths else {}
    records = []
    step = cfg.eval.qa_batch_size
    for start in range(0, len(questions), step):
        chunk = questions[start:start + step]
        result = gen.generate(model, tok, [q.prompt for q in chunk], max_new_tokens=cfg.eval.max_new_tokens,
                              preset=cfg.mesh.preset)
        for row, (q, text) in enumerate(zip(chunk, result.texts)):
            qa = q.qa
            num_choices = len(qa.choices) or 26

            def score(answer: str) -> float:
                return float(vqa_metrics.score_answer(answer, qa.answer, qa.answer_type, num_choices=num_choices))

            record = {"task": qa.task, "answer_type": qa.answer_type, "question": qa.question,
                      "answer": qa.answer, "prediction": text, "score": score(text)}
            if qa.task in baselines:
                record.update(baseline_answer=baselines[qa.task], baseline_score=score(baselines[qa.task]))
            # a length family is read out only with its scale (none when the training split has no such question)
            if _readable(q) and (qa.task in scales or qa.task not in qa_generator.LENGTH_TASKS):
                readout = qa_generator.answer_from_geometry(qa, *_marked_points(result.geometry, row, q),
                                                            scale=scales.get(qa.task, 1.0))
                record.update(readout_answer=readout, readout_score=score(readout))
            records.append(record)
    report = score_report(records)
    if scales:
        report["readout_scale"] = scales
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
