"""G2VLM-2B stage 1a: geometry expert at 224x224 (SPEC §3: 100K steps, lr 2e-4, warmup 5K).

Trains the geometry expert, dino2llm and the heads with the visual-geometry loss only; the semantic
expert (initialised from Qwen2-VL-2B via the converted official checkpoint), ViT and DINO are frozen.
Arg: hardware preset ('', 'v5p', 'v5e', 'h100x8') or a TPU slice such as 'v5p:4x4x8' (mesh from
experiments/_tpu_meshes.py; checked by `g2vlm aot`, report in experiments/aot/).
"""
from g2vlm_jax import config as c

from experiments import _g2vlm_2b_common as common


def get_config(arg: str = "") -> c.ExperimentConfig:
    return c.ExperimentConfig(
        name="g2vlm_2b_stage1a",
        model=common.model_2b(freeze_und=True, use_vit=False),
        data=c.DataConfig(sources=(c.DataSource(name="scenes_mixture", kind="recon"),),
                          eval_sources=(c.DataSource(name="scenes_mixture", kind="recon"),),
                          tokenizer="qwen2:checkpoints/G2VLM-2B-MoT", image_size=(224, 224),
                          view_buckets=(2, 4, 8, 12, 16, 24), min_views=2, max_views=24,
                          tokens_per_pack=25600, packs_per_step=128, num_workers=8),
        loss=c.LossConfig(ce_weight=0.0, vg_weight=1.0),
        optim=c.OptimConfig(stage="stage1", learning_rate=2e-4, warmup_steps=5000, total_steps=100_000),
        mesh=common.mesh_for(arg),
        checkpoint=c.CheckpointConfig(every_steps=1000, keep_last=3, keep_every=10_000,
                                      init_from="checkpoints/g2vlm_2b_converted"),
        eval=c.EvalConfig(evaluators=("reconstruction",), every_steps=5000, num_batches=16),
        log_every=10,
    )
