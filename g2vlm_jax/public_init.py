"""`g2vlm init`: the paper's starting point built from public checkpoints (SPEC 1.1-1.3, 3).

    semantic expert, embed_tokens, lm_head, ViT + merger   <- Qwen2-VL (Hugging Face layout: config.json +
                                                              model.safetensors or shards + index)
    geometry encoder                                        <- Dinov2WithRegisters (Hugging Face layout)
    geometry expert, dino2llm, heads                        <- our initialisation, as SPEC 1.1/1.3 says:
                                                              normal(0.02), biases 0, norms 1, LayerScale
                                                              0.01, dino2llm zero (`geometry_init="copy"`
                                                              copies the semantic expert instead)
    semantic QK-norm weights                                <- ones (stock Qwen2-VL has no QK-norm)
    lm_head                                                 <- untied: Qwen2-VL-2B ties it to embed_tokens, so
                                                              a file without lm_head.weight gives a copy

How: the public tensors are renamed to the official G2VLM names (the official release builds its
language model, ViT and DINO from these very Hugging Face classes), laid over the official-layout
tensors of a freshly initialised model, and read with `convert.from_official`: one loader, its
name/shape checks. Every public tensor is used, or reported as ignored with the reason (the ViT of a
`use_vit=False` model); any other unknown tensor is an error. The configs are read from the public
config.json files with the strictness of `convert.config_from_official`.
"""
from __future__ import annotations

import dataclasses
import json
import pathlib
import re

import numpy as np
from absl import logging
from flax import nnx

from g2vlm_jax import config as config_lib
from g2vlm_jax import convert
from g2vlm_jax.model.g2vlm import G2VLM

# Hugging Face Qwen2-VL names -> official G2VLM names (transformers < 4.52, then >= 4.52 layouts).
QWEN2VL_RENAMES = (
    (r"^model\.language_model\.", "language_model.model."),
    (r"^model\.visual\.", "vit_model."),
    (r"^model\.", "language_model.model."),
    (r"^lm_head\.", "language_model.lm_head."),
    (r"^visual\.", "vit_model."),
)
EMBED, LM_HEAD = "language_model.model.embed_tokens.weight", "language_model.lm_head.weight"
# Qwen2VLVisionConfig's defaults (transformers 4.49), which `save_pretrained` leaves out of config.json.
QWEN2VL_VISION_DEFAULTS = {"patch_size": 14, "temporal_patch_size": 2, "spatial_merge_size": 2, "in_channels": 3,
                           "hidden_act": "quick_gelu"}
GEOMETRY_INITS = ("spec", "copy")


@dataclasses.dataclass
class InitReport:
    """What `init_from_public` did with each tensor (written as init_report.json)."""

    loaded: dict[str, str]  # official name <- public name
    ignored: dict[str, str]  # public name -> why
    initialised: list[str]  # official names that keep our initialisation (geometry expert, heads, QK-norm ...)
    untied_lm_head: bool


def _read_config(folder: pathlib.Path, what: str) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise ValueError(f"{path} is missing; pass the {what} checkpoint folder as downloaded from the Hugging Face "
                         "hub (config.json + model.safetensors or its shards)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download it") from e


def public_configs(qwen2vl_dir: pathlib.Path, dinov2_dir: pathlib.Path) -> dict[str, dict]:
    """The three config dicts `convert.config_from_jsons` reads, from the public config.json files."""
    qwen = _read_config(qwen2vl_dir, "Qwen2-VL")
    dino = _read_config(dinov2_dir, "DINOv2-with-registers")
    if qwen.get("model_type") != "qwen2_vl" or "vision_config" not in qwen:
        raise ValueError(f"{qwen2vl_dir}/config.json is not a Qwen2-VL config (model_type "
                         f"{qwen.get('model_type')!r}, expected 'qwen2_vl' with a vision_config)")
    if dino.get("model_type") != "dinov2_with_registers":
        raise ValueError(f"{dinov2_dir}/config.json is not a DINOv2-with-registers config (model_type "
                         f"{dino.get('model_type')!r}, expected 'dinov2_with_registers')")
    text = {**qwen, **qwen.get("text_config", {})}  # newer transformers nest the text part
    text.pop(convert.HEADS_KEY, None)
    # transformers leaves out vision keys equal to Qwen2VLVisionConfig's defaults: put them back.
    vision = {**QWEN2VL_VISION_DEFAULTS, **qwen["vision_config"]}
    return {"text_config.json": text, "vit_config.json": vision, "dino_config.json": dino}


def official_name(public: str) -> str:
    for pattern, replacement in QWEN2VL_RENAMES:
        if re.match(pattern, public):
            return re.sub(pattern, replacement, public, count=1)
    return public


def model_config(qwen2vl_dir, dinov2_dir, base: config_lib.ModelConfig | None = None) -> config_lib.ModelConfig:
    """The public checkpoints' text/ViT/DINO sizes on `base` (heads, dtypes, freezing; default: the 2B
    config's). `base` sizes that differ from the public ones are an error naming them."""
    public = convert.config_from_jsons(public_configs(pathlib.Path(qwen2vl_dir), pathlib.Path(dinov2_dir)))
    if base is None:
        return dataclasses.replace(config_lib.ModelConfig(), text=public.text, vit=public.vit, dino=public.dino)
    differ = [f"model.{part}.{f.name}: experiment {getattr(getattr(base, part), f.name)!r}, public "
              f"{getattr(getattr(public, part), f.name)!r}"
              for part in ("text", "vit", "dino") for f in dataclasses.fields(getattr(base, part))
              if f.name not in config_lib.INIT_ONLY_FIELDS.get(part, ())
              and getattr(getattr(base, part), f.name) != getattr(getattr(public, part), f.name)]
    if differ:
        raise ValueError("the experiment's model does not match the public checkpoints: " + "; ".join(differ[:6]))
    return base


def init_from_public(qwen2vl_dir, dinov2_dir, cfg: config_lib.ModelConfig, *, seed: int = 0,
                     geometry_init: str = "spec") -> tuple[G2VLM, InitReport]:
    """A G2VLM of `cfg` (see `model_config`) initialised from the public checkpoints (module docstring)."""
    if geometry_init not in GEOMETRY_INITS:
        raise ValueError(f"geometry_init {geometry_init!r}: choose one of {list(GEOMETRY_INITS)}")
    qwen2vl_dir, dinov2_dir = pathlib.Path(qwen2vl_dir), pathlib.Path(dinov2_dir)
    fresh = G2VLM(dataclasses.replace(cfg, param_dtype="float32"), rngs=nnx.Rngs(seed))
    state = convert.to_official(fresh)  # every tensor of the model, official names, SPEC initialisation
    del fresh
    loaded: dict[str, str] = {}
    ignored: dict[str, str] = {}
    sources = ((convert.LazySafetensors(convert.weight_files(qwen2vl_dir)), official_name, qwen2vl_dir),
               (convert.LazySafetensors(convert.weight_files(dinov2_dir)),
                lambda n: "dino_model." + n.removeprefix("dinov2_with_registers."), dinov2_dir))
    for tensors, rename, folder in sources:
        for name in tensors.keys():
            target = rename(name)
            if target.startswith("vit_model.") and not cfg.use_vit:
                ignored[name] = "model.use_vit=false: the model has no semantic image encoder"
                continue
            if target not in state:
                raise ValueError(f"{folder}: tensor {name!r} (official name {target!r}) has no counterpart in the "
                                 "model; the checkpoint is not a Qwen2-VL / DINOv2-with-registers model of this size")
            value = np.asarray(tensors[name], np.float32)
            if value.shape != state[target].shape:
                raise ValueError(f"{folder}: tensor {name!r} has shape {value.shape}, the model expects "
                                 f"{state[target].shape} for {target!r}; the config.json does not match the weights")
            state[target] = value
            loaded[target] = name
    untied = EMBED in loaded and LM_HEAD not in loaded
    if untied:  # Qwen2-VL-2B ties lm_head to the embeddings; G2VLM unties it (SPEC 1.1)
        state[LM_HEAD] = state[EMBED].copy()
        loaded[LM_HEAD] = loaded[EMBED] + " (tied in Qwen2-VL: copied)"
    missing = sorted(n for n in state if n.startswith(("language_model.model.embed_tokens", "dino_model."))
                     and n not in loaded)
    if missing:
        raise ValueError(f"the public checkpoints lack {missing[:5]} ({len(missing)} tensors); pass complete "
                         "Qwen2-VL and DINOv2-with-registers folders")
    if geometry_init == "copy":  # the geometry expert starts as a copy of the semantic one (SPEC 1.1 option)
        for name in list(state):
            semantic = name.replace("_moe_geo", "")
            if "_moe_geo" in name and semantic in state:
                state[name] = state[semantic].copy()
    model = convert.from_official(state, cfg)
    report = InitReport(loaded=loaded, ignored=ignored, initialised=sorted(n for n in state if n not in loaded),
                        untied_lm_head=untied)
    logging.info("init: %d tensors from the public checkpoints, %d ignored, %d initialised here", len(loaded),
                 len(ignored), len(report.initialised))
    return model, report


def write_init_checkpoint(qwen2vl_dir, dinov2_dir, out_dir, *, experiment: config_lib.ExperimentConfig | None = None,
                          dtype: str = "float32", seed: int = 0, geometry_init: str = "spec") -> pathlib.Path:
    """`g2vlm init`: a params-only checkpoint (params/ + metadata.json + init_report.json + the Qwen2
    tokenizer files) that `checkpoint.init_from` and the inference commands accept."""
    from g2vlm_jax import export

    qwen2vl_dir, out = pathlib.Path(qwen2vl_dir).absolute(), pathlib.Path(out_dir).absolute()
    cfg = model_config(qwen2vl_dir, dinov2_dir, experiment.model if experiment else None)
    model, report = init_from_public(qwen2vl_dir, dinov2_dir, cfg, seed=seed, geometry_init=geometry_init)
    tokenizer = export.copy_tokenizer(qwen2vl_dir, out)
    if experiment is None:
        data = config_lib.DataConfig(tokenizer=tokenizer or config_lib.DataConfig().tokenizer,
                                     image_size=(518, 518), vit_image_size=(756, 756))
        experiment = config_lib.ExperimentConfig(name=f"init_{qwen2vl_dir.name}", model=cfg, data=data)
    elif tokenizer:
        experiment = dataclasses.replace(experiment, data=dataclasses.replace(experiment.data, tokenizer=tokenizer))
    experiment = dataclasses.replace(experiment, model=cfg)
    path = export.save_model(model, experiment, out, dtype=dtype,
                             source=f"public:{qwen2vl_dir}+{pathlib.Path(dinov2_dir).absolute()}")
    (out / "init_report.json").write_text(json.dumps(dataclasses.asdict(report), indent=1, sort_keys=True))
    return path
