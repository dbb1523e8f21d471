"""Training benchmark: the real train step on the real input pipeline — step time, tokens/s, MFU, compiles.

Program measured: what `g2vlm train` runs per step (`g2vlm_jax/training/loop.py`): the train state of
`core/state.create_train_state` (trainable / frozen split of the experiment's stage, AdamW state,
sharded on the experiment's mesh), `training/step.make_train_step` (CE + visual-geometry loss,
gradient accumulation, clipping, AdamW, non-finite guard, state donated), fed by
`core/data.make_train_iterator` (the Grain pipeline of `data_pipelines/pipeline.py`: records ->
sampled, augmented views -> sequences -> packs, view count drawn per step and rounded up to
`data.view_buckets`). Synthetic sources are built on first use under a temporary run directory.

Each bucket's program is compiled ahead of its first step (timed as compile, excluded from step
times; its memory analysis is reported); every step is then timed from the call to the results
being ready. Data time (`next(iterator)` + device transfer) is timed separately: the training loop
overlaps it with the previous step only through the pipeline's prefetch.

MFU = `g2vlm_jax.flops.step_flops(model, batch).train_total` / step time / (devices x peak), with
peak = `--peak-flops` (per device, FLOP/s) or, by default, the measured fp32 matmul rate of the
default device (`flops.measure_matmul_flops`, the practical CPU peak).

    PYTHONPATH=. python tools/bench_train.py [--experiment experiments/tiny_synthetic.py] [--steps 40]
        [--set data.tokens_per_pack=1024 ...] [--peak-flops 989e12]
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import tempfile
import time

import jax

from g2vlm_jax import config as config_lib
from g2vlm_jax import flops
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.core import data as data_lib
from g2vlm_jax.core import state as state_lib
from g2vlm_jax.training import step as step_lib
from tools.bench_common import memory_bytes

BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Counts backend compiles while `active` (expected 0 during step calls: each bucket's program is
    compiled ahead of its first step and then called directly)."""

    def __init__(self):
        self.active, self.count = False, 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **_) -> None:
        self.count += self.active and event == BACKEND_COMPILE_EVENT


def _shape_key(batch) -> tuple:
    """The static shape that selects a compiled program (views, frame size, row length, slots)."""
    return tuple(batch.geo_images.shape[1:5]) + (batch.token_ids.shape[1], batch.sem_images.shape[1])


def run(cfg: config_lib.ExperimentConfig, steps: int) -> dict:
    """Runs `steps` real training steps; returns per-step records and per-program compile facts."""
    mesh = sharding_lib.make_mesh(cfg.mesh)
    spec, state, shardings = state_lib.create_train_state(cfg, mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    step_fn = step_lib.make_train_step(spec, cfg, shardings, batch_sharding)
    batches = data_lib.make_train_iterator(cfg)
    programs, records, counter = {}, [], CompileCounter()
    for _ in range(steps):
        start = time.perf_counter()
        host = next(batches)
        batch = data_lib.to_global(host, batch_sharding)
        data_s = time.perf_counter() - start
        key = _shape_key(host)
        if key not in programs:
            start = time.perf_counter()
            compiled = step_fn.lower(state, batch).compile()
            programs[key] = {"compiled": compiled, "compile_s": time.perf_counter() - start,
                             "memory": memory_bytes(compiled)}
        counter.active = True
        start = time.perf_counter()
        state, metrics = programs[key]["compiled"](state, batch, step_fn.schedule)  # as TrainStep passes it
        metrics = jax.device_get(metrics)  # waits for the step
        seconds = time.perf_counter() - start
        counter.active = False
        records.append(dict(key=key, seconds=seconds, data_s=data_s, tokens=float(metrics["tokens"]),
                            loss=float(metrics["loss"]), finite=bool(metrics["finite"]),
                            flops=flops.step_flops(cfg.model, host).train_total))
    return dict(records=records, programs=programs, step_compiles=counter.count, devices=mesh.size,
                skips=batches.skip_counts())


def report(cfg: config_lib.ExperimentConfig, result: dict, peak: float, peak_source: str) -> None:
    records, devices = result["records"], result["devices"]
    d = cfg.data
    print(f"experiment {cfg.name}: stage {cfg.optim.stage}, {d.packs_per_step} packs x {d.tokens_per_pack} tokens, "
          f"frames {d.image_size}, view buckets {d.view_buckets}, grad_accum {cfg.optim.grad_accum_steps}, "
          f"{devices} device(s) ({jax.devices()[0].device_kind}), peak {peak / 1e9:.1f} GFLOP/s per device "
          f"({peak_source})")
    print("| program (S, V, H, W, L, N) | steps | median step s | median data s | tokens/step | tokens/s | "
          "model GFLOP/step | MFU % | compile s | peak MiB |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for key, prog in result["programs"].items():
        rs = [r for r in records if r["key"] == key]
        t = statistics.median(r["seconds"] for r in rs)
        tokens, gflop = statistics.median(r["tokens"] for r in rs), statistics.median(r["flops"] for r in rs)
        print(f"| {key} | {len(rs)} | {t:.3f} | {statistics.median(r['data_s'] for r in rs):.3f} | {tokens:.0f} "
              f"| {tokens / t:.0f} | {gflop / 1e9:.3f} | {100 * flops.mfu(gflop, t, devices, peak):.1f} "
              f"| {prog['compile_s']:.1f} | {prog['memory']['peak'] / 2 ** 20:.1f} |")
    total_t = sum(r["seconds"] for r in records)
    print(f"all {len(records)} steps: {sum(r['tokens'] for r in records) / total_t:.0f} tokens/s, "
          f"MFU {100 * sum(r['flops'] for r in records) / total_t / (devices * peak):.1f} %, "
          f"data {sum(r['data_s'] for r in records) / len(records):.3f} s/step (not overlapped here)")
    losses = [r["loss"] for r in records]
    print(f"loss: first {losses[0]:.4f}, last {losses[-1]:.4f}; non-finite steps "
          f"{sum(not r['finite'] for r in records)}; skipped records {result['skips']}")
    print(f"programs compiled: {len(result['programs'])} for {len(records)} steps (view buckets drawn: "
          f"{sorted({key[1] for key in result['programs']})} of {list(d.view_buckets)}); compile time, all programs: "
          f"{sum(p['compile_s'] for p in result['programs'].values()):.1f} s; compiles inside step calls: "
          f"{result['step_compiles']}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="experiments/tiny_synthetic.py", help="experiments/NAME.py[:ARG]")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override, as for `g2vlm train` (repeatable)")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--peak-flops", type=float, default=0.0,
                        help="peak FLOP/s per device for MFU (default: measured fp32 matmul rate)")
    args = parser.parse_args(argv)
    cfg = config_lib.load_experiment(args.experiment, args.overrides)
    if args.peak_flops > 0:
        peak, source = args.peak_flops, "--peak-flops"
    else:
        peak, source = flops.measure_matmul_flops(size=1024), "measured fp32 matmul"
    print(f"backend: {jax.default_backend()}, devices: {jax.devices()}")
    with tempfile.TemporaryDirectory() as tmp:  # run dir: synthetic data is built here
        result = run(dataclasses.replace(cfg, workdir=tmp), args.steps)
    report(cfg, result, peak, source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
