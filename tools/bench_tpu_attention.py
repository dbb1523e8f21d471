"""TPU attention kernels compiled ahead of time: per-chip memory, compile time and tile work on real packs.

    python tools/bench_tpu_attention.py [--topology v5p:2x2x1] [--block 512]

No TPU is needed: libtpu (the tpu-aot extra) compiles for one chip of the slice on this CPU. For the
2B attention shape (12 query / 2 K/V heads of 128, bf16) and the packed rows of each training stage
(built like the pipeline's: prompt + frames per sample, documents back to back, expert-grouped
slots), it prints

- the fraction of (query, key) pairs the mask allows, the fraction of 512x512 tiles the kernels
  compute (the rest are skipped: no matmul, and for tpu_flash no K/V copy) and the fraction whose
  every pair is allowed (tpu_flash runs them without evaluating the rule);
- attention FLOPs per layer (forward + backward, live tiles only) and their time at the chip's bf16
  peak: the floor a kernel on this layout can reach;
- per-chip temp bytes and compile seconds of forward + backward for `tpu_flash` (Pallas/Mosaic)
  and `blockwise` (pure JAX), and their ratio.

Timings need a TPU; this machine has none, so no kernel time is claimed here.
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from g2vlm_jax import flops as flops_lib
from g2vlm_jax.model.attention import attention
from g2vlm_jax.model.mask import MaskInfo, build_mask
from g2vlm_jax.model.kernels import tiles
from g2vlm_jax import aot
from tools.bench_common import recon_batch

HEADS = (12, 2, 128)  # g2vlm_2b: query heads, K/V heads, head dim
# (name, views, samples, image size): the largest bucket of each stage's reconstruction packs.
LAYOUTS = [("stage 1a: 4 x 24 views 224x224", 24, 4, (224, 224)),
           ("stage 1b: 19 x 2 views 252x518", 2, 19, (252, 518)),
           ("stage 2: 1 x 16 views 518x518", 16, 1, (518, 518))]


def pair_fractions(info: MaskInfo, block: int) -> tuple[float, float, float]:
    """(allowed (q, k) pairs / L^2, live tiles / all tiles, full tiles / all tiles) of one row; the mask is
    built a block at a time."""
    length = info.length
    padded = -(-length // block) * block
    info = tiles.pad_info(jax.tree.map(jnp.asarray, info), padded)
    allowed = sum(int(jnp.sum(build_mask(info.slice(s, s + block), info, "global")))
                  for s in range(0, padded, block))
    summary = tiles.summarize(info, block)
    live = tiles.block_may_attend(summary, summary, "global", 0)
    full = tiles.block_fully_allowed(summary, summary, "global", 0)
    return allowed / length ** 2, float(jnp.mean(live)), float(jnp.mean(full))


def compile_attention(kernel: str, length: int, device, block: int):
    """(temp bytes, compile seconds) of attention forward + backward for one row on one chip."""
    mesh = jax.sharding.Mesh(np.array([device]), ("x",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=replicated)
    hq, hkv, dh = HEADS
    ints = lambda: spec((1, length), jnp.int32)
    info = MaskInfo(seq_order=ints(), document_ids=ints(), split_ids=ints(),
                    split_full=spec((1, length), jnp.bool_), geo_frame=ints())

    def fwd_bwd(q, k, v, info):
        f = lambda *x: attention(*x, info, geo_mode="global", kernel=kernel, block_size=block)
        out, vjp = jax.vjp(f, q, k, v)
        return out, vjp(out)

    start = time.perf_counter()
    compiled = jax.jit(fwd_bwd).lower(spec((1, length, hq, dh), jnp.bfloat16), spec((1, length, hkv, dh), jnp.bfloat16),
                                      spec((1, length, hkv, dh), jnp.bfloat16), info).compile()
    return compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--topology", default="v5p:2x2x1", help="TPU slice whose chip is compiled for")
    p.add_argument("--block", type=int, default=512, help="attention block (ModelConfig.attention_block_size)")
    args = p.parse_args(argv)
    device = aot.slice_devices(args.topology)[0]
    peak = flops_lib.peak_flops(device.device_kind)
    hq, _, dh = HEADS
    print(f"chip: {device.device_kind} ({args.topology}), bf16 peak {peak / 1e12:.0f} TFLOP/s; heads {HEADS}; "
          f"block {args.block}")
    print("| layout | tokens L | allowed pairs | live tiles | full tiles | attention TFLOP (fwd+bwd, live) | at peak ms "
          "| tpu_flash temp MiB | blockwise temp MiB | ratio | tpu_flash compile s | blockwise compile s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, views, samples, hw in LAYOUTS:
        info = MaskInfo.from_batch(recon_batch(views, samples=samples, hw=hw))
        length = info.length
        allowed, live, full = pair_fractions(info, args.block)
        # fwd QK^T + PV, bwd recomputed QK^T + dV + dP + dQ + dK: 7 matmuls of 2*L^2*Dh per query head.
        flops = 7 * 2 * hq * dh * length ** 2 * live
        figures = {k: compile_attention(k, length, device, args.block) for k in ("tpu_flash", "blockwise")}
        (t_mem, t_s), (b_mem, b_s) = figures["tpu_flash"], figures["blockwise"]
        print(f"| {name} | {length} | {allowed:.1%} | {live:.1%} | {full:.1%} | {flops / 1e12:.2f} | {flops / peak * 1e3:.2f} "
              f"| {t_mem / 2**20:.0f} | {b_mem / 2**20:.0f} | {t_mem / b_mem:.2f} | {t_s:.0f} | {b_s:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
