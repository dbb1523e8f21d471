"""Spatial-QA benchmarks: VSI-Bench, SPAR-Bench, MindCube and OmniSpatial, read in their released
formats, prompted with their official templates and scored by metrics/vqa.py
(docs/BENCHMARKS.md, "Spatial QA", gives every choice with its source).

Answer parsing: the official lmms-eval scorers of VSI-Bench and SPAR-Bench read only the first
word of an answer ("The answer is B." scores 0 there); a small model that does not follow the
post-prompt exactly is then scored on its formatting, not its answer. Every row therefore holds
`score` (the letter / number the text states, read by `vqa.extract_choice` / `vqa.extract_number`;
identical to the official score whenever the answer follows the post-prompt) and, for VSI-Bench,
`score_official` (the first-word rule as released); the table reports both overalls.
"""
from __future__ import annotations

import json
import pathlib

import numpy as np

from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError, Suite
from g2vlm_jax.evaluation.benchmarks.formats import read_rgb
from g2vlm_jax.evaluation.benchmarks.qa_common import (QASuite, Question, decode_image, inline_option_count,
                                                       read_jsonl_rows, read_parquet_rows,
                                                       require_fields, video_frames)
from g2vlm_jax.metrics import vqa

# Post-prompts of the lmms-eval tasks (thinking-in-space vsibench.yaml, SPAR's sparbench.yaml).
MC_POST_PROMPT = "Answer with the option's letter from the given choices directly."
NA_POST_PROMPT = "Please answer the question using a single word or phrase."


def _letter_or_number_score(q: Question, prediction: str) -> float:
    if q.answer_type == "choice":
        return vqa.score_answer(prediction, q.ground_truth, "choice", num_choices=q.num_choices)
    numbers = vqa.extract_numbers(prediction)
    if not numbers:
        return 0.0
    # SPAR-Bench's multi-view numeric tasks (names ending in _mv) read the last number, all others the first
    pick = numbers[-1] if q.category.endswith("_mv") else numbers[0]
    return vqa.mean_relative_accuracy(pick, float(q.ground_truth))


def _check_letter(path, qid, value, num_choices: int) -> str:
    letter = str(value).strip().upper()
    if len(letter) != 1 or not "A" <= letter <= chr(64 + num_choices):
        raise DatasetLayoutError(f"{path}: multiple-choice question {qid} has answer {value!r}, not an option letter "
                                 f"A-{chr(64 + num_choices)}")
    return letter


def _check_positive_number(path, qid, value) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number) or number <= 0:
        raise DatasetLayoutError(f"{path}: question {qid} is numeric but its answer {value!r} is not a number > 0")
    return str(value)


def _table(rows: list[dict], order: tuple[str, ...], key: str = "score") -> dict[str, float]:
    """Percent mean of `key` per category (categories of `order` that occur, in that order)."""
    out = {}
    for category in order:
        values = [r[key] for r in rows if r["category"] == category]
        if values:
            out[category] = 100.0 * float(np.mean(values))
    return out


# --------------------------------------------------------------------------------------------------
# VSI-Bench
# --------------------------------------------------------------------------------------------------
VSI_CHOICE_TYPES = ("object_rel_direction_easy", "object_rel_direction_medium", "object_rel_direction_hard",
                    "object_rel_distance", "route_planning", "obj_appearance_order")
VSI_NUMERIC_TYPES = ("object_abs_distance", "object_counting", "object_size_estimation", "room_size_estimation")
# The paper's table order; object_rel_direction is the mean of its easy / medium / hard accuracies.
VSI_COLUMNS = ("object_counting", "object_abs_distance", "object_size_estimation", "room_size_estimation",
               "object_rel_distance", "object_rel_direction", "route_planning", "obj_appearance_order")
VSI_OFFICIAL_OVERALL = "Overall (official first-word parser)"
VSI_PRE_PROMPT = "These are frames of a video."
VSI_NUM_FRAMES = 32  # thinking-in-space evaluate_all_in_one.sh num_frames for open-source models


def vsibench_prompt(question: str, question_type: str, options) -> str:
    """The lmms-eval vsibench doc_to_text with its default (empty) kwargs."""
    if question_type in VSI_NUMERIC_TYPES:
        return f"{VSI_PRE_PROMPT}\n{question}\n{NA_POST_PROMPT}"
    return "\n".join([VSI_PRE_PROMPT, question, "Options:\n" + "\n".join(options), MC_POST_PROMPT])


def vsibench_official_score(q: Question, prediction: str) -> float:
    """The released scorer: first word of the answer; exact (case-insensitive) letter match, or MRA
    of float(first word) (0 when it is not a number)."""
    word = vqa.first_word(prediction)
    if q.answer_type == "choice":
        return float(word.lower() == q.ground_truth.lower())
    try:
        return vqa.mean_relative_accuracy(float(word), float(q.ground_truth))
    except ValueError:
        return 0.0


class VSIBench(QASuite):
    name = "vsibench"
    columns = ("Overall",) + VSI_COLUMNS + (VSI_OFFICIAL_OVERALL,)
    source = ("vision-x-nyu/thinking-in-space lmms_eval/tasks/vsibench (vsibench.yaml, utils.py); "
              "HF dataset nyu-visionx/VSI-Bench")
    max_new_tokens = 16  # vsibench.yaml generation_kwargs
    unit_per_video = True  # ~17 questions per video: decoding once per question would dominate the run

    def __init__(self, num_frames: int = VSI_NUM_FRAMES):
        super().__init__()
        self.num_frames = num_frames

    def read_questions(self, data_dir):
        shards = sorted(data_dir.glob("test-*.parquet"))
        rows = read_parquet_rows(shards) if shards else read_jsonl_rows(data_dir / "test.jsonl")
        fields = ("id", "dataset", "scene_name", "question_type", "question", "options", "ground_truth")
        out = []
        for path, r in rows:
            require_fields(path, r, fields, f"question {r.get('id', '?')}")
            qtype = r["question_type"]
            if qtype not in VSI_CHOICE_TYPES + VSI_NUMERIC_TYPES:
                raise DatasetLayoutError(f"{path}: question {r['id']} has unknown question_type {qtype!r}")
            choice = qtype in VSI_CHOICE_TYPES
            if choice and not r["options"]:
                raise DatasetLayoutError(f"{path}: multiple-choice question {r['id']} has no options")
            gt = (_check_letter(path, r["id"], r["ground_truth"], len(r["options"])) if choice
                  else _check_positive_number(path, r["id"], r["ground_truth"]))
            out.append(Question(str(r["id"]), qtype, vsibench_prompt(r["question"], qtype, r["options"]),
                                "choice" if choice else "numeric", gt, len(r["options"]) if choice else 0,
                                (f"{r['dataset']}/{r['scene_name']}.mp4",)))
        return out

    def images(self, data_dir, question):
        return video_frames(data_dir / question.media[0], self.num_frames)

    def score(self, question, prediction):
        return {"score": _letter_or_number_score(question, prediction),
                "score_official": vsibench_official_score(question, prediction)}

    def summarize(self, rows):
        table = self._row(rows, "score")
        table[VSI_OFFICIAL_OVERALL] = self._row(rows, "score_official")["Overall"]
        return {"VSI-Bench": table}

    def protocol(self):
        return {**super().protocol(), "num_frames": self.num_frames, "frame_sampling": "linspace(0, n-1, N) as int"}

    @staticmethod
    def _row(rows, key):
        per_type = _table(rows, VSI_CHOICE_TYPES + VSI_NUMERIC_TYPES, key)
        directions = [per_type.pop(t) for t in VSI_CHOICE_TYPES[:3] if t in per_type]
        if directions:
            per_type["object_rel_direction"] = float(np.mean(directions))
        row = {"Overall": float(np.mean(list(per_type.values())))}  # mean of the task means, as released
        row.update({c: per_type[c] for c in VSI_COLUMNS if c in per_type})
        return row


# --------------------------------------------------------------------------------------------------
# SPAR-Bench
# --------------------------------------------------------------------------------------------------
SPAR_CHOICE_TASKS = ("obj_spatial_relation_oo", "obj_spatial_relation_oc_mv", "obj_spatial_relation_oo_mv",
                     "spatial_imagination_oc", "spatial_imagination_oo", "spatial_imagination_oc_mv",
                     "spatial_imagination_oo_mv", "position_matching", "camera_motion_infer",
                     "distance_infer_center_oo", "distance_infer_center_oo_mv")
SPAR_NUMERIC_TASKS = ("depth_prediction_oc", "depth_prediction_oo", "distance_prediction_oc",
                      "distance_prediction_oo", "depth_prediction_oc_mv", "depth_prediction_oo_mv",
                      "distance_prediction_oo_mv", "distance_prediction_oc_mv")
SPAR_VIEW_CHANGE = "view_change_infer"
SPAR_LEVELS = {"Low": SPAR_NUMERIC_TASKS, "Middle": (SPAR_VIEW_CHANGE, "position_matching", "camera_motion_infer"),
               "High": tuple(t for t in SPAR_CHOICE_TASKS if t not in ("position_matching", "camera_motion_infer"))}
SPAR_BOX_NOTE = ("The values represent the bounding box coordinates normalized to a 0-1000 scale, "
                 "with the top-left corner as the origin of the image.")


def sparbench_prompt(question: str, task: str) -> str:
    """SPAR's lmms-eval sparbench doc_to_text with its default (empty) pre_prompt."""
    if task in SPAR_NUMERIC_TASKS:
        return f"\n{question}\n{NA_POST_PROMPT}"
    if task == SPAR_VIEW_CHANGE:
        return f"\n{question}\n\n"
    note = SPAR_BOX_NOTE if task in ("position_matching", "camera_motion_infer") else ""
    return f"\n{question}\n{note}\n{MC_POST_PROMPT}"


class SPARBench(QASuite):
    name = "sparbench"
    columns = ("Overall", "Low", "Middle", "High") + SPAR_CHOICE_TASKS + SPAR_NUMERIC_TASKS + (SPAR_VIEW_CHANGE,)
    source = "fudan-zvg/spar lmms-eval/lmms_eval/tasks/sparbench (sparbench.yaml, utils.py); HF jasonzhango/SPAR-Bench"
    max_new_tokens = 100  # sparbench.yaml generation_kwargs

    def read_questions(self, data_dir):
        shards = sorted(data_dir.glob("data/test-*.parquet")) or sorted(data_dir.glob("test-*.parquet"))
        if not shards:
            raise DatasetLayoutError(f"{data_dir}: no SPAR-Bench parquet shard (data/test-*.parquet as on the hub)")
        out = []
        for k, (path, r) in enumerate(read_parquet_rows(shards)):
            qid = str(r.get("id", k))
            require_fields(path, r, ("question", "answer", "task", "image"), f"row {qid}")
            task = r["task"]
            if task in SPAR_CHOICE_TASKS:
                kind, gt = "choice", _check_letter(path, qid, r["answer"], inline_option_count(r["question"]))
            elif task in SPAR_NUMERIC_TASKS:
                kind, gt = "numeric", _check_positive_number(path, qid, r["answer"])
            elif task == SPAR_VIEW_CHANGE:
                kind, gt = "view_change", str(r["answer"])
                try:
                    vqa.view_change_accuracy(gt, gt)
                except ValueError as e:
                    raise DatasetLayoutError(f"{path}: row {qid} view_change answer {gt!r} is not "
                                             "'action:amount,...'") from e
            else:
                raise DatasetLayoutError(f"{path}: row {qid} has unknown task {task!r}")
            images = r["image"] if isinstance(r["image"], list) else [r["image"]]
            if not images or not all(isinstance(i, dict) and i.get("bytes") for i in images):
                raise DatasetLayoutError(f"{path}: row {qid} image must hold embedded images ({{bytes, path}})")
            out.append(Question(qid, task, sparbench_prompt(r["question"], task), kind, gt,
                                inline_option_count(r["question"]), tuple(i["bytes"] for i in images)))
        return out

    def images(self, data_dir, question):
        return [decode_image(b, f"{self.name} question {question.qid}") for b in question.media]

    def score(self, question, prediction):
        if question.answer_type == "view_change":
            return {"score": vqa.view_change_accuracy(prediction, question.ground_truth)}
        return {"score": _letter_or_number_score(question, prediction)}

    def summarize(self, rows):
        per_task = _table(rows, SPAR_CHOICE_TASKS + SPAR_NUMERIC_TASKS + (SPAR_VIEW_CHANGE,))
        row = {"Overall": float(np.mean(list(per_task.values())))}  # mean over tasks, as released
        for level, tasks in SPAR_LEVELS.items():
            present = [per_task[t] for t in tasks if t in per_task]
            if present:
                row[level] = float(np.mean(present))
        row.update(per_task)
        return {"SPAR-Bench": row}


# --------------------------------------------------------------------------------------------------
# MindCube
# --------------------------------------------------------------------------------------------------
MINDCUBE_FILES = ("raw/MindCube_tinybench.jsonl", "data/raw/MindCube_tinybench.jsonl")
MINDCUBE_SETTINGS = ("rotation", "around", "among", "translation", "other")


def mindcube_setting(qid: str) -> str:
    """The setting a MindCube id names (MindCube src/evaluation get_setting_from_id)."""
    lower = qid.lower()
    return next((s for s in MINDCUBE_SETTINGS[:-1] if s in lower), "other")


class MindCube(QASuite):
    name = "mindcube"
    columns = ("Overall", "rotation", "around", "among")
    source = ("mll-lab-nu/MindCube (data/raw/MindCube_tinybench.jsonl, src/evaluation/core/extractors.py); "
              "HF dataset Inevitablevalor/MindCube")

    def read_questions(self, data_dir):
        found = [data_dir / f for f in MINDCUBE_FILES if (data_dir / f).is_file()]
        if not found:
            raise DatasetLayoutError(f"{data_dir}: no MindCube question file; expected one of {list(MINDCUBE_FILES)}")
        path = found[0]
        image_root = path.parent.parent  # image paths are relative to the folder holding raw/
        out = []
        for _, r in read_jsonl_rows(path):
            require_fields(path, r, ("id", "question", "images", "gt_answer"), f"question {r.get('id', '?')}")
            if not isinstance(r["images"], list) or not r["images"]:
                raise DatasetLayoutError(f"{path}: question {r['id']} images must be a non-empty list of paths")
            prompt = f"{r['question']}\n{MC_POST_PROMPT}"
            num_choices = inline_option_count(r["question"])
            out.append(Question(str(r["id"]), mindcube_setting(str(r["id"])), prompt, "choice",
                                _check_letter(path, r["id"], r["gt_answer"], num_choices), num_choices,
                                tuple(str(image_root / p) for p in r["images"])))
        return out

    def images(self, data_dir, question):
        return [read_rgb(pathlib.Path(p)) for p in question.media]

    def score(self, question, prediction):
        return {"score": _letter_or_number_score(question, prediction)}

    def summarize(self, rows):
        row = {"Overall": 100.0 * float(np.mean([r["score"] for r in rows]))}  # per question, as released
        row.update(_table(rows, MINDCUBE_SETTINGS))
        return {"MindCube": row}


# --------------------------------------------------------------------------------------------------
# OmniSpatial
# --------------------------------------------------------------------------------------------------
OMNISPATIAL_DIMENSIONS = ("Dynamic_Reasoning", "Spatial_Interaction", "Complex_Logic", "Perspective_Taking")
OMNISPATIAL_DIRECT_FORMAT = "Note: You only need to respond with A, B, C, or D without providing any additional information."


def omnispatial_prompt(question: str, options: list[str]) -> str:
    """OmniSpatial vlms_eval: format note, blank line, question, then 'A. option' lines."""
    return f"{OMNISPATIAL_DIRECT_FORMAT}\n\n{question}" + "".join(
        f"\n{chr(65 + i)}. {o}" for i, o in enumerate(options))


class OmniSpatial(QASuite):
    name = "omnispatial"
    columns = ("Overall",) + OMNISPATIAL_DIMENSIONS
    source = "qizekun/OmniSpatial vlms_eval/*_eval.py (data.json, image path, prompt, accuracy); HF qizekun/OmniSpatial"

    def read_questions(self, data_dir):
        path = data_dir / "data.json"
        if not path.is_file():
            raise DatasetLayoutError(f"{path}: not found; unzip OmniSpatial-test.zip into --data")
        try:
            items = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise DatasetLayoutError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(items, list) or not all(isinstance(item, dict) for item in items):
            raise DatasetLayoutError(f"{path}: expected a JSON list of question objects")
        fields = ("id", "question", "options", "answer", "task_type", "sub_task_type")
        out = []
        for item in items:
            require_fields(path, item, fields, f"question {item.get('id', '?')}")
            options, answer = item["options"], item["answer"]
            if not (isinstance(answer, int) and 0 <= answer < len(options) <= 26):
                raise DatasetLayoutError(f"{path}: question {item['id']} answer {answer!r} is not an index into "
                                         f"its {len(options)} options")
            image = f"{item['task_type']}/{str(item['id']).split('_')[0]}.png"
            out.append(Question(str(item["id"]), item["task_type"], omnispatial_prompt(item["question"], options),
                                "choice", chr(65 + answer), len(options), (image,)))
        return out

    def images(self, data_dir, question):
        return [read_rgb(data_dir / question.media[0])]

    def score(self, question, prediction):
        return {"score": _letter_or_number_score(question, prediction)}

    def summarize(self, rows):
        row = {"Overall": 100.0 * float(np.mean([r["score"] for r in rows]))}  # per question, as released
        row.update(_table(rows, OMNISPATIAL_DIMENSIONS))
        return {"OmniSpatial": row}


SUITES: tuple[Suite, ...] = (VSIBench(), SPARBench(), MindCube(), OmniSpatial())
