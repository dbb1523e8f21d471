"""Writes the golden snapshot of every experiment's resolved config to tests/golden/configs/.

Run after an intentional config change, then review the diff:
    python tools/snapshot_configs.py
tests/test_config.py fails whenever an experiment's resolved config drifts from its snapshot.
"""
import json
import pathlib

from g2vlm_jax import config

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = ROOT / "tests" / "golden" / "configs"
# (experiment file, arg) pairs whose resolved configs are frozen.
SNAPSHOTS = [("tiny_synthetic", ""), ("tiny_synthetic", "qa"), ("tiny_synthetic", "test"), ("tiny_synthetic", "qa_test"), ("g2vlm_2b_stage1a", ""), ("g2vlm_2b_stage1a", "v5p"),
             ("g2vlm_2b_stage1b", ""), ("g2vlm_2b_stage2", ""), ("g2vlm_2b_stage2_sr", ""),
             ("g2vlm_2b_stage2", "h100x8")]


def snapshot_name(experiment: str, arg: str) -> str:
    return f"{experiment}{'_' + arg if arg else ''}.json"


def resolved(experiment: str, arg: str) -> dict:
    spec = str(ROOT / "experiments" / f"{experiment}.py") + (f":{arg}" if arg else "")
    return config.to_dict(config.load_experiment(spec))


def main() -> None:
    GOLDEN.mkdir(parents=True, exist_ok=True)
    for experiment, arg in SNAPSHOTS:
        path = GOLDEN / snapshot_name(experiment, arg)
        path.write_text(json.dumps(resolved(experiment, arg), indent=1, sort_keys=True) + "\n")
        print("wrote", path.relative_to(ROOT))


if __name__ == "__main__":
    main()
