"""Input-pipeline benchmark: records/s of each stage and packs/s of the whole pipeline at 0 and N workers.

Stages, each timed on its own (single process), then the whole pipeline:
  convert    the synthetic builder renders scenes and writes ArrayRecord (tfds download_and_prepare)
  read       raw random-access reads: `tfds.data_source(...)[i]` (ArrayRecord + tfds deserialisation)
  decode     `records.record_to_scene` (PNG images, zlib depth, camera checks)
  transform  `sampling.sample_views` (frame sampling, crop/resize, colour jitter, world points) per sample
  direct     `pipeline.BatchMaker(step)` in this thread: all of the above + sequences + packing
  iterator   the same steps through `pipeline.BatchIterator` (Grain; threads prefetch `PREFETCH_STEPS`
             steps) with 0 and N worker processes, in steady state: the first batch (worker start-up)
             and the batches prefetched meanwhile are not timed

    PYTHONPATH=. python tools/bench_data.py [--scenes 48] [--views 8] [--image-size 224] [--workers 2]
"""
from __future__ import annotations

import argparse
import pathlib
import sys
import tempfile
import time

import numpy as np
import tensorflow_datasets as tfds
from absl import flags

from data_pipelines import pipeline, records, sampling
from data_pipelines.builders import base
from g2vlm_jax import config as C

ROOT = pathlib.Path(__file__).resolve().parents[1]


def data_config(args) -> C.DataConfig:
    size = (args.image_size, args.image_size)
    kind = "recon_qa" if args.qa else "recon"
    source = C.DataSource(name="synthetic_qa" if args.qa else "synthetic", kind=kind,
                          synthetic_scenes=(args.scenes, 1, 1))
    return C.DataConfig(sources=(source,), eval_sources=(source,), image_size=size, vit_image_size=(224, 224),
                        view_buckets=(2, 4, args.views), min_views=2, max_views=args.views,
                        tokens_per_pack=args.tokens_per_pack, packs_per_step=args.packs_per_step,
                        max_text_tokens=96, augment=True, tokenizer="sentencepiece:builtin")


def rate(count: int, seconds: float) -> float:
    return count / max(seconds, 1e-9)


def bench_stages(data: C.DataConfig, workdir: pathlib.Path, repeats: int) -> tuple[dict, object]:
    """Convert, read, decode and transform rates (items/s); returns (figures, opened SceneSource)."""
    source = data.sources[0]
    name, kwargs = pipeline.builder_name(source, data)
    start = time.perf_counter()
    splits = base.prepare(tfds.builder(name, data_dir=str(workdir / "data"), **kwargs))
    out = {"convert": rate(sum(splits.values()), time.perf_counter() - start)}
    scenes = pipeline.open_source(source, data, "train", workdir)
    n = len(scenes)
    start = time.perf_counter()
    raw = [scenes.records[i % n] for i in range(repeats * n)]
    out["read"] = rate(len(raw), time.perf_counter() - start)
    start = time.perf_counter()
    decoded = [records.record_to_scene(r, strict=False) for r in raw[:n]]
    out["decode"] = rate(n, time.perf_counter() - start)
    rng = np.random.default_rng(0)
    views = max(data.view_buckets)
    start = time.perf_counter()
    for scene in decoded:
        sampling.sample_views(scene, views, data.image_size, rng, augment=True)
    out["transform"] = rate(n, time.perf_counter() - start)
    out["views_per_sample"] = views
    return out, scenes


def make_maker(data: C.DataConfig, scenes) -> pipeline.BatchMaker:
    """Every step at the largest view bucket, so that all modes time steps of the same cost."""
    return pipeline.BatchMaker(data, [(data.sources[0], scenes)], process_index=0, process_count=1, augment=True,
                               seed=0, fixed_views=max(data.view_buckets))


def bench_direct(maker: pipeline.BatchMaker, steps: int) -> dict:
    """`maker(step)` called in this thread: the single-process cost of a step (no prefetch)."""
    maker(0)  # loads the tokenizer
    samples, tokens, start = 0, 0, time.perf_counter()
    for step in range(1, steps + 1):
        fields = maker(step)[0]
        samples += int(fields["sample_valid"].sum())
        tokens += int((fields["document_ids"] > 0).sum())
    seconds = time.perf_counter() - start
    return {"packs_per_s": rate(steps * maker.local_packs, seconds), "samples_per_s": rate(samples, seconds),
            "tokens_per_s": rate(tokens, seconds), "startup_s": 0.0}


def bench_iterator(maker: pipeline.BatchMaker, steps: int, workers: int) -> dict:
    """Packs/s and samples/s of `pipeline.BatchIterator` in its steady state: the first batch (worker
    start-up) and the batches prefetched meanwhile are taken untimed, then `steps` steps are timed."""
    it = pipeline.BatchIterator(maker, num_workers=workers)
    start = time.perf_counter()
    next(it)
    startup = time.perf_counter() - start
    for _ in range(max(workers, 1) * (pipeline.PREFETCH_STEPS + 1)):  # drain what was built during start-up
        next(it)
    samples, tokens, start = 0, 0, time.perf_counter()
    for _ in range(steps):
        batch = next(it)
        samples += int(batch.sample_valid.sum())
        tokens += int((batch.document_ids > 0).sum())
    seconds = time.perf_counter() - start
    del it  # stops its threads / worker processes before the next run
    return {"packs_per_s": rate(steps * maker.local_packs, seconds), "samples_per_s": rate(samples, seconds),
            "tokens_per_s": rate(tokens, seconds), "startup_s": startup}


def train_consumption(maker: pipeline.BatchMaker, tiny_tokens_per_s: float, mfu: float) -> dict:
    """Tokens/s the train steps eat, to compare with what the pipeline makes.

    tiny: the measured CPU figure (docs/PERFORMANCE.md Table 2, `--tiny-tokens-per-s`). 2B stage 1a:
    analytic model FLOPs per real token of this benchmark's own batch (g2vlm_jax/flops.py), at `mfu`
    of one v5p chip's bf16 peak, i.e. tokens/s per chip (the pipeline runs on that chip's host).
    """
    from g2vlm_jax import flops

    fields = maker(1)[0]
    model = C.load_experiment(str(ROOT / "experiments" / "g2vlm_2b_stage1a.py")).model
    step = flops.step_flops(model, pipeline.to_packed_batch(fields))
    per_token = step.train_total / max(int((fields["document_ids"] > 0).sum()), 1)
    return {"tiny (CPU, measured)": tiny_tokens_per_s,
            f"2B stage 1a, per v5p chip at {mfu:.0%} MFU": mfu * flops.peak_flops("v5p") / per_token}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=48, help="training scenes to convert")
    parser.add_argument("--views", type=int, default=8, help="largest view bucket (scenes have max(views, 6) frames)")
    parser.add_argument("--image-size", type=int, default=224, help="geometry frame side (stored scenes: 1.25x)")
    parser.add_argument("--tokens-per-pack", type=int, default=8192)
    parser.add_argument("--packs-per-step", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per pipeline run")
    parser.add_argument("--workers", type=int, default=2, help="Grain worker processes of the second run")
    parser.add_argument("--repeats", type=int, default=4, help="passes over the records for the read rate")
    parser.add_argument("--qa", action="store_true", help="synthetic spatial QA (recon_qa) instead of recon")
    parser.add_argument("--tiny-tokens-per-s", type=float, default=1215.0,
                        help="the tiny train step's tokens/s (docs/PERFORMANCE.md Table 2, tools/bench_train.py)")
    parser.add_argument("--mfu", type=float, default=0.4, help="assumed MFU of the 2B train step")
    args = parser.parse_args(argv)
    if not flags.FLAGS.is_parsed():  # Grain workers read absl flags
        flags.FLAGS.mark_as_parsed()
    data = data_config(args)
    with tempfile.TemporaryDirectory() as tmp:
        stages, scenes = bench_stages(data, pathlib.Path(tmp), args.repeats)
        maker = make_maker(data, scenes)
        runs = {"direct (maker(step), 1 thread)": bench_direct(maker, args.steps)}
        for w in (0, args.workers):
            runs[f"BatchIterator, {w} workers"] = bench_iterator(maker, args.steps, w)
        consumption = train_consumption(maker, args.tiny_tokens_per_s, args.mfu)
    report(args, data, stages, runs)
    print("| train step | tokens/s consumed | pipeline (best mode) / consumed |")
    print("|---|---:|---:|")
    best = max(r["tokens_per_s"] for r in runs.values())
    for name, consumed in consumption.items():
        print(f"| {name} | {consumed:.0f} | {best / consumed:.2f}x |")
    return 0


def report(args, data: C.DataConfig, stages: dict, runs: dict) -> None:
    h = int(args.image_size * 1.25)
    print(f"scenes: {args.scenes} x {max(args.views, 6)} frames of {h}x{h} ({'synthetic_qa' if args.qa else 'synthetic'}); "
          f"frames {data.image_size}, view buckets {data.view_buckets}, {data.tokens_per_pack} tokens/pack, "
          f"{data.packs_per_step} packs/step")
    print("| stage | records/s | note |")
    print("|---|---:|---|")
    print(f"| convert (render + encode + write) | {stages['convert']:.1f} | tfds download_and_prepare, 1 process |")
    print(f"| read (ArrayRecord + deserialise) | {stages['read']:.1f} | random access, {args.repeats} passes |")
    print(f"| decode (record_to_scene) | {stages['decode']:.1f} | all frames |")
    print(f"| transform (sample_views) | {stages['transform']:.1f} | {stages['views_per_sample']} views, augmented |")
    direct = runs["direct (maker(step), 1 thread)"]["packs_per_s"]
    print(f"| pipeline ({pipeline.PREFETCH_STEPS} steps prefetched) | packs/s | samples/s | tokens/s | vs direct "
          "| first batch s |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, r in runs.items():
        print(f"| {mode} | {r['packs_per_s']:.2f} | {r['samples_per_s']:.2f} | {r['tokens_per_s']:.0f} "
              f"| {r['packs_per_s'] / direct:.2f}x | {r['startup_s']:.1f} |")
    print(f"decode / read: {stages['decode'] / stages['read']:.3f}; transform / decode: "
          f"{stages['transform'] / stages['decode']:.2f}")


if __name__ == "__main__":
    sys.exit(main())
