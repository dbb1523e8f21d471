"""What the commands print: progress bars in a terminal only, and no library noise.

- `progress(...)`: a tqdm bar with rate and ETA on a terminal; disabled when stderr is not one (logs,
  CI, pipes), so captured output holds lines, never carriage returns or cursor moves.
- `quiet_library_noise()`: drops the library warnings that say nothing to a user (TFDS announcing
  a config object or a fresh local folder, Orbax explaining read-only checkpoint managers); every
  other warning stays.
"""
from __future__ import annotations

import logging

from tqdm import tqdm

NOISE = (
    "Using custom data configuration",  # tfds: every builder made from a config object (all of ours)
    "has no dataset_info.json",  # tfds: a local dataset folder before its first build
    "CheckpointManagerOptions.read_only",  # orbax: a read-only manager (inference, eval) explains its options
    "Given directory is read only",
)


class _DropNoise(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(text in message for text in NOISE)


_FILTER = _DropNoise()


def quiet_library_noise() -> None:
    """Installs the noise filter on absl's logger (which TFDS and Orbax log through); idempotent."""
    for name in ("absl", ""):
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)


def progress(iterable=None, **kwargs) -> tqdm:
    """tqdm on a terminal (rate, ETA), silent elsewhere; kwargs as tqdm's (`total`, `desc`, `unit`, ...;
    `disable=True` to force it off, e.g. on all but one process)."""
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", None)  # None: tqdm's own test, off when stderr is not a terminal
    return tqdm(iterable, **kwargs)
