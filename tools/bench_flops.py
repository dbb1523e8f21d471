"""Analytic model FLOPs of G2VLM-2B training samples (g2vlm_jax/flops.py) and blockwise tile skipping.

Table 1: one reconstruction sample (prompt + V frames at --size, 'global' attention) with experiment
g2vlm_2b_stage1a's model flags (freeze_und, no ViT): the geometry expert, its attention queries,
dino2llm and the heads train (3x), DINO and the semantic expert run forward only (1x).
Table 2: one pack of --pack-samples such samples of --pack-views views: mask density and the tiles
the blockwise kernel computes (block 512) per geo_attention mode.

    PYTHONPATH=. python tools/bench_flops.py [--views 2,4,8,16,24] [--size 224] [--pack-samples 4 --pack-views 6]
"""
from __future__ import annotations

import argparse

import jax.numpy as jnp

from g2vlm_jax import flops
from g2vlm_jax.config import g2vlm_2b_model
from g2vlm_jax.model.mask import MaskInfo
from g2vlm_jax.model.kernels.blockwise import blockwise_tile_counts
from tools.bench_common import recon_batch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", default="2,4,8,16,24")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--pack-samples", type=int, default=4)
    parser.add_argument("--pack-views", type=int, default=6)
    args = parser.parse_args(argv)
    cfg = g2vlm_2b_model(freeze_und=True, use_vit=False)
    print("| views | tokens | DINO | experts | attention | heads + dino2llm | train total | attention share |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for views in (int(v) for v in args.views.split(",")):
        batch = recon_batch(views, hw=(args.size, args.size))
        count = flops.step_flops(cfg, batch)
        tf = {k: count.forward[k] * count.multiplier[k] / 1e12 for k in count.forward}
        attention = tf["attention_semantic_queries"] + tf["attention_geometry_queries"]
        total = count.train_total / 1e12
        print(f"| {views} | {batch.token_ids.shape[1]} | {tf['dino']:.2f} | "
              f"{tf['semantic_expert'] + tf['geometry_expert']:.2f} | {attention:.2f} | "
              f"{tf['heads'] + tf['dino2llm']:.2f} | {total:.2f} | {100 * attention / total:.0f} % |")
    print("(TFLOP per sample per training step)")
    tile_skipping(args.pack_samples, args.pack_views, args.size)


def tile_skipping(samples: int, views: int, size: int) -> None:
    batch = recon_batch(views, samples=samples, hw=(size, size))
    info, length = MaskInfo.from_batch(batch), batch.token_ids.shape[1]
    q, k = jnp.zeros((1, length, 4, 32)), jnp.zeros((1, length, 2, 32))
    print(f"\npack of {samples} samples x {views} views at {size}x{size}: L = {length}, block 512")
    print("| geo_attention | allowed pairs / L^2 | tiles computed / total |")
    print("|---|---:|---:|")
    for mode in ("global", "frame", "block_causal"):
        computed, total = blockwise_tile_counts(q, k, k, info, info, geo_mode=mode, block_size=512)
        density = sum(flops.count_allowed_pairs(info, batch.num_sem_tokens, mode)) / length ** 2
        print(f"| {mode} | {100 * density:.1f} % | {int(computed)} / {total} |")


if __name__ == "__main__":
    main()
