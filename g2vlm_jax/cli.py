"""`g2vlm` command line: each subcommand composes library functions (no logic lives here).

    g2vlm train   --experiment experiments/NAME.py[:ARG] [--set key=value ...]
    g2vlm eval    --experiment ... --checkpoint RUN_DIR
"""
from __future__ import annotations

import argparse
import sys

from g2vlm_jax import config as config_lib


def _experiment_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--experiment", required=True, help="experiments/NAME.py[:ARG]")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set optim.total_steps=100 (repeatable)")
    p.add_argument("--workdir", default="", help="run directory (default: runs/<experiment name>)")


def _load(args) -> config_lib.ExperimentConfig:
    overrides = list(args.overrides) + ([f"workdir={args.workdir}"] if args.workdir else [])
    return config_lib.load_experiment(args.experiment, overrides)


def cmd_train(args) -> int:
    from g2vlm_jax.training import loop

    cfg = _load(args)
    result = loop.train(cfg)
    print(f"finished at step {result.final_step}; run directory {result.workdir}")
    if result.eval_report is not None:
        print(f"evaluation report: {result.workdir / 'eval' / 'report.json'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="g2vlm", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train an experiment (resumes from its run directory)")
    _experiment_args(p)
    p.set_defaults(func=cmd_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except config_lib.ConfigError as e:
        print(f"g2vlm: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
