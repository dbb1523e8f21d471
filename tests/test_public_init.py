"""`g2vlm init` (issue #20): the paper's starting point from public Qwen2-VL and DINOv2-with-registers checkpoints.

tests/golden/public/ holds tiny checkpoints in the exact Hugging Face layouts (a sharded Qwen2-VL with
an index and a tied lm_head, a single-file Dinov2WithRegisters; seeded random weights) and what the
transformers implementations compute with them; tools/public_reference.py makes both (torch venv;
these tests never import torch).
"""
import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import cli, convert, public_init
from g2vlm_jax import config as C
from g2vlm_jax.inference import load
from tests.parity import TOLERANCE, relative_error

ROOT = pathlib.Path(__file__).resolve().parents[1]
PUBLIC = ROOT / "tests" / "golden" / "public"
QWEN, DINO = PUBLIC / "qwen2vl", PUBLIC / "dinov2_reg"
TINY = "experiments/tiny_synthetic.py:test"
TWO_LAYERS = ["--set", "model.text.num_layers=2", "--set", "model.dino.num_layers=2"]  # the public tiny sizes


@pytest.fixture(scope="module")
def ref():
    return np.load(PUBLIC / "reference.npz")


@pytest.fixture(scope="module")
def full_model():
    """Both encoders (use_vit) at the public sizes, through the library call."""
    cfg = public_init.model_config(QWEN, DINO, C.tiny_model(use_vit=True))
    return public_init.init_from_public(QWEN, DINO, cfg, seed=3)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    """The README's command: `g2vlm init --qwen2vl DIR --dinov2 DIR --out OUT --experiment E`."""
    out = tmp_path_factory.mktemp("init") / "tiny_public"
    assert cli.main(["init", "--qwen2vl", str(QWEN), "--dinov2", str(DINO), "--out", str(out), "--experiment", TINY,
                     *TWO_LAYERS]) == 0
    return out


def test_imported_encoders_match_the_reference_implementations(full_model, ref):
    """The imported DINOv2-with-registers and Qwen2-VL ViT give what transformers' classes give on the same
    weights: DINO at its native grid and at an interpolated one (bicubic with antialias), the ViT + merger."""
    model, _ = full_model
    for suffix in ("_native", ""):
        images = jnp.asarray(ref[f"dino_images{suffix}_uint8"], jnp.float32) / 255
        tokens = nnx.jit(lambda m, x: m(x))(model.dino_model, images)
        assert relative_error(tokens, ref[f"dino_last_hidden{suffix}"][:, 1 + 4:]) < TOLERANCE  # patch tokens
    images = jnp.asarray(ref["vit_images_uint8"], jnp.float32) / 255
    tokens = nnx.jit(lambda m, x: m(x))(model.vit_model, images)
    assert relative_error(np.asarray(tokens).reshape(-1, tokens.shape[-1]), ref["vit_tokens"]) < TOLERANCE


def test_every_public_tensor_is_used_and_the_rest_initialised_as_spec(full_model):
    """Each public tensor lands unchanged at its official name; lm_head is untied from the embeddings;
    the geometry expert, dino2llm and heads are initialised as SPEC 1.1/1.3 says; QK-norm weights are one."""
    model, report = full_model
    public = {**load_file(str(QWEN / "model-00001-of-00003.safetensors")),
              **load_file(str(QWEN / "model-00002-of-00003.safetensors")),
              **load_file(str(QWEN / "model-00003-of-00003.safetensors")),
              **{f"dino:{k}": v for k, v in load_file(str(DINO / "model.safetensors")).items()}}
    assert not report.ignored and report.untied_lm_head
    assert len(report.loaded) == len(public) + 1  # + the untied lm_head
    ours = convert.to_official(model)
    for official, name in report.loaded.items():
        source = public[("dino:" + name) if official.startswith("dino_model.") else name.split(" ")[0]]
        np.testing.assert_array_equal(ours[official], source, err_msg=official)
    np.testing.assert_array_equal(ours["language_model.lm_head.weight"], public["model.embed_tokens.weight"])
    geometry = {n: v for n, v in ours.items() if "_moe_geo" in n}
    assert geometry and not any(n in report.loaded for n in geometry)
    for name, value in geometry.items():
        if "layernorm" in name or "norm" in name.split(".")[-2]:
            np.testing.assert_array_equal(value, 1.0, err_msg=name)  # RMSNorm weights and QK-norms
        elif name.endswith(".bias"):
            np.testing.assert_array_equal(value, 0.0, err_msg=name)
        else:
            assert abs(float(value.std()) - 0.02) < 0.004, name  # normal(0.02)
    for name in ("q_norm", "k_norm"):  # stock Qwen2-VL has no QK-norm: ones
        np.testing.assert_array_equal(ours[f"language_model.model.layers.1.self_attn.{name}.weight"], 1.0)
    np.testing.assert_array_equal(ours["dino2llm.weight"], 0.0)
    np.testing.assert_array_equal(ours["dino2llm.bias"], 0.0)
    for name in ("ls1", "ls2"):
        np.testing.assert_allclose(ours[f"language_model.model.layers.0.{name}.gamma"], 0.01)


def test_copy_init_starts_the_geometry_expert_from_the_semantic_one(full_model):
    cfg = public_init.model_config(QWEN, DINO, C.tiny_model(use_vit=True))
    model, _ = public_init.init_from_public(QWEN, DINO, cfg, geometry_init="copy")
    ours = convert.to_official(model)
    np.testing.assert_array_equal(ours["language_model.model.layers.1.mlp_moe_geo.down_proj.weight"],
                                  ours["language_model.model.layers.1.mlp.down_proj.weight"])
    np.testing.assert_array_equal(ours["language_model.model.norm_moe_geo.weight"], ours["language_model.model.norm.weight"])


def test_init_checkpoint_starts_a_training_run(init_dir):
    """The init checkpoint of a reconstruction-only experiment skips the ViT (reported), loads, and a
    `g2vlm train` with checkpoint.init_from starts from it (DINO weights are the public ones)."""
    report = json.loads((init_dir / "init_report.json").read_text())
    assert report["ignored"] and all(name.startswith("visual.") for name in report["ignored"])
    cfg, model = load.load_model(init_dir)
    assert not cfg.model.use_vit and cfg.data.tokenizer == f"qwen2:{init_dir / 'tokenizer.json'}"  # copied along
    public_cls = load_file(str(DINO / "model.safetensors"))["embeddings.cls_token"]
    np.testing.assert_array_equal(np.asarray(model.dino_model.embeddings.cls_token.get_value()), public_cls)
    workdir = init_dir.parent / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "g2vlm_jax.cli", "train", "--experiment", TINY, *TWO_LAYERS,
                          "--set", f"checkpoint.init_from={init_dir}", "--set", "optim.total_steps=2",
                          "--set", "optim.warmup_steps=1", "--workdir", str(workdir)],
                         capture_output=True, text=True, env=env, cwd=str(ROOT), timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "train"] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows if r["kind"] == "train")


def test_init_from_lists_checkpoints_first_one_wins(init_dir, tmp_path):
    """Stage 2 after stage 1: the experts from the stage-1 checkpoint (which has no ViT), the ViT from the
    next listed one (`g2vlm init` with a semantic encoder)."""
    from g2vlm_jax import sharding
    from g2vlm_jax.core import state as state_lib

    base = C.load_experiment(TINY, TWO_LAYERS[1::2])
    with_vit = dataclasses.replace(base, model=dataclasses.replace(base.model, use_vit=True))
    full = public_init.write_init_checkpoint(QWEN, DINO, tmp_path / "full", experiment=with_vit, seed=9)
    cfg = dataclasses.replace(with_vit, checkpoint=dataclasses.replace(with_vit.checkpoint,
                                                                       init_from=f"{init_dir},{full}"))
    _, state, _ = state_lib.create_train_state(cfg, sharding.make_mesh(cfg.mesh))
    state = ckpt_lib.initialise_from(state, cfg)
    loaded = {**ckpt_lib.flat_params(state.trainable), **ckpt_lib.flat_params(state.frozen)}
    first, _ = ckpt_lib.load_params(init_dir)
    second, _ = ckpt_lib.load_params(full)
    geo = "language_model/layers/self_attn/q_proj_moe_geo/kernel"  # differs: seeds 0 and 9
    assert not np.array_equal(first[geo], second[geo])
    np.testing.assert_array_equal(np.asarray(loaded[geo]), first[geo])
    vit = next(n for n in second if n.startswith("vit_model/"))
    assert vit not in first
    np.testing.assert_array_equal(np.asarray(loaded[vit]), second[vit])


def test_bad_public_folders_are_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json is missing; pass the Qwen2-VL checkpoint folder"):
        public_init.model_config(tmp_path / "empty", DINO)
    with pytest.raises(ValueError, match="is not a Qwen2-VL config"):
        public_init.model_config(DINO, DINO)
    with pytest.raises(ValueError, match="model.text.num_layers: experiment 1, public 2"):
        public_init.model_config(QWEN, DINO, C.load_experiment(TINY).model)
    # A DINO of another width than its config.json says: named, with both shapes.
    wrong = tmp_path / "dino"
    wrong.mkdir()
    (wrong / "config.json").write_text((DINO / "config.json").read_text())
    tensors = load_file(str(DINO / "model.safetensors"))
    tensors["embeddings.cls_token"] = np.zeros((1, 1, 16), np.float32)
    from safetensors.numpy import save_file
    save_file(tensors, str(wrong / "model.safetensors"))
    cfg = public_init.model_config(QWEN, wrong, C.tiny_model(use_vit=True))
    with pytest.raises(ValueError, match=r"embeddings.cls_token' has shape \(1, 1, 16\)"):
        public_init.init_from_public(QWEN, wrong, cfg)


def test_both_transformers_layouts_map_to_the_official_names():
    """transformers < 4.52 saves Qwen2-VL as model.* / visual.* / lm_head; 4.52 and later as
    model.language_model.* / model.visual.* / lm_head: both land on the same official names."""
    for old, new, official in (
            ("model.layers.3.self_attn.q_proj.weight", "model.language_model.layers.3.self_attn.q_proj.weight",
             "language_model.model.layers.3.self_attn.q_proj.weight"),
            ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
             "language_model.model.embed_tokens.weight"),
            ("visual.merger.mlp.0.weight", "model.visual.merger.mlp.0.weight", "vit_model.merger.mlp.0.weight"),
            ("lm_head.weight", "lm_head.weight", "language_model.lm_head.weight")):
        assert public_init.official_name(old) == public_init.official_name(new) == official
