"""Shared pieces of the benchmarks: reconstruction batches, a small CPU model, compile/memory/timing helpers.

The benchmarks run the whole G2VLM network (g2vlm_jax/model/g2vlm.py) of `bench_model` on
synthetic reconstruction packs (see docs/PERFORMANCE.md).
"""
from __future__ import annotations

import statistics
import time

import jax
import numpy as np

from g2vlm_jax.batch import GEO_PATCH, PAD_ORDER, TOKEN_DINO, TOKEN_TEXT, PackedBatch, check_batch
from g2vlm_jax.config import ModelConfig, TextConfig, tiny_model

PROMPT_TOKENS = 8  # "Reconstruct the 3D scene." (SPEC 1.4 stage-1 layout)


def bench_model(kernel: str, **overrides) -> ModelConfig:
    """The benchmark model: `tiny_model`'s DINO (width 32, 2 layers) and heads (2-layer decoders,
    4 heads, point/camera dims 32) with a wider MoT backbone (2 layers, width 128, 4 query / 2 K/V
    heads of 32, MLP 512); no ViT; stage-1 freezing (semantic expert and DINO frozen); fp32 compute."""
    text = TextConfig(vocab_size=512, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=32,
                      mlp_hidden=512, mrope_sections=(4, 6, 6))
    return tiny_model(text=text, attention_kernel=kernel, use_vit=False, freeze_und=True, **overrides)


def recon_batch(views: int, *, packs: int = 1, samples: int = 1, hw: tuple[int, int] = (224, 224),
                seed: int = 0) -> PackedBatch:
    """`packs` identical rows of `samples` reconstruction samples (documents 1..samples), each a
    prompt then `views` geometry frames [start, h*w patches, end], in the expert-grouped layout of
    g2vlm_jax/batch.py (no semantic images)."""
    h, w = hw[0] // GEO_PATCH, hw[1] // GEO_PATCH
    sem_per_sample = PROMPT_TOKENS + 2 * views
    lu = -(-(samples * sem_per_sample) // 8) * 8
    length = lu + samples * views * h * w
    rows = {name: np.zeros(length, np.int32) for name in ("token_type", "seq_order", "document_ids", "split_ids")}
    rows["seq_order"][:] = PAD_ORDER
    geo_frame, positions = np.full(length, -1, np.int32), np.zeros((3, length), np.int32)
    split_full = np.zeros(length, bool)
    cursor = {"order": 0, "split": 0}

    def put(slot, pos, doc, frame, ttype):
        rows["token_type"][slot], rows["seq_order"][slot], rows["document_ids"][slot] = ttype, cursor["order"], doc
        rows["split_ids"][slot], geo_frame[slot], split_full[slot] = cursor["split"], frame, frame >= 0
        positions[:, slot] = pos
        cursor["order"] += 1

    for s in range(samples):
        sem = s * sem_per_sample  # first semantic slot of the sample
        cursor["split"] += 1
        for p in range(PROMPT_TOKENS):
            put(sem + p, p, s + 1, -1, TOKEN_TEXT)
        p = PROMPT_TOKENS
        for v in range(views):
            cursor["split"] += 1
            put(sem + PROMPT_TOKENS + 2 * v, p, s + 1, v, TOKEN_TEXT)
            for i in range(h):
                for j in range(w):
                    put(lu + ((s * views + v) * h + i) * w + j, (p + 1, p + 1 + i, p + 1 + j), s + 1, v, TOKEN_DINO)
            p += 1 + max(h, w)
            put(sem + PROMPT_TOKENS + 2 * v + 1, p, s + 1, v, TOKEN_TEXT)
            p += 1
    return _assemble(rows, geo_frame, split_full, positions, packs, samples, views, hw, seed)


def _assemble(rows, geo_frame, split_full, positions, packs, samples, views, hw, seed) -> PackedBatch:
    rng = np.random.default_rng(seed)
    tile = lambda a: np.tile(a, (packs,) + (1,) * a.ndim)
    length = len(geo_frame)
    per_view = (packs, samples, views)
    batch = PackedBatch(
        token_ids=tile(np.where(rows["token_type"] == TOKEN_TEXT, 7, 0).astype(np.int32)),
        token_type=tile(rows["token_type"]), positions=tile(positions), seq_order=tile(rows["seq_order"]),
        document_ids=tile(rows["document_ids"]), split_ids=tile(rows["split_ids"]), split_full=tile(split_full),
        geo_frame=tile(geo_frame), labels=np.zeros((packs, length), np.int32),
        loss_mask=np.zeros((packs, length), np.float32),
        geo_images=rng.uniform(size=(*per_view, *hw, 3)).astype(np.float32),
        sample_valid=np.ones((packs, samples), bool), sem_images=np.zeros((packs, 0, 28, 28, 3), np.float32),
        sem_image_valid=np.zeros((packs, 0), bool), sem_token_pos=np.zeros((packs, 0, 1), np.int32),
        gt_world_points=np.zeros((*per_view, *hw, 3), np.float32), gt_valid=np.ones((*per_view, *hw), bool),
        gt_poses=np.tile(np.eye(4, dtype=np.float32), (*per_view, 1, 1)),
        gt_intrinsics=np.tile(np.eye(3, dtype=np.float32), (*per_view, 1, 1)),
        normal_loss_enabled=np.ones((packs, samples), bool))
    check_batch(batch)
    return batch


def memory_bytes(compiled) -> dict[str, int]:
    """temp / argument / output bytes of a compiled program and their sum ('peak')."""
    m = compiled.memory_analysis()
    out = {"temp": m.temp_size_in_bytes, "argument": m.argument_size_in_bytes, "output": m.output_size_in_bytes}
    out["peak"] = sum(out.values())
    return out


def compile_timed(fn, *args):
    """(compiled program, seconds spent tracing + lowering + compiling)."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start


def time_calls(compiled, args, repeats: int) -> float:
    """Median wall seconds of `repeats` calls (results blocked on)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)
