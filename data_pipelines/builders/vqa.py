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

import dataclasses
import io
import pathlib

import tensorflow_datasets as tfds
from PIL import Image

from data_pipelines import records
from data_pipelines.builders.base import JsonlRowsBuilder, RowError

_ROLE_NAMES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclasses.dataclass
class VqaConfig(tfds.core.BuilderConfig):
    """Where the rows are and how to label them."""

    files: tuple[tuple[str, str], ...] = ()  # (split, jsonl path); () = every <split>.jsonl in manual_dir
    dataset: str = "vqa"  # VQASample.dataset of every record


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


class VqaSamples(JsonlRowsBuilder):
    """General VQA: each jsonl row (1..N images and a conversation) is one record."""

    CONFIG_CLASS = VqaConfig
    ROW_KIND = "vqa"
    MANUAL_DOWNLOAD_INSTRUCTIONS = ("Pass the folder that image paths are relative to as manual_dir; rows come "
                                    "from <split>.jsonl there or from VqaConfig.files.")

    def _features(self) -> tfds.features.FeaturesDict:
        return records.vqa_features()

    def row_to_record(self, row: dict, root: pathlib.Path, row_id: str) -> dict:
        return row_to_record(row, root, row_id, self.settings)
