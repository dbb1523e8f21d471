"""What the spatial-QA suites share: the question record, the chunked unit scheme, readers of the
released question files (parquet / JSON lines / JSON) and the uniform video-frame sampler.

A QA suite reads its question file once per process (cached per data folder), splits the
questions in file order into units of QUESTIONS_PER_UNIT (`q00000-00049`, `q00050-00099`, ...) or,
for video benchmarks, into one unit per video (`<dataset>/<scene>`: the video is decoded once for
all its questions), and per question: loads the images / samples the video frames, asks `predictor.answer(prompt,
images, max_new_tokens)` with the benchmark's own prompt template, and scores the text with
metrics/vqa.py. Each row keeps the raw prediction so a report can be re-scored or audited.
"""
from __future__ import annotations

import abc
import dataclasses
import io
import json
import pathlib
import re

import av
import numpy as np
import pyarrow.parquet as pq
from PIL import Image

from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError, Predictor, Suite

QUESTIONS_PER_UNIT = 50
_UNIT = re.compile(r"^q(\d{5})-(\d{5})$")
_INLINE_OPTION = re.compile(r"(?:^|\s)\(?([A-Z])[.)]\s")


@dataclasses.dataclass(frozen=True)
class Question:
    """One benchmark question. media: what `QASuite.images` needs (paths, bytes or a video path)."""
    qid: str
    category: str          # the table's grouping (question type / task / setting)
    prompt: str            # the full text the model sees, built with the benchmark's template
    answer_type: str       # 'choice' | 'numeric' | 'view_change'
    ground_truth: str      # option letter, number as text, or SPAR 'action:amount,...'
    num_choices: int       # option letters A.. that count (26 when the options are not listed)
    media: tuple


class QASuite(Suite):
    """A spatial-QA suite: subclasses read questions, load their images and score one answer."""

    kind = "qa"
    max_new_tokens = 32
    unit_per_video = False  # True: a unit is one video's questions (decoded once), else QUESTIONS_PER_UNIT

    def __init__(self):
        self._questions: dict[str, list[Question]] = {}

    @abc.abstractmethod
    def read_questions(self, data_dir: pathlib.Path) -> list[Question]:
        """All questions of the benchmark at `data_dir`, in released order."""

    @abc.abstractmethod
    def images(self, data_dir: pathlib.Path, question: Question) -> list[np.ndarray]:
        """uint8[H, W, 3] images given to the model with `question.prompt`."""

    @abc.abstractmethod
    def score(self, question: Question, prediction: str) -> dict[str, float]:
        """{'score': value in [0, 1], ...} of one prediction."""

    def protocol(self) -> dict:
        """Settings recorded with every unit result (the runner refuses to mix results of others)."""
        unit = "one video" if self.unit_per_video else QUESTIONS_PER_UNIT
        return {"questions_per_unit": unit, "max_new_tokens": self.max_new_tokens,
                "parsing": "stated option letter / first number (vqa.extract_choice, vqa.extract_numbers)"}

    def questions(self, data_dir: pathlib.Path) -> list[Question]:
        key = str(pathlib.Path(data_dir).resolve())
        if key not in self._questions:
            questions = self.read_questions(pathlib.Path(data_dir))
            if not questions:
                raise DatasetLayoutError(f"{data_dir}: the {self.name} question file holds no questions")
            self._questions[key] = questions
        return self._questions[key]

    def units(self, data_dir: pathlib.Path) -> list[str]:
        questions = self.questions(data_dir)
        if self.unit_per_video:
            return sorted({_video_unit(q) for q in questions})
        n = len(questions)
        return [f"q{s:05d}-{min(s + QUESTIONS_PER_UNIT, n) - 1:05d}" for s in range(0, n, QUESTIONS_PER_UNIT)]

    def unit_questions(self, data_dir: pathlib.Path, unit: str) -> list[Question]:
        """The questions of one unit, in file order; ValueError for a name units() does not give."""
        questions = self.questions(data_dir)
        if self.unit_per_video:
            chosen = [q for q in questions if _video_unit(q) == unit]
        else:
            m = _UNIT.match(unit)
            ok = m and int(m.group(1)) <= int(m.group(2)) < len(questions)
            chosen = questions[int(m.group(1)):int(m.group(2)) + 1] if ok else []
        if not chosen:
            raise ValueError(f"{self.name}: unit {unit!r} is not one of units() of {data_dir} "
                             f"({'<dataset>/<scene>' if self.unit_per_video else 'q00000-00049 style'})")
        return chosen

    def evaluate(self, predictor: Predictor, data_dir: pathlib.Path, unit: str) -> list[dict]:
        data_dir = pathlib.Path(data_dir)
        rows, images = [], {}  # images of the unit by media: a video is decoded once per unit
        for q in self.unit_questions(data_dir, unit):
            if q.media not in images:
                images[q.media] = self.images(data_dir, q)
            prediction = predictor.answer(q.prompt, images[q.media], self.max_new_tokens)
            rows.append({"id": q.qid, "category": q.category, "answer_type": q.answer_type,
                         "ground_truth": q.ground_truth, "prediction": prediction, **self.score(q, prediction)})
        return rows


def _video_unit(q: Question) -> str:
    """'<dataset>/<scene_name>' of a video question (its media is the one video path)."""
    return q.media[0].rsplit(".", 1)[0]


# --------------------------------------------------------------------------------------------------
# Readers
# --------------------------------------------------------------------------------------------------
def read_parquet_rows(paths: list[pathlib.Path]) -> list[tuple[pathlib.Path, dict]]:
    """(file, row dict) of every row of the parquet shards, shards in the given order."""
    rows = []
    for path in paths:
        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types (ArrowInvalid, OSError, ...)
            raise DatasetLayoutError(f"{path}: not a readable parquet file ({e}); re-download it") from e
        rows.extend((path, r) for r in table.to_pylist())
    return rows


def read_jsonl_rows(path: pathlib.Path) -> list[tuple[pathlib.Path, dict]]:
    """(file, object) of every non-empty line of a JSON-lines file."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: question file not found")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DatasetLayoutError(f"{path}:{n}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise DatasetLayoutError(f"{path}:{n}: expected one JSON object per line")
        rows.append((path, obj))
    return rows


def require_fields(path: pathlib.Path, row: dict, fields: tuple[str, ...], where: str) -> None:
    missing = [f for f in fields if f not in row]
    if missing:
        raise DatasetLayoutError(f"{path}: {where} lacks field(s) {missing}; the released format has {list(fields)}")


def inline_option_count(question: str) -> int:
    """Options written in the question text ("A. red B. blue", "(C) ..."): how many letters A.. they
    reach; 26 (any letter) when fewer than two are listed."""
    letters = sorted({m.group(1) for m in _INLINE_OPTION.finditer(question)})
    if len(letters) < 2:
        return 26
    return ord(letters[-1]) - ord("A") + 1


def decode_image(data: bytes, where: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except OSError as e:
        raise DatasetLayoutError(f"{where}: embedded image is not decodable ({e})") from e


# --------------------------------------------------------------------------------------------------
# Video
# --------------------------------------------------------------------------------------------------
def uniform_frame_indices(total: int, num_frames: int) -> np.ndarray:
    """lmms-eval's uniform sampling: linspace(0, total − 1, num_frames) truncated to int [num_frames]
    (all frames, in order, when the video is shorter)."""
    if total <= num_frames:
        return np.arange(total)
    return np.linspace(0, total - 1, num_frames, dtype=int)


def video_frames(path: pathlib.Path, num_frames: int) -> list[np.ndarray]:
    """`num_frames` uniformly sampled uint8[H, W, 3] frames of a video file (decoded with PyAV)."""
    if not path.is_file():
        raise DatasetLayoutError(f"{path}: video not found; extract the benchmark's video zips next to the "
                                 "question file (<dataset>/<scene_name>.mp4)")
    try:
        with av.open(str(path)) as container:
            total = container.streams.video[0].frames
            if total <= 0:  # the container does not store a frame count: count by decoding
                total = sum(1 for _ in container.decode(video=0))
                container.seek(0)
            wanted = set(uniform_frame_indices(total, num_frames).tolist())
            frames = [f.to_ndarray(format="rgb24") for k, f in enumerate(container.decode(video=0)) if k in wanted]
    except (av.error.FFmpegError, IndexError) as e:
        raise DatasetLayoutError(f"{path}: not a decodable video ({e})") from e
    if len(frames) != len(wanted):
        raise DatasetLayoutError(f"{path}: decoded {len(frames)} of the {len(wanted)} sampled frames; "
                                 "the file is truncated or its frame count is wrong")
    return frames
