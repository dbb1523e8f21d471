"""Official weights: name/layout round trip, official-layout directories, config JSONs, errors, export."""
import dataclasses
import json
import logging
import pathlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import cli, convert, sharding
from g2vlm_jax.core import state as state_lib
from g2vlm_jax import config as C
from g2vlm_jax.inference import load
from g2vlm_jax.model.g2vlm import G2VLM, parameter_counts
from tests import model_batches

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN = pathlib.Path(__file__).parent / "golden" / "encoders"


def _flat(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in ckpt_lib.flat_params(nnx.state(model, nnx.Param)).items()}


@pytest.fixture(scope="module")
def tiny():
    model = G2VLM(C.tiny_model(), rngs=nnx.Rngs(7))
    # Non-trivial values everywhere (zero-initialised dino2llm, unit norms) so a swapped tensor shows.
    for i, (_, var) in enumerate(nnx.to_flat_state(nnx.state(model, nnx.Param))):
        var.set_value(var.get_value() + 0.01 * jax.random.normal(jax.random.key(i), var.get_value().shape))
    return model


@pytest.fixture(scope="module")
def official_f32(tiny):
    return convert.to_official(tiny)


def test_round_trip_is_bitwise(tiny, official_f32):
    back = convert.from_official(official_f32, tiny.cfg)
    a, b = _flat(tiny), _flat(back)
    assert a.keys() == b.keys()
    for name in a:
        assert b[name].dtype == np.float32
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # Every parameter is exported once: the counts agree, and the abstract shape table is exactly what
    # to_official writes. The DINO mask token (random here, unused by the forward) survives too.
    assert sum(v.size for v in official_f32.values()) == parameter_counts(tiny.cfg)["total"]
    assert np.abs(official_f32["dino_model.embeddings.mask_token"]).max() > 0
    assert convert.official_shapes(tiny.cfg) == {k: v.shape for k, v in official_f32.items()}


def test_official_names_and_layouts(tiny, official_f32):
    t = tiny.cfg.text
    assert official_f32["language_model.model.layers.1.self_attn.q_proj_moe_geo.weight"].shape == (
        t.num_heads * t.head_dim, t.hidden_size)
    assert official_f32["language_model.lm_head.weight"].shape == (t.vocab_size, t.hidden_size)
    # Layer 1 of the stacked kernel is official layer 1, transposed.
    ours = np.asarray(tiny.language_model.layers.mlp_moe_geo.down_proj.kernel[...])[1]
    np.testing.assert_array_equal(official_f32["language_model.model.layers.1.mlp_moe_geo.down_proj.weight"], ours.T)
    # Encoder names and shapes equal those of the official torch modules (tests/golden/encoders).
    for file, prefix in (("vit_golden.npz", "vit_model."), ("dino_golden.npz", "dino_model.")):
        golden = np.load(GOLDEN / file)
        names = [k[2:] for k in golden.files if k.startswith("w:")]
        assert names
        for name in names:
            assert official_f32[prefix + name].shape == golden["w:" + name].shape, name


def _bf16_rounded(model: G2VLM) -> G2VLM:
    """`model` with every parameter rounded to bf16 (kept in float32)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16).astype(a.dtype), params)
    return nnx.merge(graphdef, params, rest)


def _forward(model: G2VLM, batch):
    graphdef, state = nnx.split(model)
    return model_batches.fast_jit(lambda s, b: nnx.merge(graphdef, s)(b))(state, batch)


def test_official_directory_converts_and_runs(tiny, tmp_path):
    src = convert.write_official_dir(tiny, tmp_path / "official")
    assert sorted(p.name for p in src.iterdir()) == ["dino_config.json", "model.safetensors", "text_config.json",
                                                     "vit_config.json"]
    tensors = load_file(str(src / "model.safetensors"))
    assert all(v.dtype == ml_dtypes.bfloat16 for v in tensors.values())
    assert tensors.keys() == convert.official_shapes(tiny.cfg).keys()
    assert set(json.loads((src / "text_config.json").read_text())) >= {"hidden_size", "rope_scaling", "g2vlm_heads"}
    assert cli.main(["convert", "--official", str(src), "--out", str(tmp_path / "ours")]) == 0
    cfg, model = load.load_model(tmp_path / "ours", ["model.compute_dtype=float32"])
    assert cfg.model.text == tiny.cfg.text and cfg.model.heads == tiny.cfg.heads and cfg.model.param_dtype == "bfloat16"
    # The converted model is the original with bf16-rounded weights: same forward to float32 accuracy.
    batch = model_batches.standard_batch()
    got, want = _forward(model, batch), _forward(_bf16_rounded(tiny), batch)
    assert np.isfinite(np.asarray(got.logits)).all()
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-5)
    for key in ("camera_poses", "local_points"):
        np.testing.assert_allclose(np.asarray(got.geometry[key]), np.asarray(want.geometry[key]), atol=1e-5)
    # And back: our checkpoint -> the official layout reproduces the downloaded tensors bitwise.
    assert cli.main(["convert", "--to-official", "--checkpoint", str(tmp_path / "ours"),
                     "--out", str(tmp_path / "again")]) == 0
    again = load_file(str(tmp_path / "again" / "model.safetensors"))
    assert again.keys() == tensors.keys()
    for name, value in tensors.items():
        np.testing.assert_array_equal(again[name], value, err_msg=name)
    for name in convert.CONFIG_FILES:
        assert json.loads((tmp_path / "again" / name).read_text()) == json.loads((src / name).read_text())


def test_sharded_directory_reads_like_one_file(tiny, official_f32, tmp_path):
    names = sorted(official_f32)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({n: official_f32[n] for n in part}, str(tmp_path / file))
    weight_map = {n: file for file, part in halves.items() for n in part}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    for name, content in convert.official_config_files(tiny.cfg).items():
        (tmp_path / name).write_text(json.dumps(content))
    cfg, model = convert.load_official_dir(tmp_path)
    # The same architecture (initialisation-only fields such as dino.position_init_std are not in the files).
    assert C.model_fingerprint(cfg) == C.model_fingerprint(tiny.cfg)
    want = _flat(tiny)
    for name, value in _flat(model).items():
        np.testing.assert_array_equal(value, want[name], err_msg=name)


def test_bad_tensors_are_named(tiny, official_f32, caplog):
    missing = dict(official_f32)
    del missing["language_model.model.layers.0.ls1.gamma"]
    with pytest.raises(ValueError, match="missing official tensors: language_model.model.layers.0.ls1.gamma;"):
        convert.from_official(missing, tiny.cfg)
    many = {k: v for k, v in official_f32.items() if not k.startswith("language_model.model.layers.1.")}
    count = len(official_f32) - len(many)
    with pytest.raises(ValueError, match=rf"missing official tensors: (\S+, ){{10}}\.\.\. \({count} in all\)"):
        convert.from_official(many, tiny.cfg)
    for name in ("point_decoder.extra.weight", "language_model.model.layers.9.mlp.up_proj.weight"):
        with pytest.raises(ValueError, match=f"unexpected official tensors: {name};"):
            convert.from_official({**official_f32, name: np.zeros(3, np.float32)}, tiny.cfg)
    # Tensors the official inference model drops too (its loader is strict=False) are skipped, with a
    # warning, not unexpected: the training loss's net, BAGEL's legacy tables, registers, confidence.
    extras = {name: np.zeros(2, np.float32) for name in (
        "Pi3Loss.point_loss.segformer.w", "latent_pos_embed.pos_embed", "vit_pos_embed.pos_embed", "register_token",
        "conf_decoder.blocks.0.norm1.weight", "conf_head.proj.weight")}
    convert.check_state_dict({**official_f32, **extras}, tiny.cfg)
    with caplog.at_level(logging.WARNING):
        loaded = convert.from_official({**official_f32, **extras}, tiny.cfg)
    assert "latent_pos_embed.*" in caplog.text and "conf_head.*" in caplog.text and "Pi3Loss.*" in caplog.text
    assert all(np.array_equal(a, b) for a, b in zip(_flat(loaded).values(), _flat(tiny).values()))
    wrong = {**official_f32, "dino2llm.bias": np.zeros(5, np.float32),
             "language_model.model.layers.1.mlp.down_proj.weight": np.zeros((3, 4), np.float32)}
    with pytest.raises(ValueError, match=r"misshapen official tensors: dino2llm.bias \(5,\) \(expected \(64,\)\), "
                                         r"language_model.model.layers.1.mlp.down_proj.weight \(3, 4\) "
                                         r"\(expected \(64, 128\)\);"):
        convert.from_official(wrong, tiny.cfg)


def test_bad_directories_are_named(tiny, tmp_path, capsys):
    src = tmp_path / "official"
    src.mkdir()
    for name, content in convert.official_config_files(tiny.cfg).items():
        (src / name).write_text(json.dumps(content))
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="model.safetensors is missing; pytorch_model.bin are pickle files, which "
                                         "g2vlm never loads"):
        convert.read_official_dir(src)
    (src / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        convert.read_official_dir(src)
    good_text = (src / "text_config.json").read_text()
    text = json.loads(good_text)
    del text["rope_scaling"]
    (src / "text_config.json").write_text(json.dumps(text))
    with pytest.raises(ValueError, match="text_config.json has no 'rope_scaling'"):
        convert.config_from_official(src)
    # Through the CLI: one line naming the problem, exit status 2.
    assert cli.main(["convert", "--official", str(src), "--out", str(tmp_path / "ours")]) == 2
    assert "text_config.json has no 'rope_scaling'" in capsys.readouterr().err
    (src / "text_config.json").write_text(json.dumps({**json.loads(good_text), "hidden_act": "gelu"}))
    with pytest.raises(ValueError, match="text_config.json: hidden_act='gelu' is not supported"):
        convert.config_from_official(src)
    (src / "dino_config.json").unlink()
    with pytest.raises(ValueError, match="dino_config.json is missing"):
        convert.config_from_official(src)


def test_2b_config_from_official_jsons(tmp_path):
    cfg = C.g2vlm_2b_model()
    files = convert.official_config_files(cfg)
    # The official 2B release carries no head sizes, no head_dim and no vit patch_size: SPEC values are used.
    assert "g2vlm_heads" not in files["text_config.json"] and "g2vlm_use_vit" not in files["text_config.json"]
    del files["text_config.json"]["head_dim"], files["vit_config.json"]["patch_size"]
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    back = convert.config_from_official(tmp_path)
    for section in ("text", "vit", "dino", "heads"):
        assert getattr(back, section) == getattr(cfg, section), section
    assert back == cfg
    # As the official loader, the ViT patch size is 14 whatever vit_config.json says (with a warning).
    (tmp_path / "vit_config.json").write_text(json.dumps({**files["vit_config.json"], "patch_size": 16}))
    assert convert.config_from_official(tmp_path).vit.patch_size == 14
    # The 2B official tensors, abstractly (nothing allocated): ~4.54 B values under the SPEC 1.7 names.
    shapes = convert.official_shapes(cfg)
    assert sum(int(np.prod(s)) for s in shapes.values()) == parameter_counts(cfg)["total"]
    assert shapes["vit_model.patch_embed.proj.weight"] == (1280, 3, 2, 14, 14)
    assert shapes["vit_model.merger.mlp.2.weight"] == (1536, 5120)
    assert shapes["dino_model.embeddings.position_embeddings"] == (1, 1370, 1024)
    assert shapes["language_model.model.layers.27.self_attn.k_proj_moe_geo.weight"] == (256, 1536)
    assert shapes["camera_head.fc_rot.weight"] == (9, 512)


def test_missing_config_keys_take_the_official_class_defaults(tmp_path, caplog):
    """As the official loader (`from_json_file`): an absent key is the official config class default, logged."""
    cfg = C.g2vlm_2b_model()
    files = convert.official_config_files(cfg)
    same_as_default = {"vit_config.json": ["mlp_ratio", "depth", "embed_dim", "num_heads", "spatial_merge_size",
                                           "temporal_patch_size"],
                       "dino_config.json": ["mlp_ratio", "num_register_tokens", "layerscale_value", "layer_norm_eps"],
                       "text_config.json": ["rope_theta", "head_dim"]}
    for name, keys in same_as_default.items():
        for key in keys:
            del files[name][key]
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    with caplog.at_level(logging.WARNING):
        assert convert.config_from_official(tmp_path) == cfg
    for name, keys in same_as_default.items():
        for key in set(keys) - {"head_dim"}:  # head_dim is derived, not read
            assert f"{name} has no '{key}'; using" in caplog.text, (name, key)
    # Defaults that differ from the 2B values change the config exactly as they change the official one.
    del files["dino_config.json"]["image_size"], files["text_config.json"]["num_key_value_heads"]
    for name, content in files.items():
        (tmp_path / name).write_text(json.dumps(content))
    back = convert.config_from_official(tmp_path)
    assert back.dino.pos_grid == 224 // 14 and back.text.num_kv_heads == cfg.text.num_heads
    # A JSON head_dim the official attention would ignore is ignored here too; an export that the
    # official model could not express is refused.
    (tmp_path / "text_config.json").write_text(json.dumps({**files["text_config.json"], "head_dim": 64}))
    assert convert.config_from_official(tmp_path).text.head_dim == 128
    with pytest.raises(ValueError, match="head_dim=64 x num_heads=12 != hidden_size=1536"):
        convert.official_config_files(C.g2vlm_2b_model(text=C.TextConfig(
            **{**C.to_dict(cfg.text), "head_dim": 64, "mrope_sections": (8, 12, 12)})))


def test_export_writes_bf16_params_only(tiny_trained_run, tmp_path, capsys):
    experiment = str(ROOT / "experiments/tiny_synthetic.py:test")
    assert cli.main(["export", "--experiment", experiment, "--checkpoint", str(tiny_trained_run),
                     "--out", str(tmp_path / "export"), "--official"]) == 0
    params, metadata = ckpt_lib.load_params(tmp_path / "export")
    assert metadata["dtype"] == "bfloat16" and metadata["config"]["model"]["param_dtype"] == "bfloat16"
    assert all(np.asarray(v).dtype == ml_dtypes.bfloat16 for v in params.values())
    cfg, trained = load.load_model(tiny_trained_run)
    ours = _flat(trained)
    assert params.keys() == ours.keys()
    for name in ours:
        np.testing.assert_array_equal(np.asarray(params[name]), ours[name].astype(ml_dtypes.bfloat16), err_msg=name)
    # The official layout of a reconstruction-only model (no ViT) reads back into the same model.
    official_cfg, official = convert.load_official_dir(tmp_path / "export" / "official")
    assert not official_cfg.use_vit and official_cfg.text == cfg.model.text
    np.testing.assert_array_equal(_flat(official)["dino2llm/kernel"],
                                  ours["dino2llm/kernel"].astype(ml_dtypes.bfloat16).astype(np.float32))
    # The exported checkpoint serves: same model, loaded in bf16.
    _, served = load.load_model(tmp_path / "export")
    assert served.cfg.param_dtype == "bfloat16"
    # An experiment of another shape is refused, naming the differing section.
    assert cli.main(["export", "--experiment", experiment, "--set", "model.text.num_layers=3", "--checkpoint",
                     str(tiny_trained_run), "--out", str(tmp_path / "bad")]) == 2
    assert "differs in ['text']" in capsys.readouterr().err


def test_stage2_starts_from_a_stage1_run_alone_with_a_fresh_vit(tiny_trained_run, tmp_path, caplog):
    """`checkpoint.init_from=<stage-1 export>` for a model with the semantic ViT (what the blank-geometry
    warning of a QA run tells the user to do): the stage-1 run has no ViT, so the ViT keeps its random
    initialisation with a warning and everything else comes from the run; any other missing parameter is
    still an error."""
    assert cli.main(["export", "--checkpoint", str(tiny_trained_run), "--out", str(tmp_path / "s1")]) == 0
    params, metadata = ckpt_lib.load_params(tmp_path / "s1")
    assert not any(n.startswith("vit_model/") for n in params)
    cfg1, _ = load.load_model(tmp_path / "s1")
    cfg = dataclasses.replace(
        cfg1, model=dataclasses.replace(cfg1.model, use_vit=True, freeze_und=False, freeze_recon=True),
        optim=dataclasses.replace(cfg1.optim, stage="stage2"),
        checkpoint=dataclasses.replace(cfg1.checkpoint, init_from=str(tmp_path / "s1")))
    _, fresh, _ = state_lib.create_train_state(cfg, sharding.make_mesh(cfg.mesh))
    fresh_flat = {**ckpt_lib.flat_params(fresh.trainable), **ckpt_lib.flat_params(fresh.frozen)}
    with caplog.at_level(logging.WARNING):
        state = ckpt_lib.initialise_from(fresh, cfg)
    assert "no listed checkpoint has the semantic image encoder" in caplog.text
    got = {**ckpt_lib.flat_params(state.trainable), **ckpt_lib.flat_params(state.frozen)}
    vit = [n for n in got if n.startswith("vit_model/")]
    assert vit and all(np.array_equal(got[n], fresh_flat[n]) for n in vit)
    np.testing.assert_array_equal(got["dino2llm/kernel"], params["dino2llm/kernel"])
    assert np.abs(np.asarray(got["dino2llm/kernel"])).max() > 0  # trained in stage 1, not the zero init
    ckpt_lib.save_params(tmp_path / "broken", {k: v for k, v in params.items() if k != "dino2llm/kernel"}, metadata)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=str(tmp_path / "broken")))
    with pytest.raises(KeyError, match="dino2llm/kernel"):
        ckpt_lib.initialise_from(fresh, cfg)


def test_params_checkpoint_without_the_mask_token_still_loads(tiny_trained_run, tmp_path, caplog):
    """Exports written before the DINO mask token was kept load it as zeros (it is unused by the
    forward), with a warning; both readers of params checkpoints: load_model and checkpoint.init_from."""
    assert cli.main(["export", "--checkpoint", str(tiny_trained_run), "--out", str(tmp_path / "new")]) == 0
    params, metadata = ckpt_lib.load_params(tmp_path / "new")
    name = "dino_model/embeddings/mask_token"
    assert name in ckpt_lib.ADDED_PARAMETERS and name in params
    ckpt_lib.save_params(tmp_path / "old", {k: v for k, v in params.items() if k != name}, metadata)
    with caplog.at_level(logging.WARNING):
        _, model = load.load_model(tmp_path / "old")
    assert "predates parameters ['dino_model/embeddings/mask_token']" in caplog.text
    assert not np.asarray(model.dino_model.embeddings.mask_token.get_value()).any()
    cfg, _ = load.load_model(tmp_path / "new")
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, init_from=str(tmp_path / "old")))
    _, state, _ = state_lib.create_train_state(cfg, sharding.make_mesh(cfg.mesh))
    state = ckpt_lib.initialise_from(state, cfg)
    assert not np.asarray(ckpt_lib.flat_params(state.frozen)[name]).any()
    # Any other missing parameter is still an error.
    ckpt_lib.save_params(tmp_path / "broken", {k: v for k, v in params.items() if k != "dino2llm/kernel"}, metadata)
    with pytest.raises(ValueError, match="lacks 1 tensors"):
        load.load_model(tmp_path / "broken")
