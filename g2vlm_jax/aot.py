"""Ahead-of-time compile of an experiment's train and eval programs for a TPU slice, on any machine.

    g2vlm aot --experiment experiments/g2vlm_2b_stage1a.py --topology v5p:4x4x8 \\
        [--set key=value ...] [--step-time SECONDS] [--buckets all|largest] [--out REPORT.json]
    g2vlm aot --check experiments/aot/g2vlm_2b_stage1a.v5p-4x4x8.json
    python tools/aot_compile.py ...        (the same arguments)

Needs libtpu (`pip install -e ".[tpu-aot]"`), not a TPU: libtpu describes the slice's devices
(`jax.experimental.topologies`) and compiles for them on the host CPU. jax's platforms default to
cpu here (so it does not try to open a TPU), and then several such processes may share libtpu
(ALLOW_MULTIPLE_LIBTPU_LOAD=1).

Steps (nothing of the model's size is ever allocated):
1. The experiment is loaded with ARG = the topology unless its spec names an ARG: `--experiment
   experiments/g2vlm_2b_stage1a.py --topology v5p:4x4x8` calls get_config('v5p:4x4x8'), whose mesh
   comes from experiments/_tpu_meshes.py; `tiny_synthetic.py:test` keeps its own mesh.
2. The trainer's own programs, built by the trainer's code: `sharding.make_mesh(cfg.mesh, slice
   devices)`, `state.abstract_state` + `state.state_shardings` (what `state.create_train_state`
   does without allocating), `step.make_train_step` and `objective.make_eval_step`, which bind the
   preset's activation rules to the jitted programs (`sharding.jit_sharded`): the program compiled
   here is the program `g2vlm train` runs on that mesh. Batches are ShapeDtypeStructs of every data
   bucket (view count x aspect level) at the row shape the data pipeline builds for the token
   budget (`BatchMaker.row_shape`), sharded like the trainer's.
3. Compiles the train step for every bucket (`--buckets all`) or the one with the most geometry
   frames (`largest`), and the held-out geometry program (`core/objective.make_eval_step`) on the evaluation
   bucket (largest view bucket, as `pipeline.make_eval_batches`).
4. Prints and writes a JSON report (--out, default `experiments/aot/<name>.<GEN>-<AxBxC>.json`):
   per-chip bytes (argument / output / donated alias / temp, peak = argument + output - alias +
   temp, from `compiled.memory_analysis()`) against the chip's HBM (g2vlm_jax/chips.py); model FLOPs per step
   (`flops.step_flops` of fully packed rows) and the MFU they give at --step-time (an upper
   bound: real packs hold padding); parameter and optimizer-state bytes per chip; every
   parameter's sharding.

`attention_kernel='auto'` is resolved for the target (TPU: tpu_flash, see model/attention.py
`select_kernel`) before tracing, because 'auto' would otherwise follow the tracing host's backend.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import shlex
import sys
import tempfile
import time
from typing import Any

import numpy as np

from g2vlm_jax import chips

ROOT = pathlib.Path(__file__).resolve().parents[1]
REPORT_DIR = ROOT / "experiments" / "aot"
# Compared by tests/test_aot.py against the committed reports (relative tolerance).
GOLDEN_FIGURES = ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes", "peak_bytes", "model_flops_per_step")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", help="experiments/NAME.py[:ARG] (ARG defaults to the topology)")
    p.add_argument("--topology", help="TPU slice GEN:AxB[xC], e.g. v5e:2x2, v5p:4x4x8")
    p.add_argument("--check", default="", metavar="REPORT.json",
                   help="re-run a committed report's command and fail when a figure moved by more than 5%%")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field (repeatable), as for `g2vlm train`")
    p.add_argument("--step-time", type=float, default=1.0, help="step time in seconds for the MFU bound")
    p.add_argument("--buckets", choices=("all", "largest"), default="all",
                   help="compile the train step for every data bucket or only the one with the most frames")
    p.add_argument("--no-eval", action="store_true", help="skip compiling the evaluation forward")
    p.add_argument("--out", default="", help="report path (default experiments/aot/<name>.<GEN>-<AxBxC>.json)")


# --------------------------------------------------------------------------------------------------
# Target slice and config
# --------------------------------------------------------------------------------------------------
def slice_devices(topology: str) -> list:
    """Compile-only devices of a TPU slice (one per chip). Raises RuntimeError when libtpu is absent."""
    from jax.experimental import topologies

    gen, _ = chips.parse_topology(topology)
    kwargs = {"chip_config_name": chips.TOPOLOGY_CHIP_CONFIG[gen]} if gen in chips.TOPOLOGY_CHIP_CONFIG else {}
    try:
        return list(topologies.get_topology_desc(platform="tpu", topology_name=topology, **kwargs).devices)
    except Exception as e:  # jax raises RuntimeError / JaxRuntimeError without the TPU plugin
        raise RuntimeError(f"cannot describe TPU slice {topology!r}: {e}; install libtpu with "
                           "`pip install -e \".[tpu-aot]\"` (no TPU needed)") from e


def libtpu_available() -> bool:
    """Whether this process can describe TPU slices (libtpu installed); used by tests to skip."""
    try:
        slice_devices("v5e:2x2")
    except RuntimeError:
        return False
    return True


def load_config(experiment: str, topology: str, overrides=()):
    """The experiment for `topology` with 'auto' attention resolved to TPU's kernel.

    Without an ARG in `experiment`, ARG = the topology when the experiment takes one (the 2B
    experiments: their mesh follows the slice); an experiment whose get_config refuses it (e.g.
    tiny_synthetic) is loaded with its default ARG and its own mesh.
    """
    from g2vlm_jax import config as config_lib
    from g2vlm_jax.model.attention import TPU_KERNEL

    if ":" in experiment:
        cfg = config_lib.load_experiment(experiment, list(overrides))
    else:
        try:
            cfg = config_lib.load_experiment(f"{experiment}:{topology}", list(overrides))
        except config_lib.ConfigError as e:
            if "unknown arg" not in str(e):
                raise
            cfg = config_lib.load_experiment(experiment, list(overrides))
    if cfg.model.attention_kernel == "auto":  # what select_kernel picks on a TPU (this host is a CPU)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention_kernel=TPU_KERNEL))
    return cfg


# --------------------------------------------------------------------------------------------------
# Abstract batches
# --------------------------------------------------------------------------------------------------
def row_shape(data, sources, bucket):
    """The pipeline's static row shape of `bucket` (data_pipelines.pipeline.BatchMaker.row_shape)."""
    from data_pipelines import pipeline

    maker = pipeline.BatchMaker(data, [(s, None) for s in sources], process_index=0, process_count=1,
                                augment=False, seed=0)  # row_shape reads only the config and source kinds
    return maker.row_shape(bucket)


def abstract_batch(shape, packs: int, sharding):
    """A PackedBatch of ShapeDtypeStructs (the field table `batch.row_fields`) for `packs` rows of `shape`."""
    import jax

    from g2vlm_jax.batch import PackedBatch, row_fields

    return PackedBatch(**{k: jax.ShapeDtypeStruct((packs,) + dims, dtype, sharding=sharding)
                          for k, (dims, dtype, _) in row_fields(shape).items()})


# A representative spatial question for the FLOPs of QA samples; text is a few % of a QA sample's
# tokens (the frames and the semantic image dominate), so its exact length barely moves the figure.
QA_TEXT = ("Looking at the marked points 1 and 2 in the images, how far apart are they in meters?", "2.4")


def _full_pack(kind: str, shape, tok):
    """One row of `shape` with every sample slot filled by a `kind` sample (a one-pack PackedBatch).

    Only token-level fields are real; image fields are zero-cost broadcasts (step_flops reads
    their shapes only).
    """
    from data_pipelines import sequence
    from g2vlm_jax.batch import PackedBatch

    v, h, w, sh, sw = shape.views, shape.height, shape.width, shape.sem_height, shape.sem_width
    if kind == "recon":
        sample = sequence.recon_sample(tok, v, h, w)
    elif kind == "recon_qa":
        sample = sequence.recon_qa_sample(tok, v, h, w, 1, sh, sw, *QA_TEXT)
    else:
        sample = sequence.vqa_sample(tok, 1, sh, sw, *QA_TEXT)
    samples = [sample]
    while len(samples) < shape.sample_slots and sequence.fits(samples + [sample], shape):
        samples.append(sample)
    row = {k: x[None] for k, x in sequence.pack_row(samples, shape).items()}
    s, n = shape.sample_slots, shape.sem_slots
    zeros = lambda *dims: np.broadcast_to(np.float32(0), (1,) + dims)
    falses = lambda *dims: np.broadcast_to(np.False_, (1,) + dims)
    return PackedBatch(
        **row, geo_images=zeros(s, v, h, w, 3), sample_valid=(np.arange(s) < len(samples))[None],
        sem_images=zeros(n, sh, sw, 3), sem_image_valid=(np.arange(n) < sum(x.num_sem_images for x in samples))[None],
        gt_world_points=zeros(s, v, h, w, 3), gt_valid=falses(s, v, h, w), gt_poses=zeros(s, v, 4, 4),
        gt_intrinsics=zeros(s, v, 3, 3), normal_loss_enabled=np.ones((1, s), bool))


def model_flops_per_pack(cfg, shape) -> float:
    """Analytic model FLOPs (flops.step_flops, train multipliers) of one full pack of `shape`.

    The mean over the training mixture's sample kinds (by weight), each pack holding as many
    samples of that kind as fit; prompts from the built-in tokenizer (the experiment's tokenizer
    files need not be present).
    """
    from g2vlm_jax import flops as flops_lib
    from g2vlm_jax.tokenizer import load_tokenizer

    tok = load_tokenizer("sentencepiece:builtin")
    weights = np.array([src.weight for src in cfg.data.sources], np.float64)
    per_kind = [flops_lib.step_flops(cfg.model, _full_pack(src.kind, shape, tok)).train_total
                for src in cfg.data.sources]
    return float(np.dot(weights / weights.sum(), per_kind))


# --------------------------------------------------------------------------------------------------
# Compile and measure
# --------------------------------------------------------------------------------------------------
def with_shardings(abstract, shardings):
    """ShapeDtypeStructs of `abstract` (a train state of shapes) carrying the trainer's shardings."""
    import jax

    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def memory_figures(compiled) -> dict:
    """Per-chip bytes of a compiled program; peak = argument + output - donated alias + temp.

    (XLA's FLOP count, `compiled.cost_analysis()`, is not used: on TPU it counts a while loop's body
    once, so the scanned decoder layers and the attention tiles would be undercounted.)
    """
    m = compiled.memory_analysis()
    out = {"argument_bytes": int(m.argument_size_in_bytes), "output_bytes": int(m.output_size_in_bytes),
           "alias_bytes": int(m.alias_size_in_bytes), "temp_bytes": int(m.temp_size_in_bytes),
           "generated_code_bytes": int(m.generated_code_size_in_bytes)}
    out["peak_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def _per_chip_bytes(leaf, sharding) -> int:
    return math.prod(sharding.shard_shape(leaf.shape)) * np.dtype(leaf.dtype).itemsize


def state_tables(abstract, shardings) -> tuple[dict, list]:
    """Per-chip bytes of parameters / optimizer state / counters, and one row per parameter."""
    import jax

    totals = {"params_bytes_per_chip": 0, "opt_state_bytes_per_chip": 0, "other_bytes_per_chip": 0}
    rows = []
    leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
    for (path, leaf), sharding in zip(leaves, jax.tree.leaves(shardings)):
        part = getattr(path[0], "name", "")
        per_chip = _per_chip_bytes(leaf, sharding)
        key = {"trainable": "params", "frozen": "params", "opt_state": "opt_state"}.get(part, "other")
        totals[f"{key}_bytes_per_chip"] += per_chip
        if part in ("trainable", "frozen"):
            name = jax.tree_util.keystr(path[1:], simple=True, separator=".").removesuffix(".value")
            rows.append({"name": name, "part": part,
                         "shape": list(leaf.shape), "dtype": str(np.dtype(leaf.dtype)),
                         "spec": [None if a is None else a if isinstance(a, str) else list(a) for a in sharding.spec],
                         "bytes_per_chip": per_chip})
    return totals, rows


def bucket_key(shape) -> dict:
    return {"views": shape.views, "height": shape.height, "width": shape.width, "length": shape.length,
            "sample_slots": shape.sample_slots, "sem_slots": shape.sem_slots}


@dataclasses.dataclass
class Target:
    """The trainer's programs for one experiment on one set of devices, all abstract (nothing allocated)."""

    cfg: Any
    devices: list
    mesh: Any
    spec: Any  # state.StateSpec
    abstract: Any  # TrainState of ShapeDtypeStructs
    shardings: Any  # TrainState of NamedShardings (state.state_shardings)
    batch_sharding: Any
    train_step: Any  # step.TrainStep (step.make_train_step): what the trainer runs
    eval_step: Any  # objective.make_eval_step: what the reconstruction evaluator runs

    @property
    def state_args(self):
        return with_shardings(self.abstract, self.shardings)

    def batch_args(self, shape):
        return abstract_batch(shape, self.cfg.data.packs_per_step, self.batch_sharding)


def prepare(cfg, devices: list) -> Target:
    """Mesh, abstract train state, shardings and jitted programs exactly as training/loop.py builds
    them, on `devices` (a TPU slice's, or this host's)."""
    from g2vlm_jax import config as config_lib
    from g2vlm_jax import sharding as sharding_lib
    from g2vlm_jax.core import objective
    from g2vlm_jax.core import state as state_lib
    from g2vlm_jax.training import step as step_lib

    mesh = sharding_lib.make_mesh(cfg.mesh, devices)
    per_update = cfg.data.packs_per_step // cfg.optim.grad_accum_steps
    parallel = sharding_lib.axis_size(mesh, sharding_lib.BATCH_AXES)
    if per_update % parallel:
        raise config_lib.ConfigError(
            f"config field 'data.packs_per_step': {cfg.data.packs_per_step} packs per step"
            f"{f' / {cfg.optim.grad_accum_steps} micro-batches' if cfg.optim.grad_accum_steps > 1 else ''} do not "
            f"divide over the {parallel} data-parallel chips of this mesh ({dict(mesh.shape)}); pass --set "
            f"data.packs_per_step={parallel * cfg.optim.grad_accum_steps} (or a multiple)", "data.packs_per_step")
    spec, abstract = state_lib.abstract_state(cfg)
    shardings = state_lib.state_shardings(abstract, mesh, cfg.mesh.preset)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    return Target(cfg, list(devices), mesh, spec, abstract, shardings, batch_sharding,
                  step_lib.make_train_step(spec, cfg, shardings, batch_sharding),
                  objective.make_eval_step(spec, cfg, shardings, batch_sharding))


def train_shapes(cfg, buckets: str = "all") -> list:
    """Row shapes of the training buckets: all, or the one with the most geometry pixels ('largest')."""
    from data_pipelines import pipeline

    shapes = [row_shape(cfg.data, cfg.data.sources, b) for b in pipeline.train_buckets(cfg.data)]
    if buckets == "largest":
        shapes = [max(shapes, key=lambda s: (s.sample_slots * s.views * s.height * s.width, s.views))]
    return shapes


def eval_shape_of(cfg):
    from data_pipelines import pipeline

    return row_shape(cfg.data, cfg.data.eval_sources, pipeline.eval_bucket(cfg.data))


def lower_train(target: Target, shape):
    """The trainer's train step lowered for one bucket (`.as_text()` is the StableHLO it runs)."""
    return target.train_step.lower(target.state_args, target.batch_args(shape))


def lower_eval(target: Target):
    """The reconstruction evaluator's program lowered for the evaluation bucket."""
    return target.eval_step.lower(target.state_args, target.batch_args(eval_shape_of(target.cfg)))


def compile_train(target: Target, shape):
    return lower_train(target, shape).compile()


def compile_eval(target: Target):
    return lower_eval(target).compile()


def timed_figures(log, what: str, compile_fn) -> dict:
    """Figures of `compile_fn()`, or the compiler's error when the program does not fit HBM."""
    import jax

    log(f"compiling {what} ...")
    start = time.perf_counter()
    try:
        figures = memory_figures(compile_fn())
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        figures = {"error": str(e).strip().splitlines()[0]}
    return {**figures, "compile_seconds": round(time.perf_counter() - start, 1)}


def compile_experiment(cfg, topology: str, *, buckets: str = "all", with_eval: bool = True, log=print) -> dict:
    """Compiles `cfg`'s train step per bucket (and the eval forward) for `topology`; the report dict."""
    target = prepare(cfg, slice_devices(topology))
    report = {"train": []}
    for shape in train_shapes(cfg, buckets):
        what = (f"train step: {shape.views} views {shape.height}x{shape.width}, {shape.sample_slots} sample slots, "
                f"rows of {shape.length}")
        figures = timed_figures(log, what, lambda: compile_train(target, shape))
        report["train"].append({"bucket": bucket_key(shape), **figures,
                                "model_flops_per_step": model_flops_per_pack(cfg, shape) * cfg.data.packs_per_step})
    if with_eval:
        report["eval"] = {"bucket": bucket_key(eval_shape_of(cfg)),
                          **timed_figures(log, "eval forward", lambda: compile_eval(target))}
    totals, rows = state_tables(target.abstract, target.shardings)
    gen, _ = chips.parse_topology(topology)
    chip = chips.chip_named(gen)
    return {"experiment": cfg.name, "topology": topology, "device_kind": target.devices[0].device_kind,
            "num_chips": len(target.devices), "hbm_bytes_per_chip": chip.hbm_bytes,
            "peak_flops_per_chip": chip.peak_bf16_flops,
            "mesh": {"preset": cfg.mesh.preset, **{k: int(v) for k, v in target.mesh.shape.items()}},
            "attention_kernel": cfg.model.attention_kernel, "packs_per_step": cfg.data.packs_per_step,
            **totals, **report, "parameters": rows}


def summarise(report: dict, step_time: float) -> dict:
    """Adds the worst bucket's peak / HBM, the most model FLOPs per step and the MFU they give at `step_time` s.

    The MFU is a bound: every sample slot is filled (real packs carry some padding). `fits` is
    False when a program did not compile for lack of HBM (its entry holds the compiler's message).
    """
    hbm = report["hbm_bytes_per_chip"]
    programs = report["train"] + ([report["eval"]] if "eval" in report else [])
    fits = all("error" not in r for r in programs)
    worst = max(report["train"], key=lambda r: r.get("peak_bytes", math.inf))
    flops_step = max(r["model_flops_per_step"] for r in report["train"])
    report["summary"] = {
        "fits": fits, "worst_train_bucket": worst["bucket"],
        "peak_bytes_per_chip": worst.get("peak_bytes"),
        "peak_fraction_of_hbm": worst["peak_bytes"] / hbm if "peak_bytes" in worst else None,
        "eval_peak_fraction_of_hbm": report["eval"].get("peak_bytes", math.nan) / hbm if "eval" in report else None,
        "flops_per_step": flops_step, "step_time_s": step_time,
        "mfu_bound": flops_step / (step_time * report["num_chips"] * report["peak_flops_per_chip"]),
    }
    return report


# --------------------------------------------------------------------------------------------------
# Printing and the command line
# --------------------------------------------------------------------------------------------------
def _gib(n: float) -> str:
    return f"{n / 1024**3:8.3f} GiB"


def _program_line(name: str, r: dict, hbm: int) -> str:
    if "error" in r:
        return f"{name:<30}does not fit: {r['error']}"
    sizes = "".join(f"{_gib(r[k]):>13}" for k in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes",
                                                   "peak_bytes"))
    flops = f"{r['model_flops_per_step'] / 1e15:>12.3f}" if "model_flops_per_step" in r else f"{'':>12}"
    return f"{name:<30}{sizes}{r['peak_bytes'] / hbm:>8.1%}{flops}{r['compile_seconds']:>10.1f}"


def format_report(report: dict) -> str:
    hbm = report["hbm_bytes_per_chip"]
    lines = [f"{report['experiment']} on {report['topology']} ({report['num_chips']} x {report['device_kind']}, "
             f"HBM {_gib(hbm).strip()} per chip), mesh {report['mesh']}, attention {report['attention_kernel']}",
             f"parameters {_gib(report['params_bytes_per_chip'])} per chip, optimizer state "
             f"{_gib(report['opt_state_bytes_per_chip'])} per chip", "",
             f"{'program (per chip)':<30}{'argument':>13}{'output':>13}{'alias':>13}{'temp':>13}{'peak':>13}"
             f"{'of HBM':>8}{'PFLOP/step':>12}{'compile s':>10}"]
    for r in report["train"]:
        b = r["bucket"]
        lines.append(_program_line(f"train V={b['views']} {b['height']}x{b['width']}", r, hbm))
    if "eval" in report:
        lines.append(_program_line(f"eval V={report['eval']['bucket']['views']}", report["eval"], hbm))
    s = report["summary"]
    peak = f"{s['peak_fraction_of_hbm']:.1%}" if s["peak_fraction_of_hbm"] is not None else "over 100%"
    lines += ["", f"worst train peak {peak} of HBM; up to {s['flops_per_step']:.3e} model FLOPs per step "
              f"(full packs); MFU bound at {s['step_time_s']:g} s/step: {s['mfu_bound']:.1%}",
              "", f"{'parameter':<72} {'part':<10}{'shape':<22}{'spec':<28}{'bytes/chip':>12}"]
    for r in report["parameters"]:
        lines.append(f"{r['name']:<72} {r['part']:<10}{str(tuple(r['shape'])):<22}{str(tuple(r['spec'])):<28}"
                     f"{r['bytes_per_chip']:>12,d}")
    return "\n".join(lines)


def default_out(report: dict) -> pathlib.Path:
    return REPORT_DIR / f"{report['experiment']}.{report['topology'].replace(':', '-')}.json"


def compare_reports(golden: dict, fresh: dict, tolerance: float = 0.05) -> list[str]:
    """Differences between two reports of the same command: buckets, per-chip bytes, FLOPs, shardings.

    Byte and FLOP figures may move by `tolerance` (relative); the mesh, buckets, per-chip
    parameter / optimizer bytes and every parameter's sharding must be equal.
    """
    problems = []
    for key in ("topology", "mesh", "num_chips", "params_bytes_per_chip", "opt_state_bytes_per_chip", "parameters"):
        if golden.get(key) != fresh.get(key):
            problems.append(f"{key} changed")
    pairs = list(zip(golden["train"], fresh["train"])) + ([(golden["eval"], fresh["eval"])] if "eval" in golden else [])
    if len(golden["train"]) != len(fresh["train"]) or ("eval" in golden) != ("eval" in fresh):
        problems.append("the compiled programs changed")
    for old, new in pairs:
        if old["bucket"] != new["bucket"]:
            problems.append(f"bucket {old['bucket']} is now {new['bucket']}")
        for key in GOLDEN_FIGURES:
            if key in old and not math.isclose(old[key], new.get(key, math.inf), rel_tol=tolerance):
                problems.append(f"bucket V={old['bucket']['views']} {key}: {old[key]:.4g} -> {new.get(key)}")
    return problems


def parse_command(command: str) -> argparse.Namespace:
    """The arguments of a report's `command` (`g2vlm aot ...`, or `python tools/aot_compile.py ...`)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(shlex.split(command)[2:])


def run(args) -> int:
    """Compiles, prints and writes the report of parsed `args` (see `add_arguments`)."""
    if args.check:
        golden = json.loads(pathlib.Path(args.check).read_text())
        fresh_args = parse_command(golden["command"])
        fresh_args.out = str(pathlib.Path(tempfile.mkdtemp()) / "report.json")
        run(fresh_args)
        problems = compare_reports(golden, json.loads(pathlib.Path(fresh_args.out).read_text()))
        print("\n".join([f"{args.check}: {p}" for p in problems] or [f"{args.check}: unchanged (within 5%)"]))
        return 1 if problems else 0
    if not (args.experiment and args.topology):
        raise SystemExit("g2vlm aot: --experiment and --topology are required (or --check REPORT.json)")
    import jax

    if not os.environ.get("JAX_PLATFORMS"):
        jax.config.update("jax_platforms", "cpu")  # compile-only: never try to open a TPU
    if jax.config.jax_platforms == "cpu":
        # libtpu's lock guards the TPU chips; a compile-only process may share libtpu with others.
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    # Executables compiled for a described (not attached) slice cannot be read back from the
    # persistent cache (no TPU client), so writing them there would only cost time.
    jax.config.update("jax_enable_compilation_cache", False)
    cfg = load_config(args.experiment, args.topology, args.overrides)
    try:
        slice_devices(args.topology)
    except RuntimeError as e:
        print(f"g2vlm aot: {e}", file=sys.stderr)
        return 2
    report = compile_experiment(cfg, args.topology, buckets=args.buckets, with_eval=not args.no_eval,
                                log=lambda m: print(m, file=sys.stderr, flush=True))
    report = {"command": command_line(args), **summarise(report, args.step_time)}
    out = pathlib.Path(args.out) if args.out else default_out(report)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")  # first: the compiles are the expensive part
    print(format_report(report))
    print(f"\nreport: {out}")
    return 0 if report["summary"]["fits"] else 1


def command_line(args) -> str:
    """The command that reproduces `args` (kept in the report)."""
    parts = ["g2vlm aot", f"--experiment {args.experiment}", f"--topology {args.topology}"]
    parts += [f"--set {o}" for o in args.overrides]
    parts += [f"--step-time {args.step_time:g}", f"--buckets {args.buckets}"] + (["--no-eval"] if args.no_eval else [])
    return " ".join(parts + ([f"--out {args.out}"] if args.out else []))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


