"""Analytic FLOPs of a G2VLM train step, device peaks and MFU.

Conventions (what `step_flops` counts)
--------------------------------------
- 2 FLOPs per multiply-add of every matrix product: linear layers, convolutions written as matmuls
  (patch embeddings), and attention's Q.K^T and P.V. Elementwise work (norms, RoPE, softmax,
  activations, losses) and the mask are not counted; at real widths they are ~1 % (the test
  compares a dense MoT layer with XLA's own count).
- Useful work only ("model FLOPs"): real tokens (document > 0) per expert, valid images (valid
  sample slots x V geometry frames, valid semantic images), *allowed* attention pairs counted from
  the batch's mask metadata, lm_head at CE loss positions only. Padding slots, empty sample slots,
  masked pairs and remat recomputation are hardware work, not model work, so they lower the MFU.
- Training multiplier per part: 3x its forward (forward + gradients of activations and weights)
  when it trains, 1x when it is frozen (forward only: activation-level freezing runs no backward
  through it). Groups: ViT (`freeze_vit`), DINO (`freeze_dino`), semantic expert + lm_head
  (`freeze_und`), geometry expert + dino2llm + geometry heads (`freeze_recon`). Attention pairs
  follow the expert of their query. (3x is the usual convention; the first trained layer after a
  frozen one strictly needs no input gradient.)

Per-part forward FLOPs (D = text width, F = MLP width, Hq/Hkv/Dh heads, C/M encoder width/MLP,
n = patches of one frame):
    expert, per real token per layer   2*D*(Hq + 2*Hkv)*Dh + 2*Hq*Dh*D + 6*D*F
    attention, per allowed pair/layer  4*Hq*Dh
    lm_head, per loss position         2*D*vocab
    ViT, per image (P patches)         2*P*1176*C + layers*(2*P*(4*C^2 + 2*C*M) + 4*P^2*C) + merger
    DINO, per frame (T = 1+regs+n)     2*n*588*C + layers*(2*T*(4*C^2 + 2*C*M) + 4*T^2*C)
    dino2llm, per frame                2*n*C*D
    heads, per frame                   see `heads_frame_flops`
"""
from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from g2vlm_jax import chips
from g2vlm_jax.batch import GEO_PATCH
from g2vlm_jax.config import DinoConfig, ModelConfig, TextConfig, VitConfig
from g2vlm_jax.model.mask import MaskInfo, build_mask

# Dense bf16 peak FLOP/s per device, matched against `jax.Device.device_kind` (first match wins).
PIXEL_HEAD_CHANNELS = 3  # local and global point heads: C = 3 channels per pixel


# --------------------------------------------------------------------------------------------------
# Per-part forward FLOPs
# --------------------------------------------------------------------------------------------------
def expert_token_flops(t: TextConfig) -> float:
    """One expert, one token, one layer: q/k/v/o projections and the SwiGLU MLP."""
    return 2 * t.hidden_size * (t.num_heads + 2 * t.num_kv_heads) * t.head_dim \
        + 2 * t.num_heads * t.head_dim * t.hidden_size + 6 * t.hidden_size * t.mlp_hidden


def attention_pair_flops(t: TextConfig) -> float:
    """One allowed (query, key) pair in one layer: Q.K^T and P.V over all query heads."""
    return 4 * t.num_heads * t.head_dim


def _encoder_block_flops(tokens: int, width: int, mlp: int) -> float:
    """Pre-LN block with full attention over `tokens`: qkv + proj + MLP + attention."""
    return 2 * tokens * (4 * width * width + 2 * width * mlp) + 4 * tokens * tokens * width


def vit_image_flops(vit: VitConfig, text_width: int, hw: tuple[int, int]) -> float:
    """Semantic encoder on one image of hw pixels (patch embed, blocks, 2x2 merger to the text width)."""
    p = (hw[0] // vit.patch_size) * (hw[1] // vit.patch_size)
    c, merged = vit.hidden_size, vit.hidden_size * vit.spatial_merge_size ** 2
    patch_in = 3 * vit.temporal_patch_size * vit.patch_size ** 2
    merger = 2 * (p // vit.spatial_merge_size ** 2) * (merged * merged + merged * text_width)
    return 2 * p * patch_in * c + vit.num_layers * _encoder_block_flops(p, c, vit.mlp_hidden) + merger


def dino_frame_flops(dino: DinoConfig, hw: tuple[int, int]) -> float:
    """Geometry encoder on one frame (patch embed, blocks over CLS + registers + patches)."""
    n = (hw[0] // dino.patch_size) * (hw[1] // dino.patch_size)
    tokens = 1 + dino.num_registers + n
    return 2 * n * 3 * dino.patch_size ** 2 * dino.hidden_size \
        + dino.num_layers * _encoder_block_flops(tokens, dino.hidden_size, dino.mlp_hidden)


def heads_frame_flops(cfg: ModelConfig, hw: tuple[int, int]) -> float:
    """Point, camera and global-points decoders, point heads and camera head on one frame (SPEC 1.5)."""
    h = cfg.heads
    d, n = cfg.text.hidden_size, (hw[0] // GEO_PATCH) * (hw[1] // GEO_PATCH)
    self_block = _encoder_block_flops(n, d, h.mlp_ratio * d)
    cross = 2 * n * 4 * d * d + 4 * n * n * d  # q, k, v (on the frame-0 context), proj; Q.K^T, P.V
    decoders = h.decoder_layers * (3 * self_block + cross)
    outs = 2 * n * d * (2 * h.point_dim + h.camera_dim)
    pixels = PIXEL_HEAD_CHANNELS + (1 if h.confidence else 0)  # local + confidence share the point features
    point_heads = 2 * n * h.point_dim * GEO_PATCH ** 2 * (pixels + PIXEL_HEAD_CHANNELS)
    c = h.camera_dim
    camera = 2 * n * 6 * c * c + 2 * (2 * c * c + 12 * c)  # 2 residual blocks per token; MLP, fc_t, fc_rot per frame
    return decoders + outs + point_heads + camera


# --------------------------------------------------------------------------------------------------
# Allowed attention pairs
# --------------------------------------------------------------------------------------------------
def _host_mask(q: MaskInfo, k: MaskInfo, geo_mode: str, layer_idx) -> np.ndarray:
    """`build_mask` evaluated in numpy on host metadata: no device dispatch from the training loop,
    and nothing to compile (the group counts change from row to row; a jitted mask recompiled for
    almost every batch, about 1 s per step for the tiny config)."""
    return build_mask(q, k, geo_mode, layer_idx, xp=np)


def _row(info: MaskInfo, b: int) -> MaskInfo:
    return jax.tree.map(lambda a: np.asarray(a)[b:b + 1], info)


def _pairs_dense(row: MaskInfo, num_sem: int, geo_mode: str, layer_idx, chunk: int = 512) -> tuple[int, int]:
    """(pairs with a semantic query, with a geometry query) of one row by evaluating the mask in chunks."""
    counts = np.zeros(row.length, np.int64)
    for start in range(0, row.length, chunk):
        q = row.slice(start, min(start + chunk, row.length))
        counts[start:start + q.length] = np.asarray(_host_mask(q, row, geo_mode, layer_idx)).sum(axis=(0, 2))
    return int(counts[:num_sem].sum()), int(counts[num_sem:].sum())


def _pairs_by_groups(row: MaskInfo, num_sem: int, geo_mode: str, layer_idx) -> tuple[int, int] | None:
    """The same counts from one representative token per (split, expert) group, or None when the row
    breaks the layout facts this relies on (then the dense count is used).

    Facts: reading orders of real tokens are distinct; each split is contiguous in reading order and
    its tokens share document, split_full and geo_frame; a split spread over both experts is full.
    Then whether q may see k depends only on their groups (and, inside a group, on whether k comes
    later), so `build_mask` on representatives gives every group-pair count exactly.
    """
    a = {f.name: np.asarray(getattr(row, f.name))[0] for f in dataclasses.fields(row)}
    real = np.nonzero(a["document_ids"] > 0)[0]
    order, split = a["seq_order"][real].astype(np.int64), a["split_ids"][real].astype(np.int64)
    present = np.unique(split)
    if len(real) == 0:
        return 0, 0
    if len(np.unique(order)) != len(real):
        return None
    for name in ("document_ids", "split_full", "geo_frame"):
        if np.unique(np.stack([split, a[name][real].astype(np.int64)]), axis=1).shape[1] != len(present):
            return None
    lo = np.full(split.max(initial=0) + 1, np.iinfo(np.int64).max)
    hi = np.full(split.max(initial=0) + 1, -1)
    np.minimum.at(lo, split, order)
    np.maximum.at(hi, split, order)
    if np.any(hi[present] - lo[present] + 1 != np.bincount(split)[present]):
        return None
    expert = (real >= num_sem).astype(np.int64)
    _, first, n = np.unique(split * 2 + expert, return_index=True, return_counts=True)
    g_split, g_full = split[first], a["split_full"][real[first]]
    if np.any((np.bincount(g_split)[g_split] > 1) & ~g_full):  # a causal split in both experts
        return None
    return _group_counts(a, real[first], 2 * lo[g_split], n, expert[first], geo_mode, layer_idx)


def _group_counts(a, rep_slots, rep_order, n, expert, geo_mode, layer_idx) -> tuple[int, int]:
    """Pair counts from group representatives (see `_pairs_by_groups`)."""
    def info(order):
        return MaskInfo(seq_order=order[None].astype(np.int32), document_ids=a["document_ids"][rep_slots][None],
                        split_ids=a["split_ids"][rep_slots][None], split_full=a["split_full"][rep_slots][None],
                        geo_frame=a["geo_frame"][rep_slots][None])

    reps, later = info(rep_order), info(rep_order + 1)  # `later`: a token of the same group, after the rep
    allowed = np.asarray(_host_mask(reps, reps, geo_mode, layer_idx))[0].astype(np.int64)
    sees_later = np.diag(np.asarray(_host_mask(reps, later, geo_mode, layer_idx))[0]).astype(np.int64)
    cross = allowed * n[:, None] * n[None, :]
    np.fill_diagonal(cross, 0)
    within = np.diag(allowed) * n * (n + 1) // 2 + sees_later * n * (n - 1) // 2
    per_group = cross.sum(axis=1) + within
    return int(per_group[expert == 0].sum()), int(per_group[expert == 1].sum())


def count_allowed_pairs(info: MaskInfo, num_sem: int, geo_mode: str, layer_idx=None) -> tuple[int, int]:
    """Allowed (query, key) pairs of a batch, split by the query's expert: (semantic, geometry).

    info: metadata, fields [B, L] (host arrays); num_sem: Lu (slots < Lu are semantic).
    Exact; fast for rows that follow the packed layout (a few hundred representative tokens),
    otherwise evaluates the mask in chunks of 512 queries.
    """
    sem = geo = 0
    for b in range(np.asarray(info.seq_order).shape[0]):
        row = _row(info, b)
        counts = _pairs_by_groups(row, num_sem, geo_mode, layer_idx)
        if counts is None:
            counts = _pairs_dense(row, num_sem, geo_mode, layer_idx)
        sem, geo = sem + counts[0], geo + counts[1]
    return sem, geo


# --------------------------------------------------------------------------------------------------
# A whole step
# --------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class StepFlops:
    """Forward FLOPs per part and the training multiplier (3 trained, 1 frozen) of each part."""

    forward: dict[str, float]
    multiplier: dict[str, int]

    @property
    def forward_total(self) -> float:
        return float(sum(self.forward.values()))

    @property
    def train_total(self) -> float:
        """FLOPs of one training step on the batch (forward x multiplier, summed)."""
        return float(sum(f * self.multiplier[name] for name, f in self.forward.items()))


def _layer_pairs(cfg: ModelConfig, info: MaskInfo, num_sem: int) -> tuple[float, float]:
    """Allowed pairs summed over all layers, split by query expert ('mixed' alternates frame/global)."""
    layers = cfg.text.num_layers
    if cfg.geo_attention != "mixed":
        sem, geo = count_allowed_pairs(info, num_sem, cfg.geo_attention)
        return float(sem * layers), float(geo * layers)
    even, odd = (count_allowed_pairs(info, num_sem, "mixed", parity) for parity in (0, 1))
    n_odd = layers // 2
    return (float(even[0] * (layers - n_odd) + odd[0] * n_odd), float(even[1] * (layers - n_odd) + odd[1] * n_odd))


def step_flops(cfg: ModelConfig, batch) -> StepFlops:
    """Model FLOPs of one step of `batch` (a PackedBatch; host or device arrays). See the module docstring."""
    lu = batch.num_sem_tokens
    doc = np.asarray(batch.document_ids)
    sem_tokens, geo_tokens = float((doc[:, :lu] > 0).sum()), float((doc[:, lu:] > 0).sum())
    geo_hw = tuple(batch.geo_images.shape[3:5])
    frames = float(np.asarray(batch.sample_valid).sum() * batch.geo_images.shape[2])
    sem_images = float(np.asarray(batch.sem_image_valid).sum()) if cfg.use_vit else 0.0
    sem_pairs, geo_pairs = _layer_pairs(cfg, MaskInfo.from_batch(batch), lu)
    t, pair = cfg.text, attention_pair_flops(cfg.text)
    forward = {
        "vit": sem_images * vit_image_flops(cfg.vit, t.hidden_size, tuple(batch.sem_images.shape[2:4])),
        "dino": frames * dino_frame_flops(cfg.dino, geo_hw),
        "dino2llm": frames * 2 * (geo_hw[0] // GEO_PATCH) * (geo_hw[1] // GEO_PATCH) * cfg.dino.hidden_size * t.hidden_size,
        "semantic_expert": sem_tokens * t.num_layers * expert_token_flops(t),
        "geometry_expert": geo_tokens * t.num_layers * expert_token_flops(t),
        "attention_semantic_queries": sem_pairs * pair,
        "attention_geometry_queries": geo_pairs * pair,
        "lm_head": float(np.asarray(batch.loss_mask).sum()) * 2 * t.hidden_size * t.vocab_size,
        "heads": frames * heads_frame_flops(cfg, geo_hw),
    }
    und, recon = (1 if cfg.freeze_und else 3), (1 if cfg.freeze_recon else 3)
    multiplier = {"vit": 1 if cfg.freeze_vit else 3, "dino": 1 if cfg.freeze_dino else 3, "dino2llm": recon,
                  "semantic_expert": und, "geometry_expert": recon, "attention_semantic_queries": und,
                  "attention_geometry_queries": recon, "lm_head": und, "heads": recon}
    return StepFlops(forward=forward, multiplier=multiplier)


# --------------------------------------------------------------------------------------------------
# Device peaks and MFU
# --------------------------------------------------------------------------------------------------
def peak_flops(device_kind: str) -> float:
    """Dense bf16 peak FLOP/s of one device (e.g. jax.devices()[0].device_kind), from g2vlm_jax/chips.py."""
    return chips.chip_of(device_kind).peak_bf16_flops


def measure_matmul_flops(size: int = 1024, dtype=jnp.float32, repeats: int = 5) -> float:
    """Achieved FLOP/s of a jitted [size, size] @ [size, size] matmul on the default device (best of
    `repeats`): the practical peak used for MFU on CPUs, which have no nominal bf16 figure here."""
    x = jnp.ones((size, size), dtype)
    matmul = jax.jit(lambda a: a @ a)
    matmul(x).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(x).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def run_peak_flops() -> float:
    """Peak FLOP/s of all devices of this run, the MFU denominator of the training logs.

    TPU/GPU: the nominal bf16 peak of the device kind times the device count. CPU: the measured
    matmul rate of one host times the process count (fake CPU devices share their host's cores).
    0.0 (no MFU logged, with a warning) for an accelerator kind missing from g2vlm_jax/chips.py.
    """
    if jax.default_backend() == "cpu":
        return measure_matmul_flops() * jax.process_count()
    try:
        return peak_flops(jax.devices()[0].device_kind) * jax.device_count()
    except ValueError as e:
        logging.warning("MFU is not logged: %s", e)
        return 0.0


def mfu(flops_per_step: float, step_seconds: float, num_devices: int, peak_per_device: float) -> float:
    """Model FLOPs utilisation: flops_per_step / step_seconds / (num_devices * peak_per_device)."""
    if step_seconds <= 0 or num_devices <= 0 or peak_per_device <= 0:
        raise ValueError(f"mfu: step_seconds ({step_seconds}), num_devices ({num_devices}) and "
                         f"peak_per_device ({peak_per_device}) must be positive")
    return flops_per_step / step_seconds / (num_devices * peak_per_device)
