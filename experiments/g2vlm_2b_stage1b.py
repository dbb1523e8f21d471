"""G2VLM-2B stage 1b: geometry expert at 518 wide, aspect 0.5-1.0 (SPEC §3: 20K steps, lr 5e-4).

Continues from the stage-1a checkpoint. A 518x518 frame is 37x37 = 1369 geometry tokens, so the
25,600-token pack holds at most 18 frames: V is drawn from 2..18 here (2..24 at 224 in stage 1a).
Arg: hardware preset ('', 'v5p', 'v5e', 'h100x8') or a TPU slice such as 'v5p:4x8x8' (experiments/_tpu_meshes.py).
"""
from g2vlm_jax import config as c

from experiments import _g2vlm_2b_common as common


def get_config(arg: str = "") -> c.ExperimentConfig:
    return c.ExperimentConfig(
        name="g2vlm_2b_stage1b",
        model=common.model_2b(freeze_und=True, use_vit=False),
        data=c.DataConfig(sources=(c.DataSource(name="scenes_mixture", kind="recon"),),
                          eval_sources=(c.DataSource(name="scenes_mixture", kind="recon"),),
                          tokenizer="qwen2:checkpoints/G2VLM-2B-MoT", image_size=(518, 518),
                          aspect_range=(0.5, 1.0), view_buckets=(2, 4, 8, 12, 16, 18), min_views=2,
                          max_views=18, tokens_per_pack=25600, packs_per_step=256, num_workers=8),
        loss=c.LossConfig(ce_weight=0.0, vg_weight=1.0),
        optim=c.OptimConfig(stage="stage1", learning_rate=5e-4, warmup_steps=1000, total_steps=20_000),
        mesh=common.mesh_for(arg),
        checkpoint=c.CheckpointConfig(every_steps=1000, keep_last=3, keep_every=5000,
                                      init_from="runs/g2vlm_2b_stage1a/export"),
        eval=c.EvalConfig(evaluators=("reconstruction",), every_steps=2000, num_batches=16),
        log_every=10,
    )
