"""Official G2VLM checkpoints <-> our model (SPEC 1.7).

The official release directory (as users download G2VLM-2B-MoT):

    model.safetensors      every tensor under its official name (bf16); a sharded
                           model.safetensors.index.json + shards is read too
    text_config.json       Qwen2-VL text config (hidden_size, intermediate_size, num_hidden_layers,
                           num_attention_heads, num_key_value_heads, vocab_size, rms_norm_eps,
                           rope_theta, rope_scaling.mrope_section; head_dim optional)
    vit_config.json        Qwen2-VL vision config (embed_dim, depth, num_heads, mlp_ratio,
                           temporal_patch_size, spatial_merge_size, hidden_size = LLM width;
                           patch_size ignored: the official loader sets 14, and so do we)
    dino_config.json       DINOv2-with-registers config (hidden_size, num_hidden_layers,
                           num_attention_heads, mlp_ratio, patch_size, image_size, num_register_tokens;
                           layer_norm_eps, layerscale_value optional with the HF defaults)
    tokenizer files        Qwen2 tokenizer (tokenizer.json, ...), copied through untouched

Fields the JSONs do not carry (image normalisation, RoPE of the encoders, LayerScale init, ...)
take the G2VLM-2B values of SPEC. The heads' sizes are fixed in the official code (5 decoder blocks,
16 heads, point/camera widths 1024/512); a directory we write for another size records them under
the extra key "g2vlm_heads" of text_config.json, and a model without the semantic encoder
(reconstruction-only experiments) writes "g2vlm_use_vit": false and no vit_model.* tensors. The
official code ignores both keys; we read them back.

Name mapping: the backbone table is `model.g2vlm.official_backbone_params` (stacked layers: our
slice i is official `layers.{i}`; Linear kernels are the transposed torch weights); the encoders and
heads map their own names (`model.encoder_layers.official_param_map`): transposed Linear weights,
Conv3d / Conv2d patch kernels flattened to matmuls. Every official tensor must be consumed and
every parameter filled: missing or unexpected names and misshapen tensors are a ValueError listing
them. Only safetensors and JSON are read (never pickle).

    config_from_official(ckpt_dir) -> ModelConfig         official_config_files(cfg) -> {file: JSON}
    official_shapes(cfg) -> {official name: shape}         (abstract: nothing is allocated)
    from_official(state_dict, cfg) -> G2VLM                 to_official(model, dtype) -> {name: array}
    read_official_dir(dir) -> (cfg, lazy state dict)        load_official_dir(dir) -> (cfg, G2VLM)
    write_official_dir(model, out_dir, dtype=, tokenizer_dir=) -> out_dir
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
from typing import Iterator, Mapping

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from flax import nnx

from g2vlm_jax import config as config_lib
from g2vlm_jax.console import progress
from g2vlm_jax.model import encoder_layers as el
from g2vlm_jax.model.g2vlm import G2VLM, official_backbone_params

CONFIG_FILES = ("text_config.json", "vit_config.json", "dino_config.json")
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX = "model.safetensors.index.json"
HEADS_KEY = "g2vlm_heads"
USE_VIT_KEY = "g2vlm_use_vit"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Tensors a released file may hold that the official inference model does not have (its loader uses
# strict=False and drops them): the training loss's sky-segmentation net (`Pi3Loss.*`), BAGEL's
# legacy position tables (the official resume deletes them), the register tokens of
# `use_registers` and the confidence decoder/head of `train_conf_pi3` (both off in the official
# loader). Skipped with a log line; any other unexpected name is an error. (A config of ours with
# `heads.confidence` expects and loads `conf_*`.)
IGNORED_PREFIXES = ("Pi3Loss.", "latent_pos_embed.", "vit_pos_embed.", "register_token", "conf_decoder.", "conf_head.")
VIT_PATCH_SIZE = 14  # the official loader sets vit_config.patch_size = 14 whatever the JSON says
DTYPES = {"bfloat16": ml_dtypes.bfloat16, "float32": np.float32}
# The defaults of the official config classes (InternRobotics/G2VLM modeling/qwen2vl/
# configuration_qwen2_vl.py: Qwen2VLConfig, Qwen2VLVisionConfig; modeling/dinov2_with_registers:
# Dinov2WithRegistersConfig) for the keys we read: the official loader builds its configs with
# `from_json_file`, so a key a JSON lacks takes these values there. `rope_scaling` (the M-RoPE sections)
# has no usable default and stays required.
OFFICIAL_DEFAULTS = {
    "text_config.json": {"vocab_size": 152064, "hidden_size": 8192, "intermediate_size": 29568,
                         "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": None,
                         "rms_norm_eps": 1e-05, "rope_theta": 1000000.0},
    "vit_config.json": {"depth": 32, "embed_dim": 1280, "hidden_size": 3584, "mlp_ratio": 4, "num_heads": 16,
                        "spatial_merge_size": 2, "temporal_patch_size": 2},
    "dino_config.json": {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "mlp_ratio": 4,
                         "image_size": 224, "patch_size": 16, "num_register_tokens": 4, "layerscale_value": 1.0,
                         "layer_norm_eps": 1e-6},
}
# Architecture switches a config may carry whose other values our model cannot represent.
FIXED_VALUES = {
    "text_config.json": {"hidden_act": "silu"},
    "vit_config.json": {"hidden_act": "quick_gelu", "in_channels": 3, "in_chans": 3},
    "dino_config.json": {"hidden_act": "gelu", "use_swiglu_ffn": False, "qkv_bias": True, "num_channels": 3},
}


# --------------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------------
def _read_json(ckpt_dir: pathlib.Path, name: str) -> dict:
    path = ckpt_dir / name
    if not path.is_file():
        raise ValueError(f"{path} is missing; an official G2VLM checkpoint directory holds "
                         f"{', '.join(CONFIG_FILES)} and {WEIGHTS_FILE} (download the whole directory)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download it") from e


def _get(cfg: dict, key: str, file: str):
    """`cfg[key]`; a key the file lacks takes the default of the official config class, as the official
    loader's `from_json_file` does (logged), and a key without such a default is an error."""
    if key in cfg:
        return cfg[key]
    defaults = OFFICIAL_DEFAULTS[file]
    if key not in defaults:
        raise ValueError(f"{file} has no {key!r}; it is not a Qwen2-VL / DINOv2 config as the official release "
                         "writes it (re-download the checkpoint, or add the key)")
    logging.warning("convert: %s has no %r; using %r, the default of the official config class", file, key,
                    defaults[key])
    return defaults[key]


def _check_fixed(configs: dict[str, dict]) -> None:
    for file, fixed in FIXED_VALUES.items():
        for key, value in fixed.items():
            if key in configs[file] and configs[file][key] != value:
                raise ValueError(f"{file}: {key}={configs[file][key]!r} is not supported (G2VLM uses {value!r}); "
                                 "this checkpoint is not a G2VLM model")


def config_from_official(ckpt_dir: str | pathlib.Path) -> config_lib.ModelConfig:
    """Our ModelConfig from the three official config JSONs (any size), read as the official loader reads them:
    a key a file lacks takes the official config class default (logged), head sizes absent: SPEC 2B values."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    return config_from_jsons({n: _read_json(ckpt_dir, n) for n in CONFIG_FILES})


def config_from_jsons(configs: dict[str, dict]) -> config_lib.ModelConfig:
    """`config_from_official` of the three config dicts {'text_config.json': ..., 'vit_config.json': ...,
    'dino_config.json': ...} (Qwen2-VL text and vision configs, DINOv2-with-registers config)."""
    _check_fixed(configs)
    tf, vf, df = CONFIG_FILES
    t, v, d = (configs[n] for n in CONFIG_FILES)
    hidden, heads = _get(t, "hidden_size", tf), _get(t, "num_attention_heads", tf)
    rope = _get(t, "rope_scaling", tf) or {}
    # The official attention uses hidden_size // num_attention_heads and ignores a `head_dim` key.
    head_dim = hidden // heads
    if t.get("head_dim", head_dim) != head_dim:
        logging.warning("convert: %s says head_dim=%s; the official model uses hidden_size // num_attention_heads "
                        "= %d, and so does g2vlm", tf, t["head_dim"], head_dim)
    kv_heads = _get(t, "num_key_value_heads", tf)
    text = config_lib.TextConfig(
        vocab_size=_get(t, "vocab_size", tf), hidden_size=hidden, num_layers=_get(t, "num_hidden_layers", tf),
        num_heads=heads, num_kv_heads=heads if kv_heads is None else kv_heads, head_dim=head_dim,
        mlp_hidden=_get(t, "intermediate_size", tf), rms_eps=_get(t, "rms_norm_eps", tf),
        rope_theta=float(_get(t, "rope_theta", tf)), mrope_sections=tuple(_get(rope, "mrope_section", tf)))
    vit_width = _get(v, "embed_dim", vf)
    if v.get("patch_size", VIT_PATCH_SIZE) != VIT_PATCH_SIZE:
        logging.warning("convert: %s says patch_size=%s; the official loader uses %d, and so does g2vlm",
                        vf, v["patch_size"], VIT_PATCH_SIZE)
    vit = config_lib.VitConfig(
        hidden_size=vit_width, num_layers=_get(v, "depth", vf), num_heads=_get(v, "num_heads", vf),
        mlp_hidden=int(vit_width * _get(v, "mlp_ratio", vf)), patch_size=VIT_PATCH_SIZE,
        temporal_patch_size=_get(v, "temporal_patch_size", vf), spatial_merge_size=_get(v, "spatial_merge_size", vf))
    if _get(v, "hidden_size", vf) != hidden:
        raise ValueError(f"{vf} hidden_size {v['hidden_size']} (the merger's output) differs from {tf} hidden_size "
                         f"{hidden}; the two files come from different checkpoints")
    dino_width, dino_patch = _get(d, "hidden_size", df), _get(d, "patch_size", df)
    dino = config_lib.DinoConfig(
        hidden_size=dino_width, num_layers=_get(d, "num_hidden_layers", df),
        num_heads=_get(d, "num_attention_heads", df),
        mlp_hidden=int(dino_width * _get(d, "mlp_ratio", df)), patch_size=dino_patch,
        num_registers=_get(d, "num_register_tokens", df), pos_grid=_get(d, "image_size", df) // dino_patch,
        layerscale_init=float(_get(d, "layerscale_value", df)), ln_eps=float(_get(d, "layer_norm_eps", df)))
    heads = config_lib.from_dict(config_lib.HeadsConfig, t.get(HEADS_KEY, {}))
    return config_lib.ModelConfig(text=text, vit=vit, dino=dino, heads=heads, use_vit=bool(t.get(USE_VIT_KEY, True)))


def official_config_files(cfg: config_lib.ModelConfig) -> dict[str, dict]:
    """The three official config JSONs for `cfg` (inverse of `config_from_official`)."""
    t, v, d = cfg.text, cfg.vit, cfg.dino
    if t.head_dim * t.num_heads != t.hidden_size:
        raise ValueError(f"text head_dim={t.head_dim} x num_heads={t.num_heads} != hidden_size={t.hidden_size}: the "
                         "official model derives head_dim = hidden_size // num_attention_heads and could not load it")
    text = {"architectures": ["Qwen2VLForConditionalGeneration"], "model_type": "qwen2_vl", "hidden_act": "silu",
            "vocab_size": t.vocab_size, "hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "head_dim": t.head_dim,
            "intermediate_size": t.mlp_hidden, "rms_norm_eps": t.rms_eps, "rope_theta": t.rope_theta,
            "rope_scaling": {"type": "mrope", "mrope_section": list(t.mrope_sections)},
            "tie_word_embeddings": False, "torch_dtype": "bfloat16"}
    if cfg.heads != config_lib.HeadsConfig():
        text[HEADS_KEY] = config_lib.to_dict(cfg.heads)
    if not cfg.use_vit:
        text[USE_VIT_KEY] = False
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


def _encoder_tensors(model: G2VLM) -> Iterator[tuple[str, tuple, nnx.Param, tuple[int, ...] | None]]:
    """(official name, our path, our Param, official shape of a kernel or None) of the encoders and heads.

    A kernel [in, out] is the transposed torch weight [out, in]; a patch kernel is a flattened conv.
    """
    conv = _conv_shapes(model.cfg)
    for module, prefix in _encoder_parts(model):
        for name, (path, var) in el.official_param_map(module, prefix).items():
            kernel = str(path[-1]) == "kernel"
            yield name, path, var, (conv.get(name, tuple(var.get_value().shape[::-1])) if kernel else None)


def _backbone_groups(cfg: config_lib.ModelConfig) -> dict[tuple, list]:
    """Our backbone path -> its `official_backbone_params` entries (one per layer of a stacked array)."""
    groups: dict[tuple, list] = {}
    for entry in official_backbone_params(cfg):
        groups.setdefault(entry[0], []).append(entry)
    return groups


def _abstract_model(cfg: config_lib.ModelConfig) -> G2VLM:
    return nnx.eval_shape(lambda: G2VLM(cfg, rngs=nnx.Rngs(0)))


def official_shapes(cfg: config_lib.ModelConfig, model: G2VLM | None = None) -> dict[str, tuple[int, ...]]:
    """{official name: official shape} of every tensor `to_official` writes, from `model` or an
    abstract model of `cfg` (nothing allocated)."""
    model = model or _abstract_model(cfg)
    shapes = {name: official or tuple(var.get_value().shape) for name, _, var, official in _encoder_tensors(model)}
    params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
    for path, layer, name, transposed in official_backbone_params(cfg):
        shape = tuple(params[path].get_value().shape)[0 if layer is None else 1:]
        shapes[name] = shape[::-1] if transposed else shape
    return shapes


def _names_error(kind: str, names: list[str]) -> ValueError:
    shown = ", ".join(names[:10]) + (f", ... ({len(names)} in all)" if len(names) > 10 else "")
    return ValueError(f"{kind} official tensors: {shown}; the config JSONs do not match model.safetensors "
                      "(or the file is not a G2VLM checkpoint)")


def _shape(state_dict: Mapping[str, np.ndarray], name: str) -> tuple[int, ...]:
    get_shape = getattr(state_dict, "shape", None)  # LazySafetensors: no read needed
    return get_shape(name) if get_shape else tuple(np.shape(state_dict[name]))


def check_state_dict(state_dict: Mapping[str, np.ndarray], cfg: config_lib.ModelConfig,
                     model: G2VLM | None = None) -> None:
    """Raises ValueError listing missing, unexpected or misshapen official tensors for `cfg`."""
    expected = official_shapes(cfg, model)
    missing = sorted(n for n in expected if n not in state_dict)
    if missing:
        raise _names_error("missing", missing)
    unexpected = sorted(n for n in state_dict if n not in expected and not n.startswith(IGNORED_PREFIXES))
    if unexpected:
        raise _names_error("unexpected", unexpected)
    misshapen = sorted(f"{n} {_shape(state_dict, n)} (expected {expected[n]})" for n in state_dict
                       if n in expected and _shape(state_dict, n) != expected[n])
    if misshapen:
        raise _names_error("misshapen", misshapen)


def _ignored(state_dict: Mapping[str, np.ndarray], model: G2VLM) -> list[str]:
    """Names of `state_dict` that `from_official` skips (IGNORED_PREFIXES, not expected by `model`)."""
    expected = official_shapes(model.cfg, model)
    return [n for n in state_dict if n not in expected and n.startswith(IGNORED_PREFIXES)]


def from_official(state_dict: Mapping[str, np.ndarray], config: config_lib.ModelConfig) -> G2VLM:
    """A G2VLM (parameters in `config.param_dtype`) holding the official tensors `state_dict`.

    state_dict: {official name: array}, e.g. `read_official_dir(...)[1]` or `to_official(model)`.
    Built abstractly first (no random initialisation is paid for); every tensor is checked by
    `check_state_dict` before anything is converted.
    """
    model = _abstract_model(config)
    check_state_dict(state_dict, config, model)
    groups = _backbone_groups(config)
    total = sum(len(el.official_param_map(m, p)) for m, p in _encoder_parts(model)) + sum(map(len, groups.values()))
    with progress(total=total, unit="tensor", desc="official -> g2vlm", leave=False) as bar:
        for module, prefix in _encoder_parts(model):
            bar.update(len(el.load_official(module, state_dict, prefix)))
        params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        for path, entries in groups.items():
            layers = [_transpose_if(np.asarray(state_dict[name]), transposed) for _, _, name, transposed in entries]
            value = np.stack(layers) if entries[0][1] is not None else layers[0]
            params[path].set_value(jnp.asarray(value, dtype=params[path].get_value().dtype))
            bar.update(len(entries))
    skipped = sorted({k.split(".")[0] for k in _ignored(state_dict, model)})
    if skipped:
        logging.warning("convert: skipped tensors the official inference model does not use either: %s.*",
                        ".*, ".join(skipped))
    return model


def _transpose_if(value: np.ndarray, transposed: bool) -> np.ndarray:
    """torch Linear weight [out, in] <-> our kernel [in, out] (its own inverse)."""
    return value.T if transposed else value


def to_official(model: G2VLM, dtype: str = "float32") -> dict[str, np.ndarray]:
    """{official name: array in `dtype`} of every parameter, in the official layout (exact inverse of
    `from_official`); each tensor is cast as it is produced, so a bf16 export never holds a whole fp32 copy."""
    np_dtype = _np_dtype(dtype)
    cfg = model.cfg
    out: dict[str, np.ndarray] = {}
    encoders = list(_encoder_tensors(model))
    total = len(encoders) + len(official_backbone_params(cfg))
    with progress(total=total, unit="tensor", desc="g2vlm -> official", leave=False) as bar:
        for name, _, var, official in encoders:
            value = np.asarray(var.get_value())
            out[name] = np.ascontiguousarray((value.T.reshape(official) if official else value).astype(np_dtype))
            bar.update()
        params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
        for path, entries in _backbone_groups(cfg).items():
            value = np.asarray(params[path].get_value())  # one host copy per stacked array, sliced per layer
            for _, layer, name, transposed in entries:
                one = value[layer] if layer is not None else value
                out[name] = np.ascontiguousarray(_transpose_if(one, transposed).astype(np_dtype))
                bar.update()
    return out


def _np_dtype(dtype: str):
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported for official tensors; choose one of {list(DTYPES)}")
    return DTYPES[dtype]


# --------------------------------------------------------------------------------------------------
# Directories
# --------------------------------------------------------------------------------------------------
class LazySafetensors(Mapping):
    """Read-only {name: np.ndarray} over one or more safetensors files; a tensor is read on access.

    Converting a 2B checkpoint then holds one tensor at a time next to the model, not the whole file.
    """

    def __init__(self, files: list[pathlib.Path]):
        from safetensors import safe_open

        self._handles, self._where = [], {}
        for path in files:
            try:
                handle = safe_open(str(path), framework="numpy")
            except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
                raise ValueError(f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
                                 "re-download it") from e
            self._handles.append(handle)
            self._where.update({k: handle for k in handle.keys()})

    def __getitem__(self, name: str) -> np.ndarray:
        return self._where[name].get_tensor(name)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name].get_slice(name).get_shape())

    def __iter__(self):
        return iter(self._where)

    def __len__(self) -> int:
        return len(self._where)


def weight_files(ckpt_dir: pathlib.Path) -> list[pathlib.Path]:
    """model.safetensors, or the shards of model.safetensors.index.json; pickles are refused."""
    if (ckpt_dir / WEIGHTS_FILE).is_file():
        return [ckpt_dir / WEIGHTS_FILE]
    if (ckpt_dir / WEIGHTS_INDEX).is_file():
        weight_map = _get(_read_json(ckpt_dir, WEIGHTS_INDEX), "weight_map", WEIGHTS_INDEX)
        shards = [ckpt_dir / name for name in sorted(set(weight_map.values()))]
        absent = [s.name for s in shards if not s.is_file()]
        if absent:
            raise ValueError(f"{ckpt_dir}: shards {absent} named by {WEIGHTS_INDEX} are missing; download them")
        return shards
    pickled = sorted(p.name for p in ckpt_dir.glob("*") if p.suffix in PICKLE_SUFFIXES)
    hint = (f"; {', '.join(pickled)} are pickle files, which g2vlm never loads (they can run arbitrary code): "
            "convert them to safetensors with the tool that wrote them") if pickled else ""
    raise ValueError(f"{ckpt_dir / WEIGHTS_FILE} is missing{hint}")


def read_official_dir(ckpt_dir: str | pathlib.Path) -> tuple[config_lib.ModelConfig, LazySafetensors]:
    """(config, lazily read state dict) of an official checkpoint directory; safetensors only."""
    ckpt_dir = pathlib.Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise ValueError(f"{ckpt_dir} is not a directory; pass the downloaded G2VLM checkpoint directory")
    cfg = config_from_official(ckpt_dir)
    return cfg, LazySafetensors(weight_files(ckpt_dir))


def load_official_dir(ckpt_dir: str | pathlib.Path,
                      param_dtype: str = "float32") -> tuple[config_lib.ModelConfig, G2VLM]:
    """(config, model) of an official checkpoint directory, parameters in `param_dtype`."""
    cfg, state_dict = read_official_dir(ckpt_dir)
    cfg = dataclasses.replace(cfg, param_dtype=param_dtype)
    return cfg, from_official(state_dict, cfg)


def write_official_dir(model: G2VLM, out_dir: str | pathlib.Path, *, dtype: str = "bfloat16",
                       tokenizer_dir: str | pathlib.Path | None = None) -> pathlib.Path:
    """Writes out_dir/model.safetensors (`dtype`) + the three config JSONs (+ the tokenizer files
    found in `tokenizer_dir`): the layout of the official release, readable by its loader."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(to_official(model, dtype), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    # safetensors writes through a private temporary file (mode 0600); give it the mode of an ordinary file.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(out / WEIGHTS_FILE, 0o666 & ~umask)
    for name, content in official_config_files(model.cfg).items():
        (out / name).write_text(json.dumps(content, indent=2))
    if tokenizer_dir:
        for name in TOKENIZER_FILES:
            if (pathlib.Path(tokenizer_dir) / name).is_file():
                shutil.copy(pathlib.Path(tokenizer_dir) / name, out / name)
    return out
