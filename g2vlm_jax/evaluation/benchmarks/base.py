"""The contract of `g2vlm benchmark`: a suite reads one public dataset in its released on-disk layout,
asks a predictor (the model behind a small interface) and scores the answers with the paper's protocol.

A suite splits its dataset into *units* (a sequence / scene for geometry suites, a fixed chunk of
questions for spatial-QA suites). The runner (runner.py) evaluates units one at a time and writes
each unit's rows to disk as soon as it is done, so a killed benchmark continues with the next unit;
processes of a multi-process run take every n-th unit and process 0 summarises all rows.

    suite.units(data_dir)                   -> sorted unit names (deterministic; no model needed)
    suite.evaluate(predictor, data_dir, u)  -> JSON-serialisable result rows of unit u
    suite.summarize(rows)                   -> {table row label: {column: value}} as the paper's table
    suite.protocol()                        -> its settings as JSON (optional; default {})
"""
from __future__ import annotations

import abc
import pathlib
from typing import Protocol

import numpy as np


class DatasetLayoutError(ValueError):
    """A benchmark file is missing or malformed. The message names the file and what was expected."""


class Predictor(Protocol):
    """What a suite may ask of the model. Images are uint8[H, W, 3] (any size: the predictor resizes
    them as `g2vlm reconstruct` / `g2vlm chat` load images)."""

    def reconstruct(self, images: list[np.ndarray]) -> dict[str, np.ndarray]:
        """One forward pass over all views -> float64 `local_points` / `world_points` [V, h, w, 3] and
        `c2w` [V, 4, 4] (OpenCV axes) at the model's input size (h, w): `input_size(H, W)`."""

    def input_size(self, height: int, width: int) -> tuple[int, int]:
        """(h, w) the predictor resizes an image of (height, width) to."""

    def answer(self, question: str, images: list[np.ndarray], max_new_tokens: int = 32) -> str:
        """The model's greedy answer text to `question` about `images` (chat layout of SPEC 4)."""


class Suite(abc.ABC):
    """One benchmark: `name` (the --suite value), `kind` ('pointmap' | 'depth' | 'pose' | 'qa'),
    `columns` (the table's metric columns, in the paper's order) and `source` (where its protocol
    comes from, for docs/BENCHMARKS.md)."""

    name: str
    kind: str
    columns: tuple[str, ...]
    source: str

    @abc.abstractmethod
    def units(self, data_dir: pathlib.Path) -> list[str]:
        """Unit names of the dataset at `data_dir`; raises DatasetLayoutError when its layout is wrong."""

    @abc.abstractmethod
    def evaluate(self, predictor: Predictor, data_dir: pathlib.Path, unit: str) -> list[dict]:
        """Result rows of one unit (per frame / per sequence / per question, as the protocol averages)."""

    @abc.abstractmethod
    def summarize(self, rows: list[dict]) -> dict[str, dict[str, float]]:
        """Rows of every unit -> the report's table: {row label: {column: value}}."""

    def protocol(self) -> dict:
        """The protocol's settings (frame sampling, alignment, caps, ...) as JSON, recorded in every unit file
        and the report, so results of other settings are never mixed. Optional: a suite without settings
        records {}."""
        return {}
