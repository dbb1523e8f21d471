"""Training-step benchmark over bucketed view counts: step time, tokens/s, MFU, memory, compiles.

Program measured: one optimiser step of the whole G2VLM network of `bench_model` (forward through
DINO, dino2llm, the MoT stack and the geometry heads; backward; AdamW update over all parameters;
params and optimiser state donated) on one reconstruction pack per step. The loss is synthetic
(mean squares of the local / world / global points and camera poses): `g2vlm_jax/training/step.py`
needs `g2vlm_jax/losses.py`, which is not on this branch yet, and the data pipeline is not either,
so packs are built by `tools/bench_common.recon_batch`. View counts are drawn uniformly from
[min_views, max_views] of `DataConfig` and rounded up to the next of `DataConfig.view_buckets`, so at
most len(view_buckets) programs may be compiled. Attention kernel: 'auto' (CPU: blockwise above
512 x 512 pairs per row).

MFU = analytic model FLOPs (`g2vlm_jax.flops.step_flops(...).train_total`: DINO and the frozen
semantic expert 1x, the rest 3x) / step time / peak, where the CPU peak is the measured fp32
matmul rate (`flops.measure_matmul_flops`).

    PYTHONPATH=. python tools/bench_train.py [--steps 50] [--seed 0]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from g2vlm_jax import flops
from g2vlm_jax.config import DataConfig
from g2vlm_jax.model.g2vlm import G2VLM
from tools.bench_common import bench_model, memory_bytes, recon_batch

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts backend compiles while `active` (expected 0 during step calls: each bucket's program is
    compiled ahead of its first step, and the jitted step reuses it)."""

    def __init__(self):
        self.active, self.count = False, 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        self.count += self.active and event == BACKEND_COMPILE_EVENT


def synthetic_loss(geometry: dict) -> jax.Array:
    """Mean squares of the geometry outputs (a stand-in for the visual-geometry loss)."""
    names = ("local_points", "world_points", "global_points", "camera_poses")
    return sum(jnp.mean(jnp.square(geometry[n])) for n in names)


def make_step(graph, optimizer):
    def loss_fn(state, batch):
        return synthetic_loss(nnx.merge(graph, state)(batch, compute_logits=False).geometry)

    def step(state, opt_state, batch):
        loss, grads = jax.value_and_grad(loss_fn)(state, batch)
        updates, opt_state = optimizer.update(grads, opt_state, state)
        return optax.apply_updates(state, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1))


def draw_buckets(data: DataConfig, steps: int, seed: int) -> list[int]:
    """Per step: a view count drawn in [min_views, max_views], rounded up to its bucket."""
    rng = np.random.default_rng(seed)
    drawn = rng.integers(data.min_views, data.max_views + 1, steps)
    return [next(b for b in data.view_buckets if b >= v) for v in drawn]


def run(steps: int, seed: int) -> dict:
    cfg, data = bench_model("auto"), DataConfig()
    graph, state = nnx.split(G2VLM(cfg, rngs=nnx.Rngs(0)), nnx.Param)
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(state)
    step, counter = make_step(graph, optimizer), CompileCounter()
    records, memory, compile_s = [], {}, {}
    for views in draw_buckets(data, steps, seed):
        host_batch = recon_batch(views)
        batch = jax.tree.map(jnp.asarray, host_batch)
        first = views not in memory
        if first:  # ahead-of-time compile of the bucket's program: timed, and its memory analysis
            start = time.perf_counter()
            memory[views] = memory_bytes(step.lower(state, opt_state, batch).compile())
            compile_s[views] = time.perf_counter() - start
        counter.active = True
        start = time.perf_counter()
        state, opt_state, loss = step(state, opt_state, batch)
        loss.block_until_ready()
        counter.active = False
        records.append(dict(views=views, seconds=time.perf_counter() - start, first=first,
                            tokens=int((host_batch.document_ids > 0).sum()),
                            flops=flops.step_flops(cfg, host_batch).train_total))
    return dict(records=records, memory=memory, compile_s=compile_s, programs=step._cache_size(),
                step_compiles=counter.count, buckets=data.view_buckets)


def report(result: dict, peak: float) -> bool:
    records = result["records"]
    print(f"steps: {len(records)}, view buckets: {result['buckets']}, CPU peak (measured fp32 matmul): {peak / 1e9:.1f} GFLOP/s")
    print("| views | steady steps | median step s | tokens/step | tokens/s | model GFLOP/step | MFU % | compile s "
          "| peak MiB |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for views in sorted(result["memory"]):
        rs = [r for r in records if r["views"] == views and not r["first"]]
        if not rs:
            continue
        t = statistics.median(r["seconds"] for r in rs)
        print(f"| {views} | {len(rs)} | {t:.3f} | {rs[0]['tokens']} | {rs[0]['tokens'] / t:.0f} | {rs[0]['flops'] / 1e9:.2f} "
              f"| {100 * flops.mfu(rs[0]['flops'], t, 1, peak):.1f} | {result['compile_s'][views]:.1f} "
              f"| {result['memory'][views]['peak'] / 2 ** 20:.1f} |")
    steady = [r for r in records if not r["first"]]
    total_t = sum(r["seconds"] for r in steady)
    print(f"all steady steps: {sum(r['tokens'] for r in steady) / total_t:.0f} tokens/s, "
          f"MFU {100 * sum(r['flops'] for r in steady) / total_t / peak:.1f} %")
    print(f"compile time, all buckets: {sum(result['compile_s'].values()):.1f} s; compiles inside step calls: "
          f"{result['step_compiles']}; programs in the step's jit cache: {result['programs']} "
          f"(buckets seen: {len(result['memory'])}, configured: {len(result['buckets'])})")
    ok = result["programs"] <= len(result["buckets"])
    print(f"programs <= buckets: {'yes' if ok else 'NO'}")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    peak = flops.measure_matmul_flops(size=1024)
    return 0 if report(run(args.steps, args.seed), peak) else 1


if __name__ == "__main__":
    sys.exit(main())
