"""Output folders the commands write into, checked before any work is done.

A path that is a file, or that cannot be created (a parent is a file, no permission), is the user's
to fix: a ValueError naming the option, the path and why (one line from the CLI), raised before a
model is loaded or data is converted, so that no work is lost to a typo in `--out`.
"""
from __future__ import annotations

import pathlib


def prepare_output_dir(path: str | pathlib.Path, option: str) -> pathlib.Path:
    """Creates directory `path` (and its parents) if needed; `option` names it in the error (e.g. '--out')."""
    path = pathlib.Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file, not a directory; pass a directory path (it is created if missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{option} {path} cannot be created ({e.strerror}: {e.filename}); pass a writable "
                         "directory path") from None
    return path
