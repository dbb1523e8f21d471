"""`vqa_samples`: general VQA rows (jsonl) -> one VQA record per row (images + a conversation, no geometry).

Accepted row format (one JSON object per line). Either the LLaVA form that the official release's
`vlm_sft` data uses, or a flat question / answer form:

    image | images   str or [str]   1..N image paths, relative to the image root (manual_dir) or absolute
    conversations    [{"from": "system" | "human" | "gpt", "value": str}, ...]  (LLaVA; "role" / "content"
                     with "user" / "assistant" is accepted too). `<image>` placeholders are removed: the
                     images always go at the start of the first user turn (SPEC 1.4).
    question, answer str            used when the row has no `conversations`
    system           str, optional  system text of the question / answer form
    answer_type      '' | 'numeric' | 'choice', optional (default '' = free-form, or 'choice' with choices)
    choices          [str], optional option texts ("A. red", ...); appended to the last user turn, one per
                     line, unless that turn already contains every one of them
    id               str, optional  the record's sample_id (default '<file stem>-<line number>')

Turns must be an optional system turn, then user / assistant alternating, ending with an assistant
turn. Image bytes are stored unchanged when they are PNG or JPEG (so a round trip is exact and no
quality is lost), other formats are re-encoded as PNG. Bad rows are skipped and counted by reason in
`VqaSamples.skipped`; a missing image file raises (a wrong image root is a setup error, not a bad row).
"""
from __future__ import annotations

import collections
import dataclasses
import io
import json
import pathlib

import tensorflow_datasets as tfds
import tqdm
from PIL import Image

from data_pipelines import records
from data_pipelines.builders.base import SPLITS, SceneRecordBuilder

_ROLE_NAMES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclasses.dataclass
class VqaConfig(tfds.core.BuilderConfig):
    """Where the rows are and how to label them."""

    files: tuple[tuple[str, str], ...] = ()  # (split, jsonl path); () = every <split>.jsonl in manual_dir
    dataset: str = "vqa"  # VQASample.dataset of every record


class RowError(ValueError):
    """A row that cannot become a record; `reason` is a short stable string for counting."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _image_bytes(path: pathlib.Path) -> bytes:
    """The file's bytes when it is a PNG or JPEG that decodes, else its pixels re-encoded as PNG.
    Raises FileNotFoundError for a missing file, RowError('corrupt_image') for undecodable bytes."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            if im.format in ("PNG", "JPEG"):
                return data
            return records.encode_image(records.decode_image(data), "png")
    except (OSError, ValueError, SyntaxError) as e:
        raise RowError("corrupt_image", f"{path}: {e}") from None


def _turns(row: dict) -> list[tuple[str, str]]:
    """The row's conversation as (role, text) pairs, `<image>` placeholders removed."""
    if "conversations" in row:
        turns = []
        for turn in row["conversations"]:
            if not isinstance(turn, dict):
                raise RowError("bad_roles", "conversations must be a list of objects")
            role = _ROLE_NAMES.get(str(turn.get("from", turn.get("role", ""))))
            if role is None:
                raise RowError("bad_roles", f"unknown role in {turn}")
            text = str(turn.get("value", turn.get("content", "")))
            turns.append((role, text.replace("<image>", "").strip()))
        return turns
    if "question" not in row or "answer" not in row:
        raise RowError("missing_field", "row needs conversations, or question and answer")
    system = [("system", str(row["system"]))] if row.get("system") else []
    return system + [("user", str(row["question"]).strip()), ("assistant", str(row["answer"]).strip())]


def _with_choices(turns: list[tuple[str, str]], choices: tuple[str, ...]) -> list[tuple[str, str]]:
    """Appends the options to the last user turn unless it already lists every one of them."""
    users = [i for i, (role, _) in enumerate(turns) if role == "user"]
    if not choices or not users:  # no user turn: VQASample.check rejects the row
        return turns
    last_user = users[-1]
    text = turns[last_user][1]
    if not all(c in text for c in choices):
        turns = list(turns)
        turns[last_user] = ("user", text + "\n" + "\n".join(choices))
    return turns


def row_to_record(row: dict, root: pathlib.Path, row_id: str, cfg: VqaConfig) -> dict:
    """One jsonl row -> a record of `records.vqa_features()`; raises RowError (skip the row) or
    FileNotFoundError (an image path that does not exist under `root`)."""
    paths = row.get("images", row.get("image", []))
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise RowError("no_images", "row has no image / images")
    choices = tuple(str(c) for c in row.get("choices", ()))
    answer_type = str(row.get("answer_type", "choice" if choices else ""))
    if answer_type not in records.VQA_ANSWER_TYPES:
        raise RowError("bad_answer_type", f"answer_type {answer_type!r} is not one of {records.VQA_ANSWER_TYPES}")
    sample = records.VQASample(sample_id=str(row.get("id", row_id)), dataset=cfg.dataset, images=(),
                               turns=tuple(_with_choices(_turns(row), choices)), answer_type=answer_type,
                               choices=choices)
    try:
        sample.check()
    except ValueError as e:
        raise RowError("bad_roles", str(e)) from None
    record = records.vqa_to_record(sample)
    record["images"] = [_image_bytes(root / p) for p in paths]  # after the cheap checks
    return record


class VqaSamples(SceneRecordBuilder):
    """General VQA: each jsonl row (1..N images and a conversation) is one record."""

    CONFIG_CLASS = VqaConfig
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass the folder that image paths are relative to as manual_dir; rows come "
                                    "from <split>.jsonl there or from VqaConfig.files.")

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.skipped: collections.Counter = collections.Counter()  # rows skipped in the last build, by reason

    def _features(self) -> tfds.features.FeaturesDict:
        return records.vqa_features()

    def _split_generators(self, dl_manager):
        root = pathlib.Path(dl_manager.manual_dir)
        files = self.settings.files or tuple((s, f"{s}.jsonl") for s in SPLITS if (root / f"{s}.jsonl").is_file())
        if not files:
            raise ValueError(f"no rows to convert: give VqaConfig.files or put <split>.jsonl in {root}")
        for split, path in files:
            if split not in SPLITS or not (root / path).is_file():
                raise ValueError(f"VqaConfig.files entry ({split!r}, {path!r}): split must be in {SPLITS} "
                                 f"and the file must exist (relative paths are under {root})")
        return {split: self._generate_examples(root, root / path) for split, path in files}

    def _generate_examples(self, root: pathlib.Path, path: pathlib.Path):
        lines = path.read_text().splitlines()
        for number, line in enumerate(tqdm.tqdm(lines, desc=f"vqa {path.name}", leave=False)):
            if not line.strip():
                continue
            row_id = f"{path.stem}-{number}"
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise RowError("bad_json", "a row must be a JSON object")
                record = row_to_record(row, root, row_id, self.settings)
            except json.JSONDecodeError:
                self.skipped["bad_json"] += 1
                continue
            except RowError as e:
                self.skipped[e.reason] += 1
                continue
            yield row_id, record
