"""The objective shared by training and evaluation: the model's loss terms on a packed batch, and
the held-out geometry program.

Training (training/step.py) differentiates `batch_loss_terms`; the reconstruction evaluator
(evaluation/reconstruction.py) runs `make_eval_step`; the AOT tool compiles both.
"""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from g2vlm_jax import config as config_lib
from g2vlm_jax import losses
from g2vlm_jax import meeting
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.batch import GeometryTruth, PackedBatch
from g2vlm_jax.core.state import StateSpec, TrainState


def _flatten_samples(x: jax.Array) -> jax.Array:
    """[B, S, ...] -> [B*S, ...]: the geometry loss works per sample."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def batch_loss_terms(model: nnx.Module, batch: PackedBatch, cfg: config_lib.ExperimentConfig, *,
                     want_ce: bool | None = None, want_vg: bool | None = None,
                     vg_counts: losses.GeometryCounts | None = None):
    """Runs the model and returns the loss terms (and the model outputs).

    vg_counts: the visual-geometry denominators of the whole step's batch (`losses.geometry_counts`)
      when `batch` is one micro-batch of it; default: this batch's own.

    Returns:
      ce_sum: float32[]   sum of per-token CE over loss positions (the caller divides by the global count)
      vg:     float32[]   the visual-geometry loss of `batch` reduced with `vg_counts` (its share of the
                          step's loss; the loss itself when vg_counts is None)
      details: dict of the reduced visual-geometry terms (shares likewise; they add up over micro-batches)
      out: the ModelOutput
    """
    want_ce = cfg.loss.ce_weight > 0 if want_ce is None else want_ce
    want_vg = cfg.loss.vg_weight > 0 if want_vg is None else want_vg
    out = model(batch, compute_logits=want_ce, compute_geometry=want_vg)
    details = {}
    ce_sum = jnp.zeros((), jnp.float32)
    vg = jnp.zeros((), jnp.float32)
    if want_ce:
        lu = batch.num_sem_tokens
        ce_sum, _ = losses.cross_entropy_sums(out.logits, batch.labels[:, :lu], batch.loss_mask[:, :lu])
    if want_vg:
        geo = out.geometry
        pred = {"local_points": _flatten_samples(geo["local_points"]),
                "camera_poses": _flatten_samples(geo["camera_poses"])}
        if "global_points" in geo:
            pred["global_points"] = _flatten_samples(geo["global_points"])
        vg, details = losses.visual_geometry_loss(pred, GeometryTruth.from_batch(batch), cfg.loss, vg_counts)
    return ce_sum, vg, details, out


def eval_geometry(spec: StateSpec, cfg: config_lib.ExperimentConfig, state: TrainState, batch: PackedBatch):
    """Geometry outputs and the visual-geometry loss of a held-out batch (no gradients), weighted by
    its valid samples so that the evaluator's sum over batches / samples is a sample-weighted mean.

    Returns (geometry dict [B, S, V, ...], vg_loss x valid samples).
    """
    _, vg, _, out = batch_loss_terms(spec.model(state), batch, cfg, want_ce=False, want_vg=True)
    return out.geometry, vg * jnp.sum(batch.sample_valid).astype(jnp.float32)


def make_eval_step(spec: StateSpec, cfg: config_lib.ExperimentConfig, state_shardings,
                   batch_sharding: NamedSharding) -> Callable:
    """The held-out geometry program: jit(eval_geometry) under the preset's rules on the batch's mesh,
    geometry outputs sharded like the batch and the loss sum replicated.

    Called as `eval_step(state, batch)`; the reconstruction evaluator runs it and the AOT tool compiles it.
    """
    replicated = NamedSharding(batch_sharding.mesh, P())
    jitted = sharding_lib.jit_sharded(functools.partial(eval_geometry, spec, cfg), batch_sharding.mesh,
                                      cfg.mesh.preset, in_shardings=(state_shardings, batch_sharding),
                                      out_shardings=(batch_sharding, replicated))
    return meeting.MeetBeforeRunning(jitted, "reconstruction evaluator")
