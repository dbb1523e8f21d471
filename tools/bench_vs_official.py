"""Side-by-side CPU benchmark: g2vlm_jax vs the official InternRobotics/G2VLM PyTorch code (issue #23).

    PYTHONPATH=. python tools/bench_vs_official.py                       # our side only
    PYTHONPATH=. python tools/bench_vs_official.py --official-src /work/official_src \\
        --official-python /work/official_venv/bin/python [--cases m27-8v-518,...] [--rounds 2] [--repeats 2]

Same weights on both sides: per model, a checkpoint in the official release layout with seeded random
weights on every tensor is written once (`official_reference.write_random_checkpoint`, i.e. our
`g2vlm convert --official` writer); our side loads it with `convert.read_official_dir`, the official side
with its own loader, patched to run on CPU in float32 by `official_reference.build_official_model` (the
patches live there, nothing is copied here). Same inputs: the pi3_room fixture images resized to 518x392
(4:3) and cycled to V files; each side reads and resizes the files itself (the official
`load_and_resize14` rule at the case's width, which our `reconstruct.load_images` reproduces).

Timed call: ours `Reconstructor(model, tok)(load_images(files, width))` (reconstruct.py), official
`model.recon(tokenizer, ids, dino_transform, files)` under `torch.no_grad()` (both: read + resize the
images, one forward, results on the host), fp32, both libraries on their default thread count.
Every measurement runs in a fresh process (its peak RSS is that process's `ru_maxrss`); the rounds
alternate the sides (ours, official, official, ours, ...) so that load from other users of the machine
falls on both; medians over all timed calls. The workers share a persistent compilation cache of this
run, as `g2vlm` enables one: our round-0 process compiles (its peak RSS is the "cold cache" column and
its first call - median call is "compile s"), later rounds read the program back ("peak RSS ours" is the
largest of those warm processes; with --rounds 1 it is the cold one). Outputs compared: max |ours -
official| / max |official| over local points, world points and camera poses.

Models (`model_config`):
  tiny  `config.tiny_model(use_vit=True)`: the parity-test model (0.4 M parameters).
  m27   28.5 M parameters: MoT 4 layers, width 384, 6 query / 2 K/V heads of 64, SwiGLU 1024, vocab 512
        (12.99 M, both experts); DINOv2-reg width 192, 6 layers, 3 heads, MLP 768, position grid 37
        (3.05 M); Pi3 decoders 2 blocks each at width 384 with 6 heads, point/camera dims 128 (12.34 M);
        the tiny ViT (0.12 M, unused by reconstruction).
The train row (`train-tiny-4v-126`) is ours only: one fp32 train step (forward + backward + AdamW) of the
tiny model on one pack of 4 views at 126x98; the official training forward is not driven by this tool.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURE_RGB = pathlib.Path("/work/shared/fixtures/pi3_room/rgb")
FRAME = (518, 392)  # width, height of the prepared input images (4:3: the 518x392 frames)
RESULT = "RESULT "  # prefix of a worker's JSON line on stdout


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    model: str  # key of MODELS
    views: int
    width: int  # the loader's width (height follows the 4:3 frames)
    train: bool = False  # a train step (ours only) instead of reconstruction


CASES = [Case("tiny-2v-126", "tiny", 2, 126), Case("tiny-8v-126", "tiny", 8, 126),
         Case("train-tiny-4v-126", "tiny", 4, 126, train=True), Case("m27-8v-252", "m27", 8, 252),
         Case("m27-2v-518", "m27", 2, 518), Case("m27-8v-518", "m27", 8, 518), Case("m27-16v-518", "m27", 16, 518),
         Case("m27-24v-518", "m27", 24, 518)]


def model_config(name: str):
    """The ModelConfig of a benchmark model (module docstring)."""
    sys.path.insert(0, str(ROOT))
    from g2vlm_jax.config import DinoConfig, HeadsConfig, TextConfig, tiny_model

    if name == "tiny":
        return tiny_model(use_vit=True)
    if name == "m27":
        return tiny_model(
            use_vit=True,
            text=TextConfig(vocab_size=512, hidden_size=384, num_layers=4, num_heads=6, num_kv_heads=2, head_dim=64,
                            mlp_hidden=1024, mrope_sections=(8, 12, 12)),
            dino=DinoConfig(hidden_size=192, num_layers=6, num_heads=3, mlp_hidden=768, pos_grid=37),
            heads=HeadsConfig(decoder_layers=2, decoder_heads=6, point_dim=128, camera_dim=128))
    raise ValueError(f"unknown benchmark model {name!r}; choose one of tiny, m27")


def frame_height(width: int) -> int:
    """The height the official loader gives the prepared frames at `width` (load_and_resize14's rule)."""
    return round(FRAME[1] * width / FRAME[0] / 14) * 14


def peak_rss_mib() -> float:
    """This process's peak resident set (VmHWM). Not getrusage's ru_maxrss: on Linux that survives
    fork + exec, so a worker would report the driver's peak whenever its own is smaller."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("/proc/self/status has no VmHWM line (this tool measures memory on Linux only)")


def image_files(folder: pathlib.Path, views: int) -> list[str]:
    """The first `views` prepared frames (the 8 fixture images cycled)."""
    files = sorted(folder.glob("*.png"))
    return [str(files[i % len(files)]) for i in range(views)]


# ==================================================================================================
# Workers (one fresh process per measurement)
# ==================================================================================================
def _timed(call, repeats: int) -> tuple[float, list[float], object]:
    """(first call s, the `repeats` following calls' s, the last result)."""
    start = time.perf_counter()
    out = call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - start)
    return first, times, out


def worker_ours_recon(args, case: Case) -> dict:
    import numpy as np

    from g2vlm_jax import convert
    from g2vlm_jax.inference import reconstruct
    from g2vlm_jax.tokenizer import load_tokenizer

    cfg, state_dict = convert.read_official_dir(args.ckpt)
    model = convert.from_official(state_dict, dataclasses.replace(cfg, compute_dtype="float32"))
    del state_dict  # the official side keeps no second copy of the weights either
    tok = load_tokenizer(f"qwen2:{args.ckpt}")
    files = [pathlib.Path(f) for f in image_files(pathlib.Path(args.images), case.views)]
    reconstructor = reconstruct.Reconstructor(model, tok)
    first, times, pred = _timed(lambda: reconstructor(reconstruct.load_images(files, case.width)), args.repeats)
    np.savez(args.out, local_points=pred["local_points"], world_points=pred["world_points"], camera_poses=pred["c2w"])
    tokens = reconstruct.recon_batch(tok, reconstruct.load_images(files[:1], case.width)[[0] * case.views])
    return dict(first_s=first, times=times, tokens=int(tokens.token_ids.shape[1]))


def worker_ours_train(args, case: Case) -> dict:
    import jax

    from g2vlm_jax import config as C
    from g2vlm_jax import sharding as sharding_lib
    from g2vlm_jax.core import state as state_lib
    from g2vlm_jax.training import step as step_lib
    from tools.bench_common import recon_batch

    hw = (frame_height(case.width), case.width)
    cfg = C.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:test"),
                            [f"workdir={args.out}.run", "data.packs_per_step=1"])
    cfg = dataclasses.replace(cfg, model=model_config(case.model))
    mesh = sharding_lib.make_mesh(cfg.mesh)
    spec, state, shardings = state_lib.create_train_state(cfg, mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    step_fn = step_lib.make_train_step(spec, cfg, shardings, batch_sharding)
    batch = jax.device_put(recon_batch(case.views, hw=hw), batch_sharding)
    start = time.perf_counter()
    compiled = step_fn.lower(state, batch).compile()
    compile_s = time.perf_counter() - start
    holder = {"state": state}

    def step():
        holder["state"], metrics = compiled(holder["state"], batch, step_fn.schedule)
        return jax.device_get(metrics)

    first, times, _ = _timed(step, args.repeats)
    return dict(first_s=first, times=times, compile_s=compile_s, tokens=int(batch.token_ids.shape[1]))


def worker_official_recon(args, case: Case) -> dict:
    import numpy as np
    import torch

    from tools.official_reference import build_official_model

    if args.official_threads:
        torch.set_num_threads(args.official_threads)
    built = build_official_model(args.official_src, args.ckpt, dino_width=case.width)
    files = image_files(pathlib.Path(args.images), case.views)

    def recon():
        with torch.no_grad():
            return built.model.recon(built.tokenizer, built.new_token_ids, built.dino_transform, list(files))

    first, times, pred = _timed(recon, args.repeats)
    np.savez(args.out, local_points=pred["local_points"][0].numpy(), world_points=pred["points"][0].numpy(),
             camera_poses=pred["camera_poses"][0].numpy())
    return dict(first_s=first, times=times)


def worker_main(args) -> None:
    sys.path.insert(0, str(ROOT))
    case = next(c for c in CASES if c.name == args.case)
    if args.side == "ours":
        result = (worker_ours_train if case.train else worker_ours_recon)(args, case)
    else:
        result = worker_official_recon(args, case)
    result["peak_rss_mib"] = peak_rss_mib()
    print(RESULT + json.dumps(result), flush=True)


# ==================================================================================================
# The driver (project venv)
# ==================================================================================================
def prepare_images(folder: pathlib.Path) -> None:
    """The 8 fixture images resized to FRAME (Lanczos), as PNG files 0.png .. 7.png."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i, f in enumerate(sorted(FIXTURE_RGB.glob("*.png"), key=lambda p: int(p.stem))):
        Image.open(f).convert("RGB").resize(FRAME, Image.LANCZOS).save(folder / f"{i}.png")


def run_worker(python: str, side: str, case: Case, args, ckpt: pathlib.Path, images: pathlib.Path,
               out: pathlib.Path) -> dict:
    """One measurement in a fresh process; returns its RESULT record (raises with its output on failure)."""
    cmd = [python, str(pathlib.Path(__file__).resolve()), "worker", "--side", side, "--case", case.name,
           "--ckpt", str(ckpt), "--images", str(images), "--out", str(out), "--repeats", str(args.repeats)]
    if side == "official":
        cmd += ["--official-src", args.official_src, "--official-threads", str(args.official_threads)]
    # A persistent compilation cache of this run only, as `g2vlm` enables one: round 0 compiles (cold),
    # later rounds read the programs back (warm, the steady state of repeated CLI runs).
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_COMPILATION_CACHE_DIR=str(out.parent / "jax_cache"),
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    if proc.returncode or not lines:
        raise RuntimeError(f"{side} worker for {case.name} failed (exit {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT):])


def max_relative_error(ours: pathlib.Path, official: pathlib.Path) -> float:
    """max |ours - official| / max |official| over local points, world points and camera poses."""
    import numpy as np

    a, b = np.load(ours, allow_pickle=False), np.load(official, allow_pickle=False)
    return max(float(np.max(np.abs(a[k] - b[k])) / np.max(np.abs(b[k]))) for k in ("local_points", "world_points",
                                                                                  "camera_poses"))


def official_attention_gib(case: Case) -> float:
    """GiB of the logits + probabilities of one official MoT attention call: flash-attn's CPU stand-in
    (official_reference.varlen_attention) is dense, 2 x Hq x L^2 fp32 for the L-token geometry chunk."""
    tokens = case.views * ((frame_height(case.width) // 14) * (case.width // 14) + 2)
    return 2 * model_config(case.model).text.num_heads * tokens ** 2 * 4 / 2 ** 30


def memory_available_gib() -> float:
    for line in pathlib.Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2 ** 20
    return float("inf")


def measure_case(case: Case, args, ckpt: pathlib.Path, images: pathlib.Path, tmp: pathlib.Path) -> dict:
    """`args.rounds` rounds, the sides alternating in order; the case's row values."""
    sides = ["ours"] + (["official"] if args.official_python and not case.train else [])
    need, free = official_attention_gib(case), memory_available_gib()
    if "official" in sides and need > args.official_memory_fraction * free:
        print(f"  {case.name}: official side skipped: its dense CPU attention needs ~{need:.1f} GiB per call, "
              f"{free:.1f} GiB are available (--official-memory-fraction {args.official_memory_fraction})",
              file=sys.stderr, flush=True)
        sides = ["ours"]
    runs = {side: [] for side in sides}
    load_before = os.getloadavg()[0]
    for r in range(args.rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            python = sys.executable if side == "ours" else args.official_python
            runs[side].append(run_worker(python, side, case, args, ckpt, images, tmp / f"{case.name}.{side}.npz"))
            print(f"  {case.name} round {r} {side}: {runs[side][-1]}", file=sys.stderr, flush=True)
    row = {"case": case, "load": (load_before, os.getloadavg()[0]), "tokens": runs["ours"][0].get("tokens")}
    for side, records in runs.items():
        warm = records[1:] or records  # ours: processes after round 0 read the compiled programs back
        row[side] = {"median_s": statistics.median(t for rec in records for t in rec["times"]),
                     "rss_mib": max(rec["peak_rss_mib"] for rec in warm),
                     "rss_cold_mib": records[0]["peak_rss_mib"]}
    cold = runs["ours"][0]
    row["compile_s"] = cold["compile_s"] if case.train else cold["first_s"] - row["ours"]["median_s"]
    if "official" in runs:
        row["max_rel_err"] = max_relative_error(tmp / f"{case.name}.ours.npz", tmp / f"{case.name}.official.npz")
    return row


def markdown(rows: list[dict]) -> str:
    head = ("| case | model | views | frame | tokens L | official s | g2vlm_jax s | speed-up | peak RSS official / ours "
            "MiB | ours RSS cold cache MiB | ours compile s | max rel err | load avg |\n"
            "|---|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---|")
    lines = [head]
    for row in rows:
        c, off = row["case"], row.get("official")
        kind = "train step" if c.train else "reconstruct"
        lines.append(" | ".join([
            f"| {c.name} ({kind})", c.model, str(c.views), f"{c.width}x{frame_height(c.width)}", str(row["tokens"]),
            f"{off['median_s']:.3f}" if off else "-", f"{row['ours']['median_s']:.3f}",
            f"{off['median_s'] / row['ours']['median_s']:.2f}x" if off else "-",
            f"{off['rss_mib']:,.0f} / {row['ours']['rss_mib']:,.0f}" if off else f"- / {row['ours']['rss_mib']:,.0f}",
            f"{row['ours']['rss_cold_mib']:,.0f}", f"{row['compile_s']:.1f}", f"{row['max_rel_err']:.1e}" if "max_rel_err" in row else "-",
            f"{row['load'][0]:.1f}-{row['load'][1]:.1f} |"]))
    return "\n".join(lines)


def driver_main(args) -> None:
    names = args.cases.split(",") if args.cases else [c.name for c in CASES]
    unknown = sorted(set(names) - {c.name for c in CASES})
    if unknown:
        raise SystemExit(f"--cases: unknown {unknown}; known: {[c.name for c in CASES]}")
    if bool(args.official_src) != bool(args.official_python):
        raise SystemExit("--official-src and --official-python go together (an official checkout and a python with "
                         "torch + transformers 4.49)")
    cases = [c for c in CASES if c.name in names]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = pathlib.Path(tmp_name)
        prepare_images(tmp / "images")
        sys.path.insert(0, str(ROOT))
        from tools.official_reference import write_random_checkpoint

        ckpts = {model: tmp / f"ckpt_{model}" for model in sorted({c.model for c in cases})}
        for model, path in ckpts.items():
            write_random_checkpoint(model_config(model), path)  # the same weights for both sides
        rows = []
        for case in cases:
            rows.append(measure_case(case, args, ckpts[case.model], tmp / "images", tmp))
            print(markdown(rows[-1:]).splitlines()[-1], file=sys.stderr, flush=True)
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs; medians of {args.rounds} "
          f"process(es) x {args.repeats} call(s) per side; official torch threads: {args.official_threads or 'default'}; "
          "load avg = 1-min load average before-after each row\n")
    print(markdown(rows))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd")
    parser.add_argument("--official-src", default="", help="an InternRobotics/G2VLM checkout (e.g. /work/official_src)")
    parser.add_argument("--official-python", default="", help="a python with torch + transformers 4.49")
    parser.add_argument("--cases", default="", help="comma-separated case names (default: all)")
    parser.add_argument("--rounds", type=int, default=2, help="fresh processes per side and case")
    parser.add_argument("--repeats", type=int, default=2, help="timed calls per process (after the first)")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per worker process")
    parser.add_argument("--official-threads", type=int, default=0,
                        help="torch.set_num_threads in the official workers (0: torch's default, one per core)")
    parser.add_argument("--official-memory-fraction", type=float, default=0.5,
                        help="run the official side only where its dense attention fits this share of MemAvailable")
    w = sub.add_parser("worker", help="one measurement (started by the driver)")
    w.add_argument("--side", choices=("ours", "official"), required=True)
    w.add_argument("--case", required=True)
    for name in ("--ckpt", "--images", "--out"):
        w.add_argument(name, required=True)
    w.add_argument("--repeats", type=int, default=2)
    w.add_argument("--official-src", default="")
    w.add_argument("--official-threads", type=int, default=0)
    args = parser.parse_args(argv)
    (worker_main if args.cmd == "worker" else driver_main)(args)


if __name__ == "__main__":
    main()
