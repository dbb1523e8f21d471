"""The jitted train step: loss (CE + visual geometry), gradient accumulation, clip, AdamW, NaN guard.

Normalisation is global: the CE is the sum of per-token losses over the *whole* batch divided by the
batch's count of loss tokens (SPEC 2.2), and the visual-geometry terms are divided by the whole
batch's valid pixels / usable samples (SPEC 2.1, `losses.geometry_counts`). With gradient
accumulation each micro-batch contributes its sums divided by those global counts, so accumulating
k micro-batches gives exactly the loss and gradient of the full batch.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding

from g2vlm_jax import config as config_lib
from g2vlm_jax import losses
from g2vlm_jax import meeting
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.batch import GeometryTruth, PackedBatch
from g2vlm_jax.core import optim as optim_lib
from g2vlm_jax.core.objective import batch_loss_terms
from g2vlm_jax.core.state import StateSpec, TrainState


def _split_micro(batch: PackedBatch, k: int) -> PackedBatch:
    """[B, ...] -> [k, B/k, ...] on every field (the scan axis first)."""
    def split(x):
        if x.shape[0] % k:
            raise ValueError(f"batch of {x.shape[0]} packs is not divisible by optim.grad_accum_steps={k}")
        return x.reshape((k, x.shape[0] // k) + x.shape[1:])

    return jax.tree_util.tree_map(split, batch)


def train_step(spec: StateSpec, cfg: config_lib.ExperimentConfig, state: TrainState, batch: PackedBatch,
               schedule: optim_lib.LearningRateSchedule):
    """One optimiser update over `batch` (split into `optim.grad_accum_steps` micro-batches).

    The learning rate is `schedule(state.step)`: the step counts applied updates, so a skipped
    non-finite step does not advance the schedule (as optax's own step counter would not).
    Returns (new_state, metrics) where metrics are scalars (read by the host one step late).
    A non-finite loss or gradient leaves parameters and optimiser state untouched and bumps the
    non-finite counters instead.
    """
    k = cfg.optim.grad_accum_steps
    ce_count = jnp.maximum(jnp.sum(batch.loss_mask), 1.0)
    vg_counts = losses.geometry_counts(GeometryTruth.from_batch(batch))

    def micro_loss(trainable, micro):
        model = nnx.merge(spec.graphdef, trainable, state.frozen)
        ce_sum, vg, details, _ = batch_loss_terms(model, micro, cfg, vg_counts=vg_counts)
        loss = cfg.loss.ce_weight * ce_sum / ce_count + cfg.loss.vg_weight * vg
        return loss, (ce_sum, vg, details)

    grad_fn = jax.value_and_grad(micro_loss, has_aux=True)
    if k == 1:
        (loss, (ce_sum, vg, details)), grads = grad_fn(state.trainable, batch)
    else:
        def body(carry, micro):
            (loss_i, (ce_i, vg_i, det_i)), g_i = grad_fn(state.trainable, micro)
            acc = jax.tree_util.tree_map(jnp.add, carry, (loss_i, ce_i, vg_i, g_i))
            return acc, det_i

        zeros = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()), jax.tree_util.tree_map(jnp.zeros_like, state.trainable))
        (loss, ce_sum, vg, grads), det_all = jax.lax.scan(body, zeros, _split_micro(batch, k))
        details = jax.tree_util.tree_map(lambda x: jnp.sum(x, axis=0), det_all)  # shares add up

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    updates, new_opt = spec.tx.update(grads, state.opt_state, state.trainable)
    lr = schedule(state.step)
    new_trainable = optax.apply_updates(state.trainable, jax.tree_util.tree_map(lambda u: lr * u, updates))
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + finite.astype(jnp.int32),
        trainable=keep(new_trainable, state.trainable),
        opt_state=keep(new_opt, state.opt_state),
        nonfinite_streak=jnp.where(finite, 0, state.nonfinite_streak + 1),
        nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
    )
    metrics = {"loss": loss, "ce": ce_sum / ce_count, "vg": vg, "grad_norm": grad_norm, "lr": lr,
               "finite": finite.astype(jnp.float32), "nonfinite_streak": new_state.nonfinite_streak,
               "loss_tokens": jnp.sum(batch.loss_mask), "tokens": jnp.sum(batch.token_type > 0),
               **{f"vg/{name}": value for name, value in details.items()}}
    return new_state, metrics


@dataclasses.dataclass(frozen=True)
class TrainStep:
    """The jitted train step, called as `step(state, batch)`; passes the schedule as an argument.

    `jitted` is a `meeting.MeetBeforeRunning`: in a multi-process run every process compiles a new
    bucket's program before any of them runs it (gloo's 30 s rendezvous would not wait for a compile).
    """

    jitted: Callable
    schedule: optim_lib.LearningRateSchedule

    def __call__(self, state: TrainState, batch: PackedBatch):
        return self.jitted(state, batch, self.schedule)

    def lower(self, state, batch):
        """Lowers for (abstract) state and batch, e.g. to compile ahead of time."""
        return self.jitted.lower(state, batch, self.schedule)


def make_train_step(spec: StateSpec, cfg: config_lib.ExperimentConfig, state_shardings,
                    batch_sharding: NamedSharding) -> TrainStep:
    """The train step program: jit(train_step) under the preset's activation rules on the batch's
    mesh (`sharding.jit_sharded`), with explicit shardings and the input state donated.

    The trainer runs it and the AOT tool (g2vlm_jax/aot.py) compiles it: one program.
    """
    fn = functools.partial(train_step, spec, cfg)
    jitted = sharding_lib.jit_sharded(fn, batch_sharding.mesh, cfg.mesh.preset,
                                      in_shardings=(state_shardings, batch_sharding, None),
                                      out_shardings=(state_shardings, None), donate_argnums=(0,))
    return TrainStep(meeting.MeetBeforeRunning(jitted, "train step"), optim_lib.LearningRateSchedule.from_config(cfg.optim))
