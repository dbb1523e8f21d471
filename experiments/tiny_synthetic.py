"""The README's main job: a tiny G2VLM trained on built-in synthetic scenes on CPU in minutes.

Stage-1 recipe at toy scale (geometry expert, dino2llm and heads train; the semantic expert and
both encoders are frozen), on procedurally rendered scenes with exact depth and poses, followed by
the reconstruction evaluator on the held-out validation split.

Args (`--experiment experiments/tiny_synthetic.py:ARG`):
  ""      stage-1 reconstruction (default)
  "qa"    stage-2 on synthetic spatial QA (semantic expert trains with CE)
"""
from g2vlm_jax import config as c


def get_config(arg: str = "") -> c.ExperimentConfig:
    if arg not in ("", "qa"):
        raise c.ConfigError(f"tiny_synthetic: unknown arg {arg!r}; allowed values are ['', 'qa']")
    qa = arg == "qa"
    model = c.tiny_model(freeze_und=not qa, freeze_recon=qa, use_vit=qa)
    source = c.DataSource(name="synthetic_qa" if qa else "synthetic", kind="recon_qa" if qa else "recon")
    data = c.DataConfig(
        sources=(source,),
        eval_sources=(source,),
        tokenizer="sentencepiece:builtin",
        image_size=(56, 56),
        vit_image_size=(56, 56),
        view_buckets=(2, 4),
        min_views=2,
        max_views=4,
        tokens_per_pack=384,
        packs_per_step=4,
        max_text_tokens=96,
        augment=True,
    )
    return c.ExperimentConfig(
        name="tiny_synthetic_qa" if qa else "tiny_synthetic",
        model=model,
        data=data,
        loss=c.LossConfig(vg_weight=0.0 if qa else 1.0),
        optim=c.OptimConfig(stage="stage2" if qa else "stage1", learning_rate=2e-3, min_learning_rate=1e-5,
                            warmup_steps=20, total_steps=300),
        mesh=c.MeshConfig(preset="fsdp", data=1, fsdp=-1, tensor=1),
        checkpoint=c.CheckpointConfig(every_steps=100, keep_last=2),
        eval=c.EvalConfig(evaluators=("spatial_qa",) if qa else ("reconstruction",), every_steps=100,
                          num_batches=4),
        log_every=10,
    )
