"""Experiment configs: golden snapshots, typed overrides, validation messages, round trips."""
import dataclasses
import json
import pathlib

import pytest

from g2vlm_jax import config
from tools import snapshot_configs

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("experiment,arg", snapshot_configs.SNAPSHOTS)
def test_experiment_matches_golden_snapshot(experiment, arg):
    golden = json.loads((snapshot_configs.GOLDEN / snapshot_configs.snapshot_name(experiment, arg)).read_text())
    assert snapshot_configs.resolved(experiment, arg) == golden, (
        "resolved config drifted from its golden snapshot; if intended, run python tools/snapshot_configs.py")


def test_every_experiment_module_is_snapshotted():
    modules = {p.stem for p in (ROOT / "experiments").glob("*.py") if not p.stem.startswith("_")}
    assert modules == {name for name, _ in snapshot_configs.SNAPSHOTS}


def test_overrides_are_typed_and_order_independent():
    cfg = config.load_experiment(str(ROOT / "experiments/tiny_synthetic.py"),
                                 ["optim.total_steps=5", "optim.warmup_steps=1", "data.view_buckets=2,4",
                                  "model.geo_attention=frame", "model.text.rms_eps=1e-5", "data.strict=true"])
    assert cfg.optim.total_steps == 5 and cfg.optim.warmup_steps == 1
    assert cfg.data.view_buckets == (2, 4) and cfg.data.strict is True
    assert cfg.model.geo_attention == "frame" and cfg.model.text.rms_eps == 1e-5


@pytest.mark.parametrize("assignment,needle", [
    ("model.geo_attention=bogus", "allowed values are ['global', 'frame', 'mixed', 'block_causal']"),
    ("optim.nope=1", "config field 'optim.nope': unknown key"),
    ("model.text.num_layers=x", "cannot parse 'x'"),
    ("data.image_size=50,56", "multiples of 14"),
    ("model.text.num_kv_heads=3", "must be a multiple of num_kv_heads=3"),
    ("mesh.data=-1", "at most one axis may be -1"),
    ("model=1", "is a section"),
    ("optim.total_steps", "overrides look like section.field=value"),
])
def test_bad_override_names_the_field_and_the_fix(assignment, needle):
    with pytest.raises(config.ConfigError) as err:
        config.load_experiment(str(ROOT / "experiments/tiny_synthetic.py"), [assignment])
    assert needle in str(err.value)


def test_bad_experiment_path_and_arg():
    with pytest.raises(config.ConfigError, match="not found"):
        config.load_experiment("experiments/does_not_exist.py")
    with pytest.raises(config.ConfigError, match="unknown arg"):
        config.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:bogus"))


def test_dict_round_trip_and_fingerprint():
    cfg = config.load_experiment(str(ROOT / "experiments/g2vlm_2b_stage2.py"))
    back = config.from_dict(config.ExperimentConfig, json.loads(json.dumps(config.to_dict(cfg))))
    assert back == cfg
    tiny = config.tiny_model()
    assert config.model_fingerprint(tiny) != config.model_fingerprint(config.g2vlm_2b_model())
    assert config.model_fingerprint(tiny) == config.model_fingerprint(dataclasses.replace(tiny, freeze_und=True))
    # An initialisation-only field does not make checkpoints written with another value (or before it existed)
    # unloadable.
    other_init = dataclasses.replace(tiny, dino=dataclasses.replace(tiny.dino, position_init_std=0.02))
    assert config.model_fingerprint(tiny) == config.model_fingerprint(other_init)
    with pytest.raises(config.ConfigError, match="unknown keys"):
        config.from_dict(config.OptimConfig, {"learning_rate": 1.0, "bogus": 2})


def test_2b_defaults_are_the_official_shapes():
    m = config.g2vlm_2b_model()
    t = m.text
    assert (t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads, t.head_dim, t.mlp_hidden) == (1536, 28, 12, 2, 128, 8960)
    assert (t.vocab_size, t.rope_theta, t.mrope_sections) == (151936, 1e6, (16, 24, 24))
    assert (m.vit.hidden_size, m.vit.num_layers, m.dino.hidden_size, m.dino.num_layers) == (1280, 32, 1024, 24)


def test_a_stage_cannot_train_what_the_model_freezes():
    """`--set optim.stage=stage2_sr` on a stage-2 experiment used to train nothing more than stage 2: the optimiser
    listed the geometry expert, dino2llm and the heads, but model.freeze_recon=True stopped their gradients in
    the forward. Such combinations are refused with the flag to change; the consistent ones load."""
    qa = str(ROOT / "experiments/tiny_synthetic.py:qa_test")  # stage 2: the geometry path frozen
    with pytest.raises(config.ConfigError, match=r"model.freeze_recon.*optim.stage='stage2_sr' trains it"):
        config.load_experiment(qa, ["optim.stage=stage2_sr"])
    assert config.load_experiment(qa, ["optim.stage=stage2_sr", "model.freeze_recon=false"]).optim.stage == "stage2_sr"
    with pytest.raises(config.ConfigError, match=r"model.freeze_dino.*stops every gradient to the DINO"):
        config.load_experiment(qa, ["model.freeze_dino=false"])
    config.load_experiment(qa, ["model.freeze_vit=false"])  # the semantic expert trains: the ViT's gradient flows
    with pytest.raises(config.ConfigError, match=r"model.freeze_und.*optim.stage='stage2' trains it"):
        config.load_experiment(qa, ["model.freeze_und=true"])
    with pytest.raises(config.ConfigError, match=r"model.freeze_recon.*optim.stage='stage1' trains it"):
        config.load_experiment(str(ROOT / "experiments/tiny_synthetic.py"), ["model.freeze_recon=true"])
