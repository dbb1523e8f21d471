"""`g2vlm` command line: each subcommand composes library functions (no logic lives here).

    g2vlm train   --experiment experiments/NAME.py[:ARG] [--set key=value ...]
    g2vlm eval    --experiment ... --checkpoint RUN_DIR [--step N]
    g2vlm convert-data {npz,scannet,spar,vqa} SRC OUT_DIR [...]   (see `g2vlm convert-data -h`)
    g2vlm reconstruct --checkpoint DIR --images FOLDER --out OUT [--width W]
    g2vlm chat    --checkpoint DIR [--images FILE ...] [--frames FOLDER] --question "..."
    g2vlm benchmark --suite NAME --data DIR --checkpoint CKPT [--out DIR] [--width W] [--max-units N]
                  (the papers' depth / point-map / pose / spatial-QA protocols; docs/BENCHMARKS.md)
    g2vlm export  --checkpoint DIR --out OUT [--experiment E] [--dtype bfloat16] [--official]
    g2vlm convert --official CKPT_DIR --out OUT      (official release -> our params-only checkpoint)
    g2vlm convert --to-official --checkpoint DIR --out OUT   (ours -> the official release layout)
    g2vlm init    --qwen2vl DIR --dinov2 DIR --out OUT [--experiment E]   (the paper's start, public parts)
    g2vlm aot     --experiment experiments/NAME.py --topology v5p:4x4x8 [...]  (g2vlm_jax/aot.py)
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys

from g2vlm_jax import config as config_lib
from g2vlm_jax.console import quiet_library_noise
from g2vlm_jax.outputs import prepare_output_dir
from g2vlm_jax import peer_watch

PEER_FAILURE_EXIT_CODE = peer_watch.EXIT_CODE  # a multi-process run lost a peer
USER_ERROR_EXIT_CODE = 2  # bad config, input file, data or checkpoint (one-line message)


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True, help="experiments/NAME.py[:ARG]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.total_steps=100 (repeatable)")
    p.add_argument("--workdir", default="", help="run directory (default: runs/<experiment name>)")
    _distributed_args(p)


def _distributed_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("multi-process (one process per host; see README 'Running on a TPU pod')")
    g.add_argument("--distributed", choices=("off", "auto", "explicit"), default="off",
                   help="auto: jax.distributed.initialize() detects the cluster (TPU pods, SLURM); explicit: "
                        "--coordinator/--num-processes/--process-id (default: off, or explicit when they are given)")
    g.add_argument("--coordinator", default="", metavar="HOST:PORT", help="address of process 0's coordinator")
    g.add_argument("--num-processes", type=int, default=0)
    g.add_argument("--process-id", type=int, default=-1)
    g.add_argument("--heartbeat-timeout", type=int, default=100,
                   help="seconds without a peer's heartbeat before every process stops with an error")


def initialize_distributed(args):
    """Starts jax.distributed for multi-process runs (before any JAX computation) and returns the
    `peer_watch.PeerWatch` (None for a single process).

    A peer process that dies stops the survivors at once through the peer watch (one line, exit
    status 3); a machine that vanishes without closing its sockets is caught by the coordinator's
    heartbeats within about `--heartbeat-timeout` seconds.
    """
    import jax

    mode = args.distributed
    if mode == "off" and args.coordinator:
        mode = "explicit"
    if mode == "off":
        return None
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts: cross-process collectives
    if mode == "auto":
        jax.distributed.initialize(heartbeat_timeout_seconds=args.heartbeat_timeout)
        return peer_watch.start()
    if not args.coordinator or args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
        raise config_lib.ConfigError("--distributed explicit needs --coordinator HOST:PORT, --num-processes N >= 1 and "
                                     "--process-id in [0, N)")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                               heartbeat_timeout_seconds=args.heartbeat_timeout)
    return peer_watch.start()


def _load(args) -> config_lib.ExperimentConfig:
    workdir = getattr(args, "workdir", "")
    overrides = list(args.overrides) + ([f"workdir={workdir}"] if workdir else [])
    return config_lib.load_experiment(args.experiment, overrides)


def _user_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "fix your input" (imported lazily: `g2vlm -h` stays fast)."""
    from data_pipelines.records import BadRecordError
    from g2vlm_jax.checkpoint import CheckpointMismatchError

    # ValueError includes the benchmarks' DatasetLayoutError (a missing / malformed dataset file); importing it
    # here would load the evaluation package (jax) before every command
    return (config_lib.ConfigError, CheckpointMismatchError, BadRecordError, FileNotFoundError, FileExistsError,
            ValueError)



def cmd_train(args) -> int:
    import jax

    from g2vlm_jax import evaluation
    from g2vlm_jax.training import loop

    cfg = _load(args)
    prepare_output_dir(cfg.run_dir, "--workdir")
    try:
        result = loop.train(cfg, evaluate=evaluation.training_hook(cfg), allow_config_change=args.allow_config_change)
    except jax.errors.JaxRuntimeError as e:
        if jax.process_count() == 1:
            raise
        peer_watch.stop_after_peer_failure(f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}")
    if result.start_step >= cfg.optim.total_steps and result.eval_report is None:
        return 0  # nothing was left to do; the trainer said where the run's report is
    if result.preempted:
        print(f"stopped by {result.stop_signal} at step {result.final_step} of {cfg.optim.total_steps}; the checkpoint is saved: "
              f"run the same command to resume (run directory {result.workdir})")
    else:
        print(f"finished at step {result.final_step}; run directory {result.workdir}")
    if result.eval_report is not None:
        print(f"evaluation report: {result.workdir / 'eval' / 'report.json'}")
    return 0


def cmd_eval(args) -> int:
    import json

    from g2vlm_jax import evaluation
    from g2vlm_jax.training import logger as logger_lib

    cfg = _load(args)
    report = evaluation.evaluate_checkpoint(cfg, args.checkpoint, step=args.step)
    print(json.dumps(logger_lib.flatten_scalars(report), indent=1, sort_keys=True))
    print(f"report: {evaluation.eval_dir(cfg, args.checkpoint) / 'report.json'}")
    return 0


def cmd_convert_data(args) -> int:
    from data_pipelines import convert

    convert.main(args.rest)  # prints what it wrote
    return 0


def cmd_aot(args) -> int:
    from g2vlm_jax import aot

    return aot.run(args)


def cmd_reconstruct(args) -> int:
    from g2vlm_jax.inference import load, reconstruct
    from g2vlm_jax.tokenizer import load_tokenizer

    if args.width is not None and args.width < 14:
        raise ValueError(f"--width {args.width}: the frame width must be at least 14 pixels (one patch); omit it "
                         "for the experiment's width")
    prepare_output_dir(args.out, "--out")  # before the model is loaded and the images are run
    cfg, model = load.load_model(args.checkpoint, args.overrides)
    width = args.width or cfg.data.image_size[1]
    cameras = reconstruct.reconstruct(model, load_tokenizer(cfg.data.tokenizer), args.images, args.out, width=width,
                                      preset=cfg.mesh.preset)
    print(f"wrote {cameras['num_points']} points of {len(cameras['views'])} views to {args.out} "
          f"(dropped {cameras['dropped_points']} non-finite)")
    return 0


def cmd_chat(args) -> int:
    from g2vlm_jax.inference import chat, load
    from g2vlm_jax.tokenizer import load_tokenizer

    if not args.question.strip():
        raise ValueError("--question is empty; ask something, e.g. --question \"Which object is closer?\"")
    if args.temperature < 0:
        raise ValueError(f"--temperature {args.temperature}: must be >= 0 (0 = greedy)")
    cfg, model = load.load_model(args.checkpoint, args.overrides)
    answer = chat.answer(model, load_tokenizer(cfg.data.tokenizer), cfg, question=args.question,
                         images=args.images, frames=args.frames, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(answer)
    return 0


def cmd_benchmark(args) -> int:
    import jax

    from g2vlm_jax.evaluation import benchmarks
    from g2vlm_jax.evaluation.benchmarks import predictor as predictor_lib, runner

    suite = benchmarks.get_suite(args.suite)
    out = args.out or f"runs/benchmarks/{suite.name}"
    runner.check_max_units(args.max_units)
    predictor_lib.check_width(args.width)
    suite.units(args.data)  # a wrong --data layout is reported before the model is loaded
    prepare_output_dir(out, "--out")
    # every process evaluates its own units, so each keeps the model on its own devices
    devices = jax.local_devices() if jax.process_count() > 1 else None
    model = predictor_lib.ModelPredictor.load(args.checkpoint, width=args.width, overrides=args.overrides,
                                              devices=devices)
    report = runner.run_benchmark(suite, model, args.data, out, max_units=args.max_units, checkpoint=args.checkpoint)
    if report is not None:
        print((pathlib.Path(out) / "report.md").read_text(), end="")
        print(f"report: {pathlib.Path(out) / 'report.json'}")
    return 0


def cmd_export(args) -> int:
    from g2vlm_jax import export

    experiment = _load(args) if args.experiment else None
    prepare_output_dir(args.out, "--out")
    out = export.export(args.checkpoint, args.out, dtype=args.dtype, official=args.official, experiment=experiment)
    print(f"wrote params-only checkpoint {out}" + (f" and the official layout in {out / 'official'}" if args.official else ""))
    return 0


def cmd_convert(args) -> int:
    from g2vlm_jax import export

    if args.to_official != bool(args.checkpoint):
        raise ValueError("--checkpoint DIR goes with --to-official (ours -> official); "
                         "--official CKPT_DIR takes no --checkpoint")
    prepare_output_dir(args.out, "--out")
    if args.to_official:
        out = export.export_official(args.checkpoint, args.out, dtype=args.dtype)
        print(f"converted {args.checkpoint} -> {out} (official layout: model.safetensors + config JSONs)")
        return 0
    out = export.import_official(args.official, args.out, dtype=args.dtype)
    print(f"converted {args.official} -> {out} (use it as --checkpoint, or as checkpoint.init_from)")
    return 0


def cmd_init(args) -> int:
    from g2vlm_jax import public_init

    experiment = _load(args) if args.experiment else None
    prepare_output_dir(args.out, "--out")
    out = public_init.write_init_checkpoint(args.qwen2vl, args.dinov2, args.out, experiment=experiment,
                                            dtype=args.dtype, seed=args.seed, geometry_init=args.geometry_init)
    vit = "and ViT " if experiment is None or experiment.model.use_vit else "(ViT skipped: model.use_vit=false) "
    print(f"wrote the initial G2VLM (semantic expert {vit}from {args.qwen2vl}, geometry encoder from {args.dinov2}, "
          f"geometry expert initialised: {args.geometry_init}) to {out}; use it as checkpoint.init_from "
          f"(what came from where: {out / 'init_report.json'})")
    return 0


def _inference_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True,
                   help="training run directory, or a params-only checkpoint from `g2vlm export` / `g2vlm convert`")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override an inference-only config field, e.g. --set model.attention_kernel=blockwise")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2vlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train an experiment (resumes from its run directory)")
    _experiment_args(p)
    p.add_argument("--allow-config-change", action="store_true",
                   help="continue a run whose checkpoint was written with another config (refused otherwise)")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("eval", help="evaluate a run's checkpoint on the held-out split (report + pictures)")
    _experiment_args(p)
    p.add_argument("--checkpoint", required=True, help="run directory of a training run")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest readable)")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("convert-data", help="convert real data (npz scenes, ScanNet, SPAR QA, VQA jsonl) into records",
                       add_help=False)
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_convert_data)
    p = sub.add_parser("reconstruct", help="images -> point cloud (.ply/.glb), depth maps, cameras (JSON)")
    _inference_args(p)
    p.add_argument("--images", required=True, help="folder of images (natural file-name order)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--width", type=int, default=None, help="resize width in pixels (default: the experiment's)")
    p.set_defaults(func=cmd_reconstruct)
    p = sub.add_parser("chat", help="answer a question about images (KV-cache decoding)")
    _inference_args(p)
    p.add_argument("--question", required=True)
    p.add_argument("--images", nargs="*", default=[], help="semantic images (shown to the ViT)")
    p.add_argument("--frames", default="", help="folder of geometry frames in context (default: the --images)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_chat)
    p = sub.add_parser("benchmark", help="evaluate a checkpoint on a paper's benchmark suite (resumable; "
                                         "report.json + report.md)")
    _inference_args(p)
    p.add_argument("--suite", required=True, help="suite name (docs/BENCHMARKS.md; an unknown name lists them)")
    p.add_argument("--data", required=True, help="the dataset folder in its released layout (docs/BENCHMARKS.md)")
    p.add_argument("--out", default="", help="output directory; the same command resumes there (default: "
                                             "runs/benchmarks/<suite>)")
    p.add_argument("--width", type=int, default=None,
                   help="frame width in pixels (default: the checkpoint's experiment width; 518 for the official model)")
    p.add_argument("--max-units", type=int, default=None, help="only the first N units (a quick check)")
    _distributed_args(p)
    p.set_defaults(func=cmd_benchmark)
    p = sub.add_parser("export", help="params-only checkpoint for serving (and the official layout)")
    p.add_argument("--checkpoint", required=True, help="training run directory or params-only checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--experiment", default="",
                   help="experiments/NAME.py[:ARG] to record in the export (default: the checkpoint's own config)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field of --experiment (shapes must still match the checkpoint)")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    p.add_argument("--official", action="store_true", help="also write OUT/official (model.safetensors + configs)")
    p.set_defaults(func=cmd_export, workdir="")
    p = sub.add_parser("init", help="the paper's starting point from public Qwen2-VL and DINOv2-with-registers "
                                    "checkpoints (a params-only checkpoint for checkpoint.init_from)")
    p.add_argument("--qwen2vl", required=True, metavar="DIR", help="Qwen2-VL checkpoint folder (Hugging Face layout)")
    p.add_argument("--dinov2", required=True, metavar="DIR",
                   help="Dinov2WithRegisters checkpoint folder (Hugging Face layout, e.g. dinov2-with-registers-large)")
    p.add_argument("--out", required=True)
    p.add_argument("--experiment", default="", help="experiments/NAME.py[:ARG] whose model (heads, use_vit, dtypes) "
                                                    "to build; default: the 2B config's heads")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--dtype", default="float32", choices=("bfloat16", "float32"))
    p.add_argument("--seed", type=int, default=0, help="seed of the geometry expert / heads initialisation")
    p.add_argument("--geometry-init", default="spec", choices=("spec", "copy"),
                   help="spec: from scratch as the paper (LayerScale 0.01, dino2llm 0); copy: the semantic expert")
    p.set_defaults(func=cmd_init)
    p = sub.add_parser("convert", help="official G2VLM release directory <-> our params-only checkpoint")
    way = p.add_mutually_exclusive_group(required=True)
    way.add_argument("--official", metavar="CKPT_DIR",
                     help="official directory (model.safetensors, text/vit/dino_config.json, tokenizer files) -> ours")
    way.add_argument("--to-official", action="store_true", help="--checkpoint (ours) -> the official layout in --out")
    p.add_argument("--checkpoint", default="", help="with --to-official: training run directory or params-only checkpoint")
    p.add_argument("--out", required=True)
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"),
                   help="dtype of the written parameters (model.safetensors with --to-official)")
    p.set_defaults(func=cmd_convert)
    from g2vlm_jax import aot  # argument definitions only; jax is imported when it runs

    p = sub.add_parser("aot", help="compile an experiment's steps for a TPU slice without a TPU (memory, FLOPs)")
    aot.add_arguments(p)
    p.set_defaults(func=cmd_aot)
    return parser


def _enable_compilation_cache() -> None:
    """Reuse compiled XLA programs across runs (~/.cache/g2vlm_jax/xla unless JAX_COMPILATION_CACHE_DIR is set)."""
    import os

    import jax

    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser("~/.cache/g2vlm_jax/xla"))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["convert-data"]:  # the converters own their argument parser (and its -h)
        args = argparse.Namespace(command="convert-data", rest=argv[1:], func=cmd_convert_data)
    else:
        args = build_parser().parse_args(argv)
    _enable_compilation_cache()
    quiet_library_noise()
    user_errors = _user_errors()
    try:
        watch = initialize_distributed(args) if hasattr(args, "distributed") else None
        code = args.func(args)
        if watch is not None:
            watch.close()  # a clean finish, not a death, for the other processes
        return code
    except user_errors as e:
        # Wrong config, missing file or data, unusable checkpoint: one line naming the problem and the
        # fix, exit status 2. G2VLM_TRACEBACK=1 shows the traceback instead.
        if os.environ.get("G2VLM_TRACEBACK"):
            raise
        print(f"g2vlm {getattr(args, 'command', '')}: {' '.join(str(e).split())}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE


if __name__ == "__main__":
    sys.exit(main())
