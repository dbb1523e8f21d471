"""Params-only checkpoints for serving and later stages; official import and export.

    g2vlm export --checkpoint RUN_OR_PARAMS_DIR --out DIR [--experiment E] [--dtype bfloat16] [--official]
        DIR/params/          params-only Orbax checkpoint (flat name -> array, no optimiser state),
                             cast to --dtype (newest readable step of a run directory)
        DIR/metadata.json    experiment config (the checkpoint's own, or --experiment's after a
                             shape check) with model.param_dtype = --dtype, so
                             `g2vlm chat/reconstruct/eval --checkpoint DIR` rebuild exactly this model
        DIR/official/        (--official) the official release layout (g2vlm_jax/convert.py)

    g2vlm convert --official CKPT_DIR --out DIR [--dtype bfloat16]
        an official release directory -> DIR/params + DIR/metadata.json (bf16 as released, or float32), usable as
        `--checkpoint DIR` of chat/reconstruct and as `checkpoint.init_from` of a training run; the
        Qwen2 tokenizer files are copied into DIR and referenced relative to it (data.tokenizer =
        "qwen2:tokenizer.json"), so DIR can be moved as a whole

    g2vlm convert --to-official --checkpoint RUN_OR_PARAMS_DIR --out DIR [--dtype bfloat16]
        our checkpoint -> DIR/model.safetensors + text/vit/dino_config.json (+ tokenizer files)
"""
from __future__ import annotations

import dataclasses
import pathlib
import shutil

import jax
import jax.numpy as jnp
from flax import nnx

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import config as config_lib
from g2vlm_jax import convert

DTYPES = ("bfloat16", "float32")


def save_model(model: nnx.Module, cfg: config_lib.ExperimentConfig, out_dir: str | pathlib.Path, *,
               dtype: str, source: str) -> pathlib.Path:
    """Writes `model`'s parameters cast to `dtype` as a params-only checkpoint of `cfg`."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose one of {list(DTYPES)}")
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, param_dtype=dtype))
    params = jax.tree.map(lambda a: jnp.asarray(a, jnp.dtype(dtype)), ckpt_lib.flat_params(nnx.state(model, nnx.Param)))
    metadata = {**ckpt_lib.run_metadata(cfg), "source": source, "dtype": dtype}
    return ckpt_lib.save_params(out_dir, params, metadata)


def export(checkpoint: str | pathlib.Path, out_dir: str | pathlib.Path, *, dtype: str = "bfloat16",
           official: bool = False, experiment: config_lib.ExperimentConfig | None = None) -> pathlib.Path:
    """A run directory (newest readable step) or params-only checkpoint -> a params-only export.

    `experiment`, if given, is the config recorded in the export; it must describe the same model
    shapes as the checkpoint (CheckpointMismatchError naming the differing sections otherwise).
    """
    from g2vlm_jax.inference import load

    if experiment is not None:  # before the (possibly minutes-long) restore
        folder = ckpt_lib.open_checkpoint(checkpoint, expect=(ckpt_lib.RUN, ckpt_lib.PARAMS))
        ckpt_lib.check_compatible(folder.metadata(), experiment, str(checkpoint))
    cfg, model = load.load_model(checkpoint)
    cfg = experiment or cfg
    out = save_model(model, cfg, out_dir, dtype=dtype, source=f"export:{pathlib.Path(checkpoint).absolute()}")
    if official:
        convert.write_official_dir(model, out / "official", dtype=dtype,
                                   tokenizer_dir=_tokenizer_dir(cfg, pathlib.Path(checkpoint)))
    return out


def export_official(checkpoint: str | pathlib.Path, out_dir: str | pathlib.Path, *,
                    dtype: str = "bfloat16") -> pathlib.Path:
    """Our run directory or params-only checkpoint -> the official release layout in `out_dir`."""
    from g2vlm_jax.inference import load

    cfg, model = load.load_model(checkpoint)
    return convert.write_official_dir(model, out_dir, dtype=dtype,
                                      tokenizer_dir=_tokenizer_dir(cfg, pathlib.Path(checkpoint)))


def _tokenizer_dir(cfg: config_lib.ExperimentConfig, base: pathlib.Path) -> pathlib.Path | None:
    """Folder of the experiment's Qwen2 tokenizer files (None for a sentencepiece tokenizer)."""
    kind, _, where = cfg.data.tokenizer.partition(":")
    if kind != "qwen2":
        return None
    path = pathlib.Path(where) if pathlib.Path(where).is_absolute() else base / where
    return path if path.is_dir() else path.parent


def copy_tokenizer(src_dir: pathlib.Path, out: pathlib.Path) -> str:
    """Copies the Qwen2 tokenizer files of `src_dir` (if it has a tokenizer.json) into `out`; returns the
    `data.tokenizer` spec that finds them relative to the checkpoint ('qwen2:tokenizer.json'), or ''."""
    out.mkdir(parents=True, exist_ok=True)
    if not (src_dir / "tokenizer.json").is_file():
        return ""
    for name in convert.TOKENIZER_FILES:
        if (src_dir / name).is_file():
            shutil.copy(src_dir / name, out / name)
    return "qwen2:tokenizer.json"  # relative to the checkpoint directory (inference/load.py)


def import_official(ckpt_dir: str | pathlib.Path, out_dir: str | pathlib.Path, dtype: str = "bfloat16") -> pathlib.Path:
    """An official release directory -> our params-only checkpoint (see the module docstring).

    The checkpoint's experiment config carries the official inference sizes: frames 518 wide for
    `reconstruct` (the official `recon`), semantic images 756 x 756 for `chat` (the official 768 x 768
    after Qwen2-VL's resize to multiples of 28).
    """
    ckpt_dir, out = pathlib.Path(ckpt_dir).absolute(), pathlib.Path(out_dir).absolute()
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose one of {list(DTYPES)}")
    # Built directly in `dtype`: the release is bf16, so bf16 loses nothing and a 2B model needs half the memory.
    model_cfg, model = convert.load_official_dir(ckpt_dir, param_dtype=dtype)
    tokenizer = copy_tokenizer(ckpt_dir, out) or config_lib.DataConfig().tokenizer
    data = config_lib.DataConfig(tokenizer=tokenizer, image_size=(518, 518), vit_image_size=(756, 756))
    cfg = config_lib.ExperimentConfig(name=f"official_{ckpt_dir.name}", model=model_cfg, data=data)
    return save_model(model, cfg, out, dtype=dtype, source=f"official:{ckpt_dir}")
