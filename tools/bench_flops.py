"""Analytic model FLOPs of one G2VLM-2B training sample by part (g2vlm_jax/flops.py), stage-1a settings.

One reconstruction sample (prompt + V frames at --size, 'global' attention), experiment
g2vlm_2b_stage1a's model flags (freeze_und, no ViT): the geometry expert, its attention queries,
dino2llm and the heads train (3x), DINO and the semantic expert run forward only (1x).

    PYTHONPATH=. python tools/bench_flops.py [--views 2,4,8,16,24] [--size 224]
"""
from __future__ import annotations

import argparse

from g2vlm_jax import flops
from g2vlm_jax.config import g2vlm_2b_model
from tools.bench_common import recon_batch


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", default="2,4,8,16,24")
    parser.add_argument("--size", type=int, default=224)
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


if __name__ == "__main__":
    main()
