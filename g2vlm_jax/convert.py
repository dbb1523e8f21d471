"""Official G2VLM checkpoints <-> our model (SPEC 1.7).

The official release directory (as users download G2VLM-2B-MoT):

    model.safetensors      every tensor under its official name (bf16)
    text_config.json       Qwen2-VL text config (hidden_size, intermediate_size, num_hidden_layers,
                           num_attention_heads, num_key_value_heads, vocab_size, rms_norm_eps,
                           rope_theta, rope_scaling.mrope_section, ...)
    vit_config.json        Qwen2-VL vision config (embed_dim, depth, num_heads, mlp_ratio, patch_size,
                           temporal_patch_size, spatial_merge_size, hidden_size = LLM width)
    dino_config.json       DINOv2-with-registers config (hidden_size, num_hidden_layers,
                           num_attention_heads, mlp_ratio, patch_size, image_size, num_register_tokens,
                           layer_norm_eps, layerscale_value)
    tokenizer files        Qwen2 tokenizer (tokenizer.json, ...), copied through untouched

The heads' sizes are fixed in the official code (5 decoder blocks, 16 heads, point/camera widths
1024/512); a directory we write for another size records them under the extra key "g2vlm_heads"
of text_config.json (ignored by the official code), and it is read back from there.

Name mapping: the backbone table is `model.g2vlm.official_backbone_params` (stacked layers: our
slice i is official `layers.{i}`; Linear kernels are the transposed torch weights); the encoders and
heads map their own names (`model.encoder_layers.official_param_map`): transposed Linear weights,
Conv3d / Conv2d patch kernels flattened to matmuls. Every official tensor must be consumed and
every parameter filled: a missing or unexpected name, or a shape that does not fit, is an error
naming the tensors. Only safetensors and JSON are read (never pickle).
"""
from __future__ import annotations

import json
import pathlib
import shutil
from typing import Mapping

import jax
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx
from tqdm import tqdm

from g2vlm_jax import config as config_lib
from g2vlm_jax.model import dino as dino_lib
from g2vlm_jax.model import encoder_layers as el
from g2vlm_jax.model import heads as heads_lib
from g2vlm_jax.model import vit as vit_lib
from g2vlm_jax.model.g2vlm import G2VLM, official_backbone_params

CONFIG_FILES = ("text_config.json", "vit_config.json", "dino_config.json")
WEIGHTS_FILE = "model.safetensors"
HEADS_KEY = "g2vlm_heads"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
# Official tensors that are not part of the network: the DINO mask token (masked-image pretraining
# only) and the sky-segmentation net of the confidence loss (training-time `Pi3Loss`).
IGNORED_NAMES = ("dino_model.embeddings.mask_token",)
IGNORED_PREFIXES = ("Pi3Loss.",)


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
def _read_json(ckpt_dir: pathlib.Path, name: str) -> dict:
    path = ckpt_dir / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; an official G2VLM checkpoint directory holds "
                                f"{', '.join(CONFIG_FILES)} and {WEIGHTS_FILE}")
    return json.loads(path.read_text())


def _get(cfg: dict, key: str, file: str):
    if key not in cfg:
        raise ValueError(f"{file} has no {key!r}; it is not a Qwen2-VL / DINOv2 config as the official release "
                         "writes it (re-download the checkpoint, or add the key)")
    return cfg[key]


def config_from_official(ckpt_dir: str | pathlib.Path) -> config_lib.ModelConfig:
    """Our ModelConfig from the three official config JSONs (any size; fields they lack: SPEC defaults)."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    t, v, d = (_read_json(ckpt_dir, n) for n in CONFIG_FILES)
    tf, vf, df = CONFIG_FILES
    hidden, heads = _get(t, "hidden_size", tf), _get(t, "num_attention_heads", tf)
    rope = _get(t, "rope_scaling", tf) or {}
    text = config_lib.TextConfig(
        vocab_size=_get(t, "vocab_size", tf), hidden_size=hidden, num_layers=_get(t, "num_hidden_layers", tf),
        num_heads=heads, num_kv_heads=_get(t, "num_key_value_heads", tf), head_dim=t.get("head_dim") or hidden // heads,
        mlp_hidden=_get(t, "intermediate_size", tf), rms_eps=_get(t, "rms_norm_eps", tf),
        rope_theta=float(_get(t, "rope_theta", tf)), mrope_sections=tuple(_get(rope, "mrope_section", tf)))
    vit_width = _get(v, "embed_dim", vf)
    vit = config_lib.VitConfig(
        hidden_size=vit_width, num_layers=_get(v, "depth", vf), num_heads=_get(v, "num_heads", vf),
        mlp_hidden=int(vit_width * _get(v, "mlp_ratio", vf)), patch_size=_get(v, "patch_size", vf),
        temporal_patch_size=_get(v, "temporal_patch_size", vf), spatial_merge_size=_get(v, "spatial_merge_size", vf))
    if _get(v, "hidden_size", vf) != hidden:
        raise ValueError(f"{vf} hidden_size {v['hidden_size']} (the merger's output) differs from {tf} hidden_size "
                         f"{hidden}; the two files come from different checkpoints")
    dino_width = _get(d, "hidden_size", df)
    dino = config_lib.DinoConfig(
        hidden_size=dino_width, num_layers=_get(d, "num_hidden_layers", df), num_heads=_get(d, "num_attention_heads", df),
        mlp_hidden=int(dino_width * _get(d, "mlp_ratio", df)), patch_size=_get(d, "patch_size", df),
        num_registers=_get(d, "num_register_tokens", df), pos_grid=_get(d, "image_size", df) // _get(d, "patch_size", df),
        layerscale_init=float(d.get("layerscale_value", 1.0)), ln_eps=float(d.get("layer_norm_eps", 1e-6)))
    heads = config_lib.from_dict(config_lib.HeadsConfig, t.get(HEADS_KEY, {}))
    return config_lib.ModelConfig(text=text, vit=vit, dino=dino, heads=heads)


def official_config_files(cfg: config_lib.ModelConfig) -> dict[str, dict]:
    """The three official config JSONs for `cfg` (inverse of `config_from_official`)."""
    t, v, d = cfg.text, cfg.vit, cfg.dino
    text = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_act": "silu",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
            "intermediate_size": t.mlp_hidden, "rms_norm_eps": t.rms_eps, "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_sections)},
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    if cfg.heads != config_lib.HeadsConfig():
        text[HEADS_KEY] = config_lib.to_dict(cfg.heads)
    vit = {"model_type": "qwen2_vl", "embed_dim": v.hidden_size, "depth": v.num_layers, "num_heads": v.num_heads,
           "mlp_ratio": v.mlp_hidden / v.hidden_size, "hidden_size": t.hidden_size, "hidden_act": "quick_gelu",
           "in_channels": 3, "patch_size": v.patch_size, "temporal_patch_size": v.temporal_patch_size,
           "spatial_merge_size": v.spatial_merge_size}
    dino = {"model_type": "dinov2_with_registers", "hidden_size": d.hidden_size, "num_hidden_layers": d.num_layers,
            "num_attention_heads": d.num_heads, "mlp_ratio": d.mlp_hidden / d.hidden_size, "patch_size": d.patch_size,
            "image_size": d.pos_grid * d.patch_size, "num_register_tokens": d.num_registers,
            "layerscale_value": d.layerscale_init, "layer_norm_eps": d.ln_eps, "hidden_act": "gelu", "num_channels": 3}
    return dict(zip(CONFIG_FILES, (text, vit, dino)))


# --------------------------------------------------------------------------------------------------
# Tensors
# --------------------------------------------------------------------------------------------------
def _encoder_parts(model: G2VLM) -> list[tuple[nnx.Module, str]]:
    """(module, official prefix) of every part whose names come from `encoder_layers.official_key`."""
    parts = [(model.dino_model, "dino_model."), (model.heads, "")]
    if model.cfg.use_vit:
        parts.append((model.vit_model, "vit_model."))
    return parts


def _conv_shapes(cfg: config_lib.ModelConfig) -> dict[str, tuple[int, ...]]:
    """Official shapes of the patch convolutions (our kernels are their flattened matmul form)."""
    v, d = cfg.vit, cfg.dino
    return {"vit_model.patch_embed.proj.weight": (v.hidden_size, 3, v.temporal_patch_size, v.patch_size, v.patch_size),
            "dino_model.embeddings.patch_embeddings.projection.weight": (d.hidden_size, 3, d.patch_size, d.patch_size)}


def _backbone_tensor(state_dict: Mapping[str, np.ndarray], entries: list) -> np.ndarray:
    """Our (possibly layer-stacked) array from its official tensors."""
    arrays = []
    for _, _, name, transposed in entries:
        a = np.asarray(state_dict[name])
        arrays.append(a.T if transposed else a)
    return np.stack(arrays) if entries[0][1] is not None else arrays[0]


def _unexpected(state_dict: Mapping[str, np.ndarray], consumed: set[str]) -> list[str]:
    return sorted(k for k in state_dict if k not in consumed and k not in IGNORED_NAMES
                  and not k.startswith(IGNORED_PREFIXES))


def _names_error(kind: str, names: list[str]) -> ValueError:
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    return ValueError(f"{kind} official tensors: {shown}; the config JSONs do not match model.safetensors "
                      "(or the file is not a G2VLM checkpoint)")


def from_official(state_dict: Mapping[str, np.ndarray], config: config_lib.ModelConfig) -> G2VLM:
    """A G2VLM with every parameter taken from the official tensors (float32 master weights).

    Built abstractly first (no random initialisation is paid for). Raises ValueError naming missing,
    unexpected or misshapen tensors.
    """
    model = nnx.eval_shape(lambda: G2VLM(config, rngs=nnx.Rngs(0)))
    backbone: dict[tuple, list] = {}
    for entry in official_backbone_params(config):
        backbone.setdefault(entry[0], []).append(entry)
    missing = [e[2] for entries in backbone.values() for e in entries if e[2] not in state_dict]
    for module, prefix in _encoder_parts(model):
        missing += [k for k in el.official_param_map(module, prefix) if k not in state_dict]
    if missing:
        raise _names_error("missing", sorted(missing))
    consumed = set()
    for module, prefix in _encoder_parts(model):
        ignore = dino_lib.UNUSED_OFFICIAL if module is model.dino_model else ()
        consumed.update(el.load_official(module, state_dict, prefix, ignore=ignore))
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, entries in tqdm(backbone.items(), desc="backbone tensors", leave=False):
        value = _backbone_tensor(state_dict, entries)
        var = params[path]
        if value.shape != var.get_value().shape:
            raise ValueError(f"official tensor {entries[0][2]!r} (x{len(entries)}) gives shape {value.shape}, our "
                             f"parameter {'.'.join(path)} has {var.get_value().shape}; the config does not match")
        var.set_value(jax.numpy.asarray(value, dtype=var.get_value().dtype))
        consumed.update(e[2] for e in entries)
    unexpected = _unexpected(state_dict, consumed)
    if unexpected:
        raise _names_error("unexpected", unexpected)
    skipped = [k for k in state_dict if k.startswith(IGNORED_PREFIXES)]
    if skipped:
        logging.info("convert: ignored %d training-only tensors (%s...)", len(skipped), IGNORED_PREFIXES)
    return model


def to_official(model: G2VLM) -> dict[str, np.ndarray]:
    """Every parameter under its official name and layout (float32 numpy; cast when writing)."""
    cfg = model.cfg
    out: dict[str, np.ndarray] = {}
    conv = _conv_shapes(cfg)
    for module, prefix in _encoder_parts(model):
        for name, (path, var) in el.official_param_map(module, prefix).items():
            value = np.asarray(var.get_value(), np.float32)
            if str(path[-1]) == "kernel":
                value = value.T.reshape(conv[name]) if name in conv else value.T
            out[name] = value
    out["dino_model.embeddings.mask_token"] = np.zeros((1, cfg.dino.hidden_size), np.float32)
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, layer, name, transposed in official_backbone_params(cfg):
        value = np.asarray(params[path].get_value(), np.float32)
        value = value[layer] if layer is not None else value
        out[name] = value.T if transposed else value
    return out


# --------------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------------
def read_official_dir(ckpt_dir: str | pathlib.Path) -> tuple[config_lib.ModelConfig, dict[str, np.ndarray]]:
    """(config, state dict) of an official checkpoint directory; safetensors only."""
    from safetensors.numpy import load_file

    ckpt_dir = pathlib.Path(ckpt_dir)
    cfg = config_from_official(ckpt_dir)
    weights = ckpt_dir / WEIGHTS_FILE
    if not weights.is_file():
        pickled = sorted(p.name for p in ckpt_dir.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" ({', '.join(pickled)} are pickle files, which g2vlm never loads: convert them to safetensors "
                "with the tool that wrote them)") if pickled else ""
        raise FileNotFoundError(f"{weights} is missing{hint}")
    try:
        state_dict = load_file(str(weights))
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise ValueError(f"{weights} is not a readable safetensors file ({type(e).__name__}: {e})") from e
    return cfg, state_dict


def load_official_dir(ckpt_dir: str | pathlib.Path) -> tuple[config_lib.ModelConfig, G2VLM]:
    cfg, state_dict = read_official_dir(ckpt_dir)
    return cfg, from_official(state_dict, cfg)


def write_official_dir(model: G2VLM, out_dir: str | pathlib.Path, *, dtype: str = "bfloat16",
                       tokenizer_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Writes model.safetensors (`dtype`) + the three config JSONs (+ the tokenizer files found in `tokenizer_dir`)."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[dtype]
    tensors = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in to_official(model).items()}
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    for name, content in official_config_files(model.cfg).items():
        (out / name).write_text(json.dumps(content, indent=2))
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            if (pathlib.Path(tokenizer_dir) / name).is_file():
                shutil.copy(pathlib.Path(tokenizer_dir) / name, out / name)
    return out
