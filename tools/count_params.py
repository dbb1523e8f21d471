"""Prints the parameter count of a model config, total and per part (SPEC 1.6), without allocating it.

    python tools/count_params.py --config g2vlm_2b
    python tools/count_params.py --config tiny
    python tools/count_params.py --experiment experiments/g2vlm_2b_stage1a.py
"""
import argparse

from g2vlm_jax import config
from g2vlm_jax.model.g2vlm import parameter_counts

CONFIGS = {"g2vlm_2b": config.g2vlm_2b_model, "tiny": config.tiny_model}
PARTS = [("one_expert", "one MoT expert (layers + final norm)"),
         ("llm", "LLM: both experts + embed_tokens + lm_head"),
         ("vit", "semantic encoder (ViT + merger)"),
         ("dino", "geometry encoder (DINOv2-reg)"),
         ("heads", "decoders + heads + dino2llm"),
         ("total", "total")]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--config", choices=sorted(CONFIGS), default="g2vlm_2b", help="a named model config")
    group.add_argument("--experiment", help="experiments/NAME.py[:ARG]: count that experiment's model")
    args = parser.parse_args(argv)
    model_cfg = config.load_experiment(args.experiment).model if args.experiment else CONFIGS[args.config]()
    counts = parameter_counts(model_cfg)
    for key, label in PARTS:
        print(f"{label:<45} {counts[key]:>15,d}  ({counts[key] / 1e9:.3f} B)")


if __name__ == "__main__":
    main()
