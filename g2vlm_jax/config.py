"""Typed, frozen experiment configuration.

An experiment is a Python module under `experiments/` whose `get_config(arg: str = "")` returns an
`ExperimentConfig`. Every field carries a docstring-style comment; `validate()` runs on
construction and names the bad field and the allowed values. Command-line overrides use
`--set section.sub.field=value` and are parsed against the field's declared type (no silent
fallbacks: an unknown key or a value of the wrong type is an error).
"""
from __future__ import annotations

import contextvars
import dataclasses
import importlib.util
import json
import pathlib
import sys
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix.

    `field` is the field the check names and `related` the other fields its condition reads, so that
    `apply_overrides` can name the one the user set.
    """

    def __init__(self, message: str, field: str = "", related: tuple[str, ...] = ()):
        super().__init__(message)
        self.field, self.related = field, related


# The names a config may choose from, defined once; the modules that implement them import these.
GeoMode = Literal["global", "frame", "mixed", "block_causal"]  # cross-frame attention (model/mask.py)
GEO_MODES: tuple[str, ...] = get_args(GeoMode)
AttentionKernel = Literal["auto", "xla", "blockwise", "cpu_fused", "tpu_flash", "cudnn"]  # model/attention.py
ATTENTION_KERNELS: tuple[str, ...] = get_args(AttentionKernel)
Evaluator = Literal["reconstruction", "spatial_qa"]  # held-out evaluators (g2vlm_jax/evaluation/)
EVALUATORS: tuple[str, ...] = get_args(Evaluator)


# Overrides are applied one at a time; validation waits until all are in (else `total_steps=5`
# followed by `warmup_steps=1` would fail on the intermediate state).
_DEFER_VALIDATION = contextvars.ContextVar("defer_validation", default=False)


def _require(cond: bool, field: str, message: str, related: tuple[str, ...] = ()) -> None:
    """Raises ConfigError naming `field` unless `cond`; `related` are the other fields `cond` reads."""
    if not cond:
        raise ConfigError(f"config field '{field}': {message}", field, related)


def _check_literal(obj: Any, prefix: str) -> None:
    """Validates every Literal-typed field of a dataclass against its allowed values."""
    hints = get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        hint = hints[f.name]
        if get_origin(hint) is Literal:
            allowed = get_args(hint)
            value = getattr(obj, f.name)
            _require(value in allowed, f"{prefix}{f.name}", f"got {value!r}; allowed values are {list(allowed)}")


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The language backbone (Qwen2-VL text model); each layer holds both MoT experts."""

    vocab_size: int = 151936  # token vocabulary (Qwen2: 151936; sentencepiece configs: any)
    hidden_size: int = 1536  # model width D
    num_layers: int = 28  # decoder layers, each with a semantic and a geometry expert
    num_heads: int = 12  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA); num_heads must be a multiple
    head_dim: int = 128  # per-head width
    mlp_hidden: int = 8960  # SwiGLU hidden width
    rms_eps: float = 1e-6  # RMSNorm epsilon (computed in fp32)
    rope_theta: float = 1e6  # M-RoPE base
    mrope_sections: tuple[int, int, int] = (16, 24, 24)  # (t, h, w) frequency slots; sum = head_dim/2
    layerscale_init: float = 0.01  # geometry-only LayerScale ls1/ls2 initial value

    def validate(self, prefix: str = "model.text.") -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim", "mlp_hidden"):
            _require(getattr(self, name) > 0, prefix + name, "must be a positive integer")
        _require(self.num_heads % self.num_kv_heads == 0, prefix + "num_heads",
                 f"must be a multiple of num_kv_heads={self.num_kv_heads}")
        _require(self.head_dim % 2 == 0, prefix + "head_dim", "must be even (rotary halves)")
        _require(len(self.mrope_sections) == 3 and sum(self.mrope_sections) == self.head_dim // 2,
                 prefix + "mrope_sections", f"must be 3 ints summing to head_dim/2={self.head_dim // 2}")


@dataclasses.dataclass(frozen=True)
class VitConfig:
    """Semantic encoder: the Qwen2-VL vision tower (frozen in every official stage)."""

    hidden_size: int = 1280  # ViT width
    num_layers: int = 32  # transformer blocks
    num_heads: int = 16  # attention heads (head dim = hidden/heads = 80)
    mlp_hidden: int = 5120  # QuickGELU MLP width
    patch_size: int = 14  # spatial patch
    temporal_patch_size: int = 2  # Conv3d time kernel; still images are repeated along time
    spatial_merge_size: int = 2  # merger groups merge x merge patches into one LLM token
    rope_theta: float = 10000.0  # 2-D vision RoPE base
    ln_eps: float = 1e-6  # LayerNorm epsilon
    image_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)  # CLIP mean
    image_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)  # CLIP std

    def validate(self, prefix: str = "model.vit.") -> None:
        _require(self.hidden_size % self.num_heads == 0, prefix + "hidden_size", "must divide by num_heads")
        _require((self.hidden_size // self.num_heads) % 4 == 0, prefix + "num_heads",
                 "head dim must be a multiple of 4 (2-D rotary over rows and columns)")


@dataclasses.dataclass(frozen=True)
class DinoConfig:
    """Geometry encoder: DINOv2 with registers (frozen in every official stage)."""

    hidden_size: int = 1024  # width
    num_layers: int = 24  # pre-LN blocks
    num_heads: int = 16  # attention heads
    mlp_hidden: int = 4096  # exact-GELU MLP width
    patch_size: int = 14  # patch conv kernel = stride
    num_registers: int = 4  # register tokens inserted after CLS (no position embedding)
    pos_grid: int = 37  # learned position-embedding grid side (518/14); interpolated bicubically
    # Initial std of the position embeddings (the official init, 0.02; the converted release overwrites it).
    # A tiny random DINO stands in for a pretrained one, whose features say where each patch is; at 0.02 the
    # position is ~50x below the patch content and its tokens do not carry it (see tiny_model).
    position_init_std: float = 0.02
    layerscale_init: float = 1.0  # LayerScale initial value
    ln_eps: float = 1e-6  # LayerNorm epsilon
    image_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # ImageNet mean
    image_std: tuple[float, float, float] = (0.229, 0.224, 0.225)  # ImageNet std

    def validate(self, prefix: str = "model.dino.") -> None:
        _require(self.hidden_size % self.num_heads == 0, prefix + "hidden_size", "must divide by num_heads")
        _require(self.num_registers >= 0, prefix + "num_registers", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class HeadsConfig:
    """Pi3-style geometry decoders and heads on the final-normed geometry tokens."""

    decoder_layers: int = 5  # blocks in each of point/camera/global-points decoders
    decoder_heads: int = 16  # heads of the decoders (head dim = text.hidden_size / heads)
    mlp_ratio: int = 4  # decoder MLP width = ratio * D
    rope_base: float = 100.0  # 2-D RoPE base of the decoders (CroCo form)
    point_dim: int = 1024  # point decoder `linear_out` width (input of Pi3LinearPts3d)
    camera_dim: int = 512  # camera decoder `linear_out` width (input of the camera head)
    ln_eps: float = 1e-6  # decoder LayerNorm epsilon
    confidence: bool = False  # optional confidence head (not in the released model)

    def validate(self, prefix: str = "model.heads.") -> None:
        _require(self.decoder_layers > 0, prefix + "decoder_layers", "must be positive")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The whole G2VLM network."""

    text: TextConfig = TextConfig()
    vit: VitConfig = VitConfig()
    dino: DinoConfig = DinoConfig()
    heads: HeadsConfig = HeadsConfig()
    geo_attention: GeoMode = "global"  # SPEC 1.4 cross-frame mode
    geo_init: Literal["scratch", "copy_semantic"] = "scratch"  # geometry expert init (official: scratch)
    attention_kernel: AttentionKernel = "auto"  # see model/attention.py
    attention_block_size: int = 512  # query/key block of the blockwise and tpu_flash kernels
    compute_dtype: Literal["float32", "bfloat16"] = "bfloat16"  # activations / matmul inputs
    param_dtype: Literal["float32", "bfloat16"] = "float32"  # master weights
    scan_layers: bool = True  # jax.lax.scan over decoder layers (one compiled layer body)
    remat_policy: Literal["none", "full", "dots", "dots_no_batch"] = "full"  # activation checkpointing
    freeze_und: bool = False  # stop gradients through the semantic tokens (activation level, SPEC 1.1)
    freeze_recon: bool = False  # stop gradients through the geometry tokens
    freeze_vit: bool = True  # semantic encoder frozen (all official stages)
    freeze_dino: bool = True  # geometry encoder frozen (all official stages)
    use_vit: bool = True  # build the semantic encoder (off for reconstruction-only experiments)

    def validate(self, prefix: str = "model.") -> None:
        _check_literal(self, prefix)
        self.text.validate(prefix + "text.")
        self.vit.validate(prefix + "vit.")
        self.dino.validate(prefix + "dino.")
        self.heads.validate(prefix + "heads.")
        _require(self.text.hidden_size % self.heads.decoder_heads == 0, prefix + "heads.decoder_heads",
                 f"must divide text.hidden_size={self.text.hidden_size}")
        _require((self.text.hidden_size // self.heads.decoder_heads) % 4 == 0, prefix + "heads.decoder_heads",
                 "decoder head dim must be a multiple of 4 (2-D rotary)")
        _require(self.attention_block_size > 0, prefix + "attention_block_size", "must be positive")

    def __post_init__(self):
        if not _DEFER_VALIDATION.get():
            self.validate()


def g2vlm_2b_model(**overrides: Any) -> ModelConfig:
    """The official G2VLM-2B-MoT shapes (SPEC 1.1-1.6)."""
    return ModelConfig(**overrides)


def tiny_model(**overrides: Any) -> ModelConfig:
    """A tiny model with every structural feature of the 2B one; runs a step in seconds on CPU."""
    base = dict(
        text=TextConfig(vocab_size=512, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16,
                        mlp_hidden=128, mrope_sections=(2, 3, 3)),
        vit=VitConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_hidden=64),
        # position_init_std=1.0: with the official 0.02 the frozen random DINO's tokens do not say where they
        # are (ridge probe of a trained stage-1 model's geometry tokens: patch row R^2 0.0, object depth 0.02);
        # at 1.0 they do (row 0.87, depth 0.55), which is what the semantic expert reads in stage 2.
        dino=DinoConfig(hidden_size=32, num_layers=2, num_heads=2, mlp_hidden=64, pos_grid=4, position_init_std=1.0),
        heads=HeadsConfig(decoder_layers=2, decoder_heads=4, point_dim=32, camera_dim=32),
        compute_dtype="float32",
        remat_policy="none",
    )
    base.update(overrides)
    return ModelConfig(**base)


# --------------------------------------------------------------------------------------------------
# Data, losses, optimiser, mesh, checkpoints, evaluation
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class DataSource:
    """One dataset in a mixture."""

    name: str = "synthetic"  # dataset name ('synthetic', 'synthetic_qa', or a tfds builder name)
    kind: Literal["recon", "recon_qa", "vqa"] = "recon"  # sample layout (SPEC 1.4)
    weight: float = 1.0  # mixture weight (normalised over sources)
    data_dir: str = ""  # where the ArrayRecord/tfds files live ('' = <workdir>/data, built on demand)
    synthetic_scenes: tuple[int, int, int] = (512, 32, 32)  # train/validation/test scenes of synthetic sources
    qa_tasks: tuple[str, ...] = ()  # synthetic_qa: the task families asked (() = all of spatial_qa.TASKS)
    qa_per_task: int = 1  # synthetic_qa: questions per task family and scene
    qa_fixed_order: tuple[str, ...] = ()  # synthetic_qa: choice families whose options are not shuffled

    def validate(self, prefix: str) -> None:
        from data_pipelines.synthetic.spatial_qa import TASKS  # imported here: data_pipelines imports this module

        _check_literal(self, prefix)
        _require(self.weight > 0, prefix + "weight", "must be > 0")
        unknown = sorted(set(self.qa_tasks) - set(TASKS))
        _require(not unknown, prefix + "qa_tasks", f"has unknown task families {unknown}; known: {list(TASKS)}")
        _require(self.qa_per_task > 0, prefix + "qa_per_task", "must be > 0")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline: records -> sampled views -> sequences -> packs -> global batches."""

    sources: tuple[DataSource, ...] = (DataSource(),)  # training mixture
    eval_sources: tuple[DataSource, ...] = (DataSource(),)  # held-out evaluation sets (split below)
    eval_split: str = "validation"  # held-out split evaluated during and after training
    tokenizer: str = "sentencepiece:builtin"  # 'sentencepiece:builtin' | 'sentencepiece:PATH' | 'qwen2:PATH'
    image_size: tuple[int, int] = (224, 224)  # geometry frame (H, W) at stage start; multiples of 14
    vit_image_size: tuple[int, int] = (756, 756)  # semantic-encoder image (H, W); multiples of 28
    view_buckets: tuple[int, ...] = (2, 4, 8, 16, 24)  # allowed frame counts V (static shapes)
    min_views: int = 2  # smallest V drawn per pack
    max_views: int = 24  # largest V drawn per pack
    aspect_range: tuple[float, float] = (1.0, 1.0)  # H/W drawn per step (stage 1b: 0.5..1.0)
    aspect_buckets: int = 4  # evenly spaced aspect levels in aspect_range (one compiled program each)
    tokens_per_pack: int = 25600  # token budget of one packed row
    packs_per_step: int = 8  # global batch size in packs (divisible by the data-parallel size)
    max_text_tokens: int = 512  # longer text items are skipped (counted) or rejected (strict)
    num_workers: int = 0  # Grain worker processes per JAX process
    strict: bool = False  # raise on a bad record instead of counting and skipping it
    augment: bool = True  # crop/scale jitter and colour jitter on geometry images
    seed: int = 0  # data seed; batches are a pure function of (seed, step)

    def validate(self, prefix: str = "data.") -> None:
        _require(len(self.sources) > 0, prefix + "sources", "needs at least one DataSource")
        for i, s in enumerate(self.sources):
            s.validate(f"{prefix}sources[{i}].")
        for name, size, mult in (("image_size", self.image_size, 14), ("vit_image_size", self.vit_image_size, 28)):
            _require(len(size) == 2 and all(x > 0 and x % mult == 0 for x in size), prefix + name,
                     f"got {size}; both sides must be positive multiples of {mult}")
        _require(2 <= self.min_views <= self.max_views, prefix + "min_views",
                 f"need 2 <= min_views <= max_views; min_views={self.min_views}, max_views={self.max_views}",
                 (prefix + "max_views",))
        _require(tuple(sorted(self.view_buckets)) == tuple(self.view_buckets) and self.view_buckets[-1] >= self.max_views,
                 prefix + "view_buckets", f"{self.view_buckets} must be increasing and reach max_views={self.max_views}",
                 (prefix + "max_views",))
        _require(0 < self.aspect_range[0] <= self.aspect_range[1], prefix + "aspect_range", "need 0 < lo <= hi")
        _require(self.aspect_buckets >= 1, prefix + "aspect_buckets", "must be >= 1")
        _require(self.tokens_per_pack > 0, prefix + "tokens_per_pack", f"must be positive, got {self.tokens_per_pack}")
        _require(self.packs_per_step > 0, prefix + "packs_per_step", f"must be positive, got {self.packs_per_step}")
        _require(self.num_workers >= 0, prefix + "num_workers", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """Loss weights (SPEC 2)."""

    ce_weight: float = 1.0  # w_ce
    vg_weight: float = 1.0  # w_vg
    camera_weight: float = 0.2  # lambda_cam (released code)
    translation_weight: float = 100.0  # alpha inside L_cam (released code; the paper states 200)
    normal_weight: float = 1.0  # weight of the normal loss
    global_points_weight: float = 1.0  # weight of the global point loss
    clip_above: float = 0.0  # zero a sample's VG loss above this value (paper stage 1); 0 = off
    subtract_floors: bool = True  # a perfect prediction scores 0 (False: the official clamp floors stay in)
    confidence_weight: float = 0.05  # BCE weight of the optional confidence head


# The parameter groups (core/optim.py) each optim.stage trains; the encoders follow model.freeze_vit/dino.
STAGE_GROUPS: dict[str, tuple[str, ...]] = {
    "stage1": ("geometry", "dino2llm", "heads"),
    "stage2": ("semantic", "embed", "lm_head"),
    "stage2_sr": ("semantic", "embed", "lm_head", "geometry", "dino2llm", "heads"),
    "all": ("semantic", "embed", "lm_head", "geometry", "dino2llm", "heads", "vit", "dino"),
}


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with warmup + cosine, grad clipping, per-stage trainable groups."""

    stage: Literal["stage1", "stage2", "stage2_sr", "all"] = "stage1"  # which parameter groups train (SPEC 3)
    learning_rate: float = 2e-4  # peak learning rate
    min_learning_rate: float = 1e-7  # cosine floor
    warmup_steps: int = 5000  # linear warmup steps
    total_steps: int = 100_000  # schedule length and run length
    b1: float = 0.9  # Adam beta1
    b2: float = 0.95  # Adam beta2
    eps: float = 1e-15  # Adam epsilon
    weight_decay: float = 0.0  # decoupled weight decay
    grad_clip_norm: float = 1.0  # global gradient-norm clip
    grad_accum_steps: int = 1  # micro-batches per optimiser update
    lr_multipliers: tuple[tuple[str, float], ...] = ()  # (parameter-group, multiplier), e.g. (("heads", 2.0),)
    max_nonfinite_steps: int = 5  # stop after this many consecutive non-finite steps (each is skipped)

    def validate(self, prefix: str = "optim.") -> None:
        _check_literal(self, prefix)
        _require(self.learning_rate > 0, prefix + "learning_rate", f"must be > 0, got {self.learning_rate}")
        _require(self.total_steps > 0, prefix + "total_steps", f"must be > 0, got {self.total_steps}")
        _require(0 <= self.warmup_steps <= self.total_steps, prefix + "warmup_steps",
                 f"must be in [0, total_steps]; warmup_steps={self.warmup_steps}, total_steps={self.total_steps}",
                 (prefix + "total_steps",))
        _require(self.grad_accum_steps >= 1, prefix + "grad_accum_steps", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh ('data', 'fsdp', 'tensor'); -1 fills with the remaining devices."""

    preset: Literal["dp", "fsdp", "fsdp_tp"] = "fsdp"  # logical-axis rules table (g2vlm_jax/sharding.py)
    data: int = 1  # data-parallel replicas
    fsdp: int = -1  # parameter/optimizer-state sharding axis
    tensor: int = 1  # tensor-parallel axis (heads / MLP)

    def validate(self, prefix: str = "mesh.") -> None:
        _check_literal(self, prefix)
        sizes = (self.data, self.fsdp, self.tensor)
        _require(all(s == -1 or s >= 1 for s in sizes), prefix + "data", "axis sizes must be >= 1 or -1")
        _require(sum(s == -1 for s in sizes) <= 1, prefix + "fsdp", "at most one axis may be -1")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    """Orbax checkpointing of train state + data-iterator state."""

    every_steps: int = 1000  # save period
    keep_last: int = 3  # newest checkpoints kept
    keep_every: int = 0  # additionally keep every Nth step forever (0 = off)
    async_save: bool = True  # write in the background
    save_on_preemption: bool = True  # save when SIGTERM arrives
    # Multi-process runs agree on a SIGTERM every N steps (one host all-gather each time, so that
    # every process stops and saves at the same step); a single process checks every step.
    preemption_check_every_steps: int = 5
    init_from: str = ""  # converted checkpoint of an earlier stage / the official release ('' = random)
    # Where the train-state checkpoints go ('' = <workdir>/checkpoints). Any path Orbax writes,
    # e.g. gs://BUCKET/runs/NAME/checkpoints, so that every host of a pod sees the same checkpoints
    # while logs and reports stay in the (host-local) workdir.
    directory: str = ""


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    """Evaluators run on held-out splits during and after training."""

    evaluators: tuple[str, ...] = ("reconstruction",)  # 'reconstruction', 'spatial_qa'
    every_steps: int = 0  # evaluate during training every N steps (0 = only at the end)
    num_batches: int = 4  # held-out batches per evaluation
    max_new_tokens: int = 16  # generation length for QA evaluators
    qa_per_task: int = 50  # spatial_qa: held-out questions per task family
    qa_batch_size: int = 32  # spatial_qa: questions answered together (one prefill and decode batch)

    def validate(self, prefix: str = "eval.") -> None:
        for e in self.evaluators:
            _require(e in EVALUATORS, prefix + "evaluators", f"unknown evaluator {e!r}; allowed values are {list(EVALUATORS)}")
        _require(self.qa_per_task > 0, prefix + "qa_per_task", "must be > 0")
        _require(self.qa_batch_size > 0, prefix + "qa_batch_size", "must be > 0")


@dataclasses.dataclass(frozen=True)
class ExperimentConfig:
    """Everything one run needs; `get_config()` of an experiment module returns one."""

    name: str = "experiment"  # run name (used in logs and reports)
    model: ModelConfig = ModelConfig()
    data: DataConfig = DataConfig()
    loss: LossConfig = LossConfig()
    optim: OptimConfig = OptimConfig()
    mesh: MeshConfig = MeshConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    eval: EvalConfig = EvalConfig()
    workdir: str = ""  # output directory ('' = ./runs/<name>)
    seed: int = 0  # parameter-init seed
    log_every: int = 10  # console/TensorBoard/JSONL logging period
    profile_steps: tuple[int, int] = (0, 0)  # [start, stop) steps of a jax.profiler trace; (0,0) = off

    def __post_init__(self):
        if not _DEFER_VALIDATION.get():
            self.validate()

    @property
    def run_dir(self) -> pathlib.Path:
        """Absolute run directory: `workdir`, or ./runs/<name>."""
        return pathlib.Path(self.workdir or f"runs/{self.name}").absolute()

    @property
    def checkpoint_dir(self) -> str:
        """Train-state checkpoints: `checkpoint.directory` (a local path or a URL such as gs://...),
        or <run_dir>/checkpoints."""
        return self.checkpoint.directory or str(self.run_dir / "checkpoints")

    def validate(self) -> None:
        self.model.validate()
        self.data.validate()
        self.optim.validate()
        self.mesh.validate()
        self.eval.validate()
        _require(self.log_every > 0, "log_every", "must be > 0")
        _require(self.checkpoint.preemption_check_every_steps > 0, "checkpoint.preemption_check_every_steps",
                 "must be > 0")
        self._check_frozen_parts_agree_with_the_stage()

    def _check_frozen_parts_agree_with_the_stage(self) -> None:
        """The optimiser trains the stage's experts (STAGE_GROUPS) and unfrozen encoders; the model's freeze
        flags stop gradients inside the forward. A part the optimiser trains behind a stop-gradient silently
        never changes, so such a config is refused with the one-flag fix."""
        m, stage = self.model, self.optim.stage
        for expert, flag in (("geometry", "freeze_recon"), ("semantic", "freeze_und")):
            _require(not (expert in STAGE_GROUPS[stage] and getattr(m, flag)), f"model.{flag}",
                     f"is True (no gradient reaches the {expert} expert) but optim.stage={stage!r} trains it; set "
                     f"model.{flag}=false, or an optim.stage that leaves the {expert} expert out")
        _require(m.freeze_dino or not m.freeze_recon, "model.freeze_dino",
                 "is False but model.freeze_recon=True stops every gradient to the DINO encoder (its tokens reach a "
                 "loss only through the geometry expert); set model.freeze_recon=false or model.freeze_dino=true")
        _require(m.freeze_vit or not m.use_vit or not m.freeze_und, "model.freeze_vit",
                 "is False but model.freeze_und=True stops every gradient to the ViT (its tokens reach the CE only "
                 "through the semantic expert); set model.freeze_und=false or model.freeze_vit=true")


# --------------------------------------------------------------------------------------------------
# Overrides, loading, serialisation
# --------------------------------------------------------------------------------------------------
def _parse_value(text: str, hint: Any, field: str) -> Any:
    """Parses `text` as a value of type `hint` (str/int/float/bool/Literal/tuple)."""
    origin = get_origin(hint)
    try:
        if origin is Literal:
            allowed = get_args(hint)
            _require(text in allowed, field, f"got {text!r}; allowed values are {list(allowed)}")
            return text
        if hint is bool:
            _require(text.lower() in ("true", "false", "1", "0"), field, f"expected true/false, got {text!r}")
            return text.lower() in ("true", "1")
        if hint in (int, float):
            return hint(text)
        if hint is str:
            return text
        if origin is tuple:
            value = json.loads(text) if text.strip().startswith("[") else [t for t in text.split(",") if t.strip()]
            args = get_args(hint)
            item = args[0] if len(args) == 2 and args[1] is Ellipsis else None
            if item is None:
                _require(len(value) == len(args), field, f"expected {len(args)} comma-separated values")
                return tuple(_parse_value(str(v), a, field) for v, a in zip(value, args))
            if dataclasses.is_dataclass(item):
                _require(False, field, "set tuples of sections in the experiment module, not on the command line")
            if get_origin(item) is tuple:
                return tuple(tuple(v) for v in value)
            return tuple(_parse_value(str(v), item, field) for v in value)
    except ConfigError:
        raise
    except (ValueError, json.JSONDecodeError) as e:
        raise ConfigError(f"config field '{field}': cannot parse {text!r} as {hint}: {e}") from None
    raise ConfigError(f"config field '{field}': type {hint} cannot be set from the command line")


def override(cfg: Any, assignment: str) -> Any:
    """Returns `cfg` with one `a.b.c=value` assignment applied (validated, typed)."""
    _require("=" in assignment, assignment, "overrides look like section.field=value")
    key, text = assignment.split("=", 1)
    path = key.strip().split(".")

    def apply(node: Any, parts: list[str], done: str) -> Any:
        names = {f.name for f in dataclasses.fields(node)}
        head = parts[0]
        full = done + head
        _require(head in names, full, f"unknown key; valid keys here are {sorted(names)}")
        if len(parts) == 1:
            hint = get_type_hints(type(node))[head]
            _require(not dataclasses.is_dataclass(hint), full, "is a section; set one of its fields")
            return dataclasses.replace(node, **{head: _parse_value(text.strip(), hint, full)})
        child = getattr(node, head)
        _require(dataclasses.is_dataclass(child), full, "is not a section")
        return dataclasses.replace(node, **{head: apply(child, parts[1:], full + ".")})

    return apply(cfg, path, "")


def apply_overrides(cfg: Any, assignments: typing.Sequence[str]) -> Any:
    """Applies `a.b=value` assignments in order, then validates the result once."""
    token = _DEFER_VALIDATION.set(True)
    try:
        for a in assignments:
            cfg = override(cfg, a)
    finally:
        _DEFER_VALIDATION.reset(token)
    try:
        cfg.validate()
    except ConfigError as e:
        # A check that fails because of a field the user set, but names another one (total_steps=1000 under
        # the experiment's warmup_steps=5000): say which setting caused it and what to change with it.
        set_here = {a.split("=", 1)[0].strip(): a.split("=", 1)[1].strip() for a in assignments if "=" in a}
        caused = [f for f in e.related if f in set_here]
        if e.field and e.field not in set_here and caused:
            raise ConfigError(f"config field '{caused[0]}' (set to {set_here[caused[0]]}) conflicts with "
                              f"'{e.field}': {str(e).split(': ', 1)[1]}; set {e.field} as well", caused[0],
                              (e.field,)) from None
        raise
    return cfg


def load_experiment(spec: str, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Loads `experiments/NAME.py[:ARG]`, calls `get_config(ARG)` and applies overrides."""
    path_text, _, arg = spec.partition(":")
    path = pathlib.Path(path_text)
    if not path.is_file():
        raise ConfigError(f"experiment file {path_text!r} not found; pass --experiment experiments/NAME.py[:ARG]")
    module_name = f"g2vlm_experiment_{path.stem}"
    spec_obj = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec_obj)
    sys.modules[module_name] = module
    spec_obj.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment {path_text!r} defines no get_config(arg: str = '')")
    cfg = module.get_config(arg)
    if not isinstance(cfg, ExperimentConfig):
        raise ConfigError(f"experiment {path_text!r}: get_config returned {type(cfg).__name__}, not ExperimentConfig")
    return apply_overrides(cfg, overrides)


def to_dict(cfg: Any) -> Any:
    """A JSON-able nested dict of a config (for golden snapshots and checkpoint metadata)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (tuple, list)):
        return [to_dict(v) for v in cfg]
    return cfg


def from_dict(cls: type, data: dict) -> Any:
    """Inverse of `to_dict` for a dataclass type; unknown keys are an error."""
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"{cls.__name__}: unknown keys {sorted(unknown)}; this checkpoint/config is from another version")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _from_json(value, hints[name])
    return cls(**kwargs)


def _from_json(value: Any, hint: Any) -> Any:
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value)
    if get_origin(hint) is tuple:
        args = get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_from_json(v, args[0]) for v in value)
        return tuple(_from_json(v, a) for v, a in zip(value, args))
    return value


# Fields a resumed run may change freely: where and how it runs and saves, not what it computes (a
# resume is exact whatever the mesh or checkpoint schedule; `checkpoint.init_from` only acts at step 0).
RESUME_FREE_FIELDS = ("mesh.", "data.num_workers", "checkpoint.", "workdir", "log_every", "profile_steps")


def flat_dict(d: Any, prefix: str = "") -> dict[str, Any]:
    """A nested `to_dict` dict -> {'section.field': value} (lists kept whole)."""
    if not isinstance(d, dict):
        return {prefix[:-1]: d}
    out = {}
    for k, v in d.items():
        out.update(flat_dict(v, f"{prefix}{k}."))
    return out


def resume_changes(stored: dict, cfg: ExperimentConfig) -> list[tuple[str, Any, Any]]:
    """(field, stored value, new value) for every field of `cfg` that differs from the `to_dict` config
    a run was written with, leaving out RESUME_FREE_FIELDS and fields added to the code since (absent
    from `stored`)."""
    old, new = flat_dict(stored), flat_dict(to_dict(cfg))
    return [(k, old[k], new.get(k)) for k in sorted(old)
            if old[k] != new.get(k) and not any(k == f or k.startswith(f) for f in RESUME_FREE_FIELDS)]


# Model fields that only set initial values (loaded weights replace them): checkpoints and public weights
# written with another value, or before the field existed, are the same model.
INIT_ONLY_FIELDS = {"dino": ("position_init_std",)}


def model_fingerprint(model: ModelConfig) -> str:
    """A stable string of the shape-defining model fields (checkpoint compatibility check)."""
    d = to_dict(model)
    shape_keys = ("text", "vit", "dino", "heads", "use_vit")
    for part, names in INIT_ONLY_FIELDS.items():
        for name in names:
            d[part].pop(name)
    return json.dumps({k: d[k] for k in shape_keys}, sort_keys=True)


__all__ = [name for name, obj in globals().items() if isinstance(obj, (type, types.FunctionType)) and not name.startswith("_")]
