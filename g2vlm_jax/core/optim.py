"""Optimiser: AdamW + warmup/cosine schedule (as data), parameter groups and per-stage trainable sets (SPEC 3).

Every parameter belongs to exactly one *group*, decided from its path in the model:

| group      | what                                                       |
|------------|------------------------------------------------------------|
| embed      | `embed_tokens` (shared by both experts)                    |
| lm_head    | the untied output projection                               |
| semantic   | per-layer semantic-expert weights and the final `norm`     |
| geometry   | per-layer `*_moe_geo` weights, `ls1`/`ls2`, `norm_moe_geo` |
| vit        | the semantic encoder (`vit_model`)                         |
| dino       | the geometry encoder (`dino_model`)                        |
| dino2llm   | DINO -> LLM projection                                     |
| heads      | point / camera / global-points decoders and heads          |

A stage trains a set of groups (optimiser side); the model's `freeze_und` / `freeze_recon` flags
stop the gradients at activation level (model side). Frozen parameters are split out of the
trainable state entirely, so they get no gradient computation and no Adam moments.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from g2vlm_jax import config as config_lib

GROUPS = ("embed", "lm_head", "semantic", "geometry", "vit", "dino", "dino2llm", "heads")

_HEAD_MODULES = ("point_decoder", "camera_decoder", "global_points_decoder", "point_head", "global_point_head",
                 "camera_head", "conf_decoder", "conf_head", "heads")


def param_group(path: tuple) -> str:
    """The group of a parameter from its state path (a tuple of attribute names / indices)."""
    names = [str(p) for p in path]
    if "vit_model" in names:
        return "vit"
    if "dino_model" in names:
        return "dino"
    if "dino2llm" in names:
        return "dino2llm"
    if any(n in _HEAD_MODULES for n in names):
        return "heads"
    if "embed_tokens" in names:
        return "embed"
    if "lm_head" in names:
        return "lm_head"
    if any(n.endswith("_moe_geo") or n in ("ls1", "ls2") for n in names):
        return "geometry"
    return "semantic"


def trainable_groups(cfg: config_lib.ExperimentConfig) -> tuple[str, ...]:
    """Groups the optimiser updates: the stage's groups, with each encoder trained exactly when the model
    config unfreezes it (`model.freeze_vit` / `freeze_dino`), whatever the stage. (An unfrozen encoder that
    the stage left out used to get gradients that were never applied.)"""
    encoders = {"vit": not cfg.model.freeze_vit and cfg.model.use_vit, "dino": not cfg.model.freeze_dino}
    groups = [g for g in config_lib.STAGE_GROUPS[cfg.optim.stage] if g not in encoders]  # SPEC 3
    return tuple(groups + [g for g, trains in encoders.items() if trains])


def is_trainable(cfg: config_lib.ExperimentConfig):
    """An nnx filter `(path, value) -> bool` selecting the trainable parameters of `cfg`'s stage."""
    groups = set(trainable_groups(cfg))

    def predicate(path, _value) -> bool:
        return param_group(path) in groups

    return predicate


@struct.dataclass
class LearningRateSchedule:
    """Linear warmup from 0 to `peak`, then cosine decay to `end` at step `total` (float32 scalars).

    The schedule is *data*, passed to the jitted train step as an argument, not constants baked into
    the compiled program: runs that differ only in their schedule (length, warmup, learning rate)
    share one compiled step, and a resumed run may change them without recompiling.
    Same values as `optax.warmup_cosine_decay_schedule(0, peak, warmup, total, end)`.
    """

    peak: jax.Array
    end: jax.Array
    warmup: jax.Array
    total: jax.Array

    @classmethod
    def from_config(cls, optim: config_lib.OptimConfig) -> "LearningRateSchedule":
        f32 = lambda x: jnp.asarray(x, jnp.float32)
        return cls(peak=f32(optim.learning_rate), end=f32(optim.min_learning_rate), warmup=f32(optim.warmup_steps),
                   total=f32(optim.total_steps))

    def __call__(self, step) -> jax.Array:
        """The learning rate of the update made at `step` (0 for the first update)."""
        step = jnp.asarray(step, jnp.float32)
        warm = self.peak * step / jnp.maximum(self.warmup, 1.0)
        progress = jnp.clip((step - self.warmup) / jnp.maximum(self.total - self.warmup, 1.0), 0.0, 1.0)
        cosine = self.end + (self.peak - self.end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return jnp.where(step < self.warmup, warm, cosine)


def make_optimizer(cfg: config_lib.ExperimentConfig) -> optax.GradientTransformation:
    """Global-norm clip then AdamW *without* the learning rate; per-group multipliers from
    `optim.lr_multipliers`.

    The updates it returns are -(multiplier) * (Adam direction + weight decay * parameter); the train
    step multiplies them by `LearningRateSchedule(step)` (see its docstring for why). The
    transformation is applied to the trainable state only (frozen groups are not in it).
    """
    optim = cfg.optim
    multipliers = dict(optim.lr_multipliers)
    unknown = set(multipliers) - set(GROUPS)
    if unknown:
        raise config_lib.ConfigError(
            f"config field 'optim.lr_multipliers': unknown groups {sorted(unknown)}; allowed values are {list(GROUPS)}")

    def adamw(multiplier: float) -> optax.GradientTransformation:
        return optax.chain(optax.scale_by_adam(b1=optim.b1, b2=optim.b2, eps=optim.eps),
                           optax.add_decayed_weights(optim.weight_decay), optax.scale(-multiplier))

    if not multipliers:
        inner = adamw(1.0)
    else:
        groups = trainable_groups(cfg)
        transforms = {g: adamw(multipliers.get(g, 1.0)) for g in groups}

        def labels(params):
            return nnx.map_state(lambda path, _value: param_group(path), params)

        inner = optax.multi_transform(transforms, labels)
    return optax.chain(optax.clip_by_global_norm(optim.grad_clip_norm), inner)
