"""G2VLM-2B stage 2 "SR" (CE+CE): both experts train on spatial QA (SPEC §3).

Same data and schedule as stage 2; the geometry expert is unfrozen. Arg: hardware preset or a TPU
slice such as 'v5p:4x8x8' (experiments/_tpu_meshes.py).
"""
import dataclasses

from g2vlm_jax import config as c

from experiments import g2vlm_2b_stage2


def get_config(arg: str = "") -> c.ExperimentConfig:
    base = g2vlm_2b_stage2.get_config(arg)
    return dataclasses.replace(
        base,
        name="g2vlm_2b_stage2_sr",
        model=dataclasses.replace(base.model, freeze_recon=False),
        optim=dataclasses.replace(base.optim, stage="stage2_sr"),
    )
