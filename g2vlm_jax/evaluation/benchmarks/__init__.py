"""`g2vlm benchmark` suites: SUITES maps each --suite name to its Suite (base.py), built from the suite
modules' SUITES tuples; runner.run_benchmark evaluates one, predictor.ModelPredictor is the model."""
from __future__ import annotations

from g2vlm_jax.evaluation.benchmarks import depth_suites, pointmap_suites, pose_suites, qa_suites
from g2vlm_jax.evaluation.benchmarks.base import DatasetLayoutError, Predictor, Suite

SUITE_MODULES = (pointmap_suites, depth_suites, pose_suites, qa_suites)


def _registry(modules) -> dict[str, Suite]:
    suites: dict[str, Suite] = {}
    for module in modules:
        for suite in module.SUITES:
            if suite.name in suites:
                raise ValueError(f"benchmark suite name {suite.name!r} is defined twice ({module.__name__})")
            suites[suite.name] = suite
    return suites


SUITES: dict[str, Suite] = _registry(SUITE_MODULES)


def get_suite(name: str) -> Suite:
    """The suite called `name`; an unknown name is a ValueError listing the suites."""
    if name not in SUITES:
        raise ValueError(f"--suite {name!r} is not a benchmark suite; choose one of: {', '.join(sorted(SUITES))}")
    return SUITES[name]


__all__ = ["SUITES", "get_suite", "DatasetLayoutError", "Predictor", "Suite"]
