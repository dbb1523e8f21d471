"""Reconstruction forward time and compiled peak memory versus the number of views, blockwise vs XLA attention.

Program measured: the whole G2VLM forward of `bench_model` (DINO on every frame, dino2llm, the MoT
stack with its shared attention, the point / camera / global-point decoders and heads; no logits)
on one reconstruction pack (prompt + V frames of 224x224 = 256 geometry tokens each, 'global'
cross-frame attention), fp32. Peak memory = temp + argument + output bytes of
`compiled.memory_analysis()`. A program whose peak exceeds --max-run-gib is compiled and measured
but not run (its time is reported as '-').

    PYTHONPATH=. python tools/bench_views.py [--views 2,4,8,16,32,64] [--max-run-gib 4]
"""
from __future__ import annotations

import argparse
import sys

import jax
from flax import nnx

from g2vlm_jax.model.g2vlm import G2VLM
from tools.bench_common import bench_model, compile_timed, memory_bytes, recon_batch, time_calls

KERNELS = ("blockwise", "xla")
MIB = 2 ** 20
MAX_RATIO = 20.0  # the blockwise 64-view peak must stay under 20x the 4-view peak (memory ~linear in L)


def measure(kernel: str, views: int, max_run_bytes: float) -> dict:
    cfg = bench_model(kernel)
    graph, state = nnx.split(G2VLM(cfg, rngs=nnx.Rngs(0)))

    def forward(state, batch):
        return nnx.merge(graph, state)(batch, compute_logits=False).geometry

    batch = jax.tree.map(jax.numpy.asarray, recon_batch(views))
    args = (state, batch)
    compiled, compile_s = compile_timed(forward, *args)
    mem = memory_bytes(compiled)
    seconds = None
    if mem["peak"] <= max_run_bytes:
        time_calls(compiled, args, 1)  # warm-up
        seconds = time_calls(compiled, args, 3 if views <= 16 else 1)
    return dict(kernel=kernel, views=views, tokens=batch.token_ids.shape[1], compile_s=compile_s, forward_s=seconds,
                **mem)


def print_table(rows: list[dict]) -> None:
    print("| kernel | views | tokens L | compile s | forward s | temp MiB | argument MiB | output MiB | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        t = "-" if r["forward_s"] is None else f"{r['forward_s']:.3f}"
        print(f"| {r['kernel']} | {r['views']} | {r['tokens']} | {r['compile_s']:.1f} | {t} | {r['temp'] / MIB:.1f} "
              f"| {r['argument'] / MIB:.1f} | {r['output'] / MIB:.1f} | {r['peak'] / MIB:.1f} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--views", default="2,4,8,16,32,64")
    parser.add_argument("--max-run-gib", type=float, default=4.0)
    args = parser.parse_args(argv)
    views = [int(v) for v in args.views.split(",")]
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    rows = [measure(k, v, args.max_run_gib * 2 ** 30) for k in KERNELS for v in views]
    print_table(rows)
    ok = True
    if 4 in views and max(views) > 4:
        top = max(views)
        for kernel in KERNELS:
            peak = {r["views"]: r["peak"] for r in rows if r["kernel"] == kernel}
            ratio = peak[top] / peak[4]
            print(f"{kernel}: peak({top} views) / peak(4 views) = {ratio:.2f}")
            if kernel == "blockwise" and top == 64:
                ok = ratio <= MAX_RATIO
                print(f"blockwise 64-view peak <= {MAX_RATIO:.0f}x the 4-view peak: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
