"""G2VLM-2B stage 2 ("CE only"): the semantic expert learns spatial QA (SPEC §3: 16K, lr 2e-5, warmup 400).

Geometry expert, ViT and DINO frozen; CE on spatial + general VQA. Arg: hardware preset or a TPU
slice such as 'v5p:4x8x8' (experiments/_tpu_meshes.py).
"""
from g2vlm_jax import config as c

from experiments import _g2vlm_2b_common as common


def get_config(arg: str = "") -> c.ExperimentConfig:
    return c.ExperimentConfig(
        name="g2vlm_2b_stage2",
        model=common.model_2b(freeze_recon=True),
        data=c.DataConfig(sources=(c.DataSource(name="spar_qa", kind="recon_qa", weight=0.7),
                                   c.DataSource(name="vqa_samples/llava_onevision", kind="vqa", weight=0.3)),
                          eval_sources=(c.DataSource(name="spar_qa", kind="recon_qa"),),
                          tokenizer="qwen2:checkpoints/G2VLM-2B-MoT", image_size=(518, 518),
                          vit_image_size=(756, 756), view_buckets=(2, 4, 8, 16), min_views=2, max_views=16,
                          tokens_per_pack=40960, packs_per_step=256, max_text_tokens=2048, num_workers=8),
        loss=c.LossConfig(ce_weight=1.0, vg_weight=0.0),
        optim=c.OptimConfig(stage="stage2", learning_rate=2e-5, warmup_steps=400, total_steps=16_000),
        mesh=common.mesh_for(arg),
        checkpoint=c.CheckpointConfig(every_steps=500, keep_last=3, keep_every=4000,
                                      init_from="runs/g2vlm_2b_stage1b/export,checkpoints/g2vlm_2b_converted"),
        eval=c.EvalConfig(evaluators=("spatial_qa",), every_steps=2000, num_batches=16),
        log_every=10,
    )
