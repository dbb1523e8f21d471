"""Which kind of checkpoint folder a path is: the one place that decides.

    RUN       a training run directory: <dir>/checkpoints/<step>/{state,data,metadata} (checkpoint/run.py);
              its checkpoints may live elsewhere (`checkpoint.directory`, e.g. gs://...)
    PARAMS    a params-only checkpoint: <dir>/params + <dir>/metadata.json (checkpoint/params.py;
              written by `g2vlm export` and `g2vlm convert --official`)
    OFFICIAL  an official G2VLM release directory: model.safetensors + text/vit/dino_config.json
              (g2vlm_jax/convert.py); convert it with `g2vlm convert --official DIR --out OUT`

`open_checkpoint(path, expect=...)` names what it found, or raises FileNotFoundError saying what each
accepted kind looks like and how to make one.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib

from g2vlm_jax import config as config_lib
from g2vlm_jax.checkpoint import run as run_lib

RUN, PARAMS, OFFICIAL = "run", "params", "official"
KINDS = (RUN, PARAMS, OFFICIAL)
OFFICIAL_FILES = ("model.safetensors", "text_config.json", "vit_config.json", "dino_config.json")
_WHAT = {
    RUN: "a training run directory (with checkpoints/, e.g. runs/<experiment name>)",
    PARAMS: "a params-only checkpoint (params/ + metadata.json, from `g2vlm export` or `g2vlm convert`)",
    OFFICIAL: "an official G2VLM release directory (model.safetensors + text/vit/dino_config.json)",
}


@dataclasses.dataclass(frozen=True)
class CheckpointFolder:
    """A checkpoint folder of a known kind. `checkpoints` is where a RUN's train-state checkpoints are."""

    kind: str
    path: pathlib.Path
    checkpoints: str = ""

    def metadata(self) -> dict:
        """The experiment config and model fingerprint it was written with (RUN: its newest step)."""
        if self.kind == PARAMS:
            try:
                return json.loads((self.path / "metadata.json").read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}/metadata.json is not valid JSON ({e}); re-export the checkpoint") from e
        if self.kind == RUN:
            manager = run_lib.make_manager(self.checkpoints, config_lib.CheckpointConfig(), read_only=True)
            steps = sorted(manager.all_steps())
            if not steps:
                raise FileNotFoundError(f"{self.checkpoints} holds no checkpoint")
            return run_lib.read_metadata(manager, steps[-1])
        raise ValueError(f"{self.path} is an official release directory, which carries no g2vlm config; convert it "
                         "first with `g2vlm convert --official DIR --out OUT`")


def kind_of(path: pathlib.Path) -> str | None:
    """RUN, PARAMS, OFFICIAL or None for a local folder."""
    if (path / "params").is_dir() and (path / "metadata.json").is_file():
        return PARAMS
    if (path / "checkpoints").is_dir():
        return RUN
    if all((path / name).is_file() for name in OFFICIAL_FILES):
        return OFFICIAL
    return None


def open_checkpoint(path: str | pathlib.Path, *, expect: tuple[str, ...] = KINDS,
                    checkpoints: str = "") -> CheckpointFolder:
    """The checkpoint folder at `path`, of one of the `expect`ed kinds.

    `checkpoints`: a run's `checkpoint.directory` when its checkpoints were moved (then `path` is the
    run directory and need not hold checkpoints/ itself).
    """
    path = pathlib.Path(path).absolute()
    kind = kind_of(path)
    if kind is None and checkpoints and RUN in expect:
        kind = RUN
    if kind not in expect:
        found = f"is {_WHAT[kind]}" if kind else ("does not exist" if not path.exists() else "is none of these")
        raise FileNotFoundError(f"{path} {found}; expected " + " or ".join(_WHAT[k] for k in expect))
    return CheckpointFolder(kind, path, checkpoints or (str(path / "checkpoints") if kind == RUN else ""))
