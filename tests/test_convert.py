"""Official weights: name/layout round trip, official-layout directories, config JSONs, export."""
import dataclasses
import json
import pathlib

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import cli, convert
from g2vlm_jax import config as C
from g2vlm_jax.inference import load
from g2vlm_jax.model.g2vlm import G2VLM, parameter_counts
from tests import model_batches

GOLDEN = pathlib.Path(__file__).parent / "golden" / "encoders"


def _flat(model) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in ckpt_lib.flat_params(nnx.state(model, nnx.Param)).items()}


@pytest.fixture(scope="module")
def tiny():
    model = G2VLM(C.tiny_model(), rngs=nnx.Rngs(7))
    # Non-trivial values everywhere (zero-initialised dino2llm, unit norms) so a swapped tensor shows.
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    for i, (_, var) in enumerate(flat):
        var.set_value(var.get_value() + 0.01 * jax.random.normal(jax.random.key(i), var.get_value().shape))
    return model


def test_round_trip_is_bitwise(tiny):
    official = convert.to_official(tiny)
    back = convert.from_official(official, tiny.cfg)
    a, b = _flat(tiny), _flat(back)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # Every parameter is exported once: the counts agree (plus the DINO mask token).
    assert sum(v.size for v in official.values()) == parameter_counts(tiny.cfg)["total"] + tiny.cfg.dino.hidden_size


def test_official_names_and_layouts(tiny):
    official = convert.to_official(tiny)
    t = tiny.cfg.text
    assert official["language_model.model.layers.1.self_attn.q_proj_moe_geo.weight"].shape == (t.num_heads * t.head_dim,
                                                                                                 t.hidden_size)
    assert official["language_model.lm_head.weight"].shape == (t.vocab_size, t.hidden_size)
    # Layer 1 of the stacked kernel is official layer 1, transposed.
    ours = np.asarray(tiny.language_model.layers.mlp_moe_geo.down_proj.kernel[...])[1]
    np.testing.assert_array_equal(official["language_model.model.layers.1.mlp_moe_geo.down_proj.weight"], ours.T)
    # Encoder names and shapes equal those of the official torch modules (tests/golden/encoders).
    for file, prefix in (("vit_golden.npz", "vit_model."), ("dino_golden.npz", "dino_model.")):
        golden = np.load(GOLDEN / file)
        names = [k[2:] for k in golden.files if k.startswith("w:")]
        assert names
        for name in names:
            assert official[prefix + name].shape == golden["w:" + name].shape, name


def test_official_directory_converts_and_runs(tiny, tmp_path):
    src = convert.write_official_dir(tiny, tmp_path / "official")
    tensors = load_file(str(src / "model.safetensors"))
    assert all(v.dtype == ml_dtypes.bfloat16 for v in tensors.values())
    assert set(json.loads((src / "text_config.json").read_text())) >= {"hidden_size", "rope_scaling", "g2vlm_heads"}
    assert cli.main(["convert", "--official", str(src), "--out", str(tmp_path / "ours")]) == 0
    cfg, model = load.load_model(tmp_path / "ours")
    assert cfg.model.text == tiny.cfg.text and cfg.model.heads == tiny.cfg.heads and cfg.model.param_dtype == "bfloat16"
    # The converted model is the original with bf16-rounded weights (in the official compute dtype, bf16).
    assert cfg.model.compute_dtype == "bfloat16"
    rounded = convert.from_official({k: v.astype(np.float32) for k, v in tensors.items()},
                                    dataclasses.replace(cfg.model, param_dtype="float32"))
    for name, value in _flat(model).items():
        np.testing.assert_array_equal(value.astype(np.float32), _flat(rounded)[name], err_msg=name)
    batch = model_batches.standard_batch()
    got, want = model(batch), rounded(batch)
    assert np.isfinite(np.asarray(got.logits)).all()
    np.testing.assert_allclose(np.asarray(got.logits), np.asarray(want.logits), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.geometry["camera_poses"]), np.asarray(want.geometry["camera_poses"]),
                               atol=1e-5)


def test_bad_official_directories_are_named(tiny, tmp_path):
    src = convert.write_official_dir(tiny, tmp_path / "official", dtype="float32")
    tensors = load_file(str(src / "model.safetensors"))
    missing = dict(tensors)
    del missing["language_model.model.layers.0.ls1.gamma"]
    with pytest.raises(ValueError, match="missing official tensors: language_model.model.layers.0.ls1.gamma"):
        convert.from_official(missing, tiny.cfg)
    extra = {**tensors, "point_decoder.extra.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match=r"point_decoder.extra.weight.*no counterpart in GeometryHeads"):
        convert.from_official(extra, tiny.cfg)
    extra = {**tensors, "language_model.model.layers.9.mlp.up_proj.weight": np.zeros(3, np.float32)}
    with pytest.raises(ValueError, match="unexpected official tensors: language_model.model.layers.9.mlp.up_proj"):
        convert.from_official(extra, tiny.cfg)
    wrong = {**tensors, "dino2llm.bias": np.zeros(5, np.float32)}
    with pytest.raises(ValueError, match="dino2llm.bias"):
        convert.from_official(wrong, tiny.cfg)
    good_text = (src / "text_config.json").read_text()
    text = json.loads(good_text)
    del text["num_key_value_heads"]
    (src / "text_config.json").write_text(json.dumps(text))
    with pytest.raises(ValueError, match="text_config.json has no 'num_key_value_heads'"):
        convert.config_from_official(src)
    (src / "text_config.json").write_text(good_text)
    (src / "model.safetensors").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(FileNotFoundError, match="pickle files, which g2vlm never loads"):
        convert.read_official_dir(tmp_path / "official")


def test_2b_config_from_official_jsons(tmp_path):
    cfg = C.g2vlm_2b_model()
    for name, content in convert.official_config_files(cfg).items():
        (tmp_path / name).write_text(json.dumps(content))
    back = convert.config_from_official(tmp_path)
    assert back == cfg
    text = json.loads((tmp_path / "text_config.json").read_text())
    # The official 2B release has no head sizes and no head_dim key: the SPEC values are used.
    assert "g2vlm_heads" not in text
    del text["head_dim"]
    (tmp_path / "text_config.json").write_text(json.dumps(text))
    assert convert.config_from_official(tmp_path).text.head_dim == 128


def test_export_writes_bf16_params_only(tiny_trained_run, tmp_path):
    assert cli.main(["export", "--checkpoint", str(tiny_trained_run), "--out", str(tmp_path / "export"),
                     "--official"]) == 0
    params, metadata = ckpt_lib.load_params(tmp_path / "export")
    assert metadata["dtype"] == "bfloat16" and metadata["config"]["model"]["param_dtype"] == "bfloat16"
    assert all(np.asarray(v).dtype == ml_dtypes.bfloat16 for v in params.values())
    cfg, trained = load.load_model(tiny_trained_run)
    ours = _flat(trained)
    assert params.keys() == ours.keys()
    for name in ours:
        np.testing.assert_array_equal(np.asarray(params[name]), ours[name].astype(ml_dtypes.bfloat16), err_msg=name)
    official = load_file(str(tmp_path / "export" / "official" / "model.safetensors"))
    assert "language_model.model.norm_moe_geo.weight" in official
    # The exported checkpoint serves: same model, loaded in bf16.
    _, served = load.load_model(tmp_path / "export")
    assert served.cfg.param_dtype == "bfloat16"
