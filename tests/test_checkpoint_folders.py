"""`checkpoint.open_checkpoint`: the one place that tells a run directory, a params-only checkpoint and an
official release apart, and says what each looks like when a path is none of them."""
import pytest

from g2vlm_jax import checkpoint as ckpt_lib


def test_kinds_and_errors(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    params = tmp_path / "export"
    (params / "params").mkdir(parents=True)
    (params / "metadata.json").write_text('{"config": {}, "model_fingerprint": "{}"}')
    official = tmp_path / "official"
    official.mkdir()
    for name in ckpt_lib.folders.OFFICIAL_FILES:
        (official / name).write_text("{}")

    assert ckpt_lib.open_checkpoint(run).kind == ckpt_lib.RUN
    assert ckpt_lib.open_checkpoint(run).checkpoints == str(run / "checkpoints")
    assert ckpt_lib.open_checkpoint(params).kind == ckpt_lib.PARAMS
    assert ckpt_lib.open_checkpoint(params).metadata()["model_fingerprint"] == "{}"
    assert ckpt_lib.open_checkpoint(official).kind == ckpt_lib.OFFICIAL
    # A run whose checkpoints were moved (checkpoint.directory, e.g. gs://...): the run directory is enough.
    moved = ckpt_lib.open_checkpoint(tmp_path / "logs_only", checkpoints="gs://bucket/run/checkpoints")
    assert (moved.kind, moved.checkpoints) == (ckpt_lib.RUN, "gs://bucket/run/checkpoints")

    with pytest.raises(FileNotFoundError, match="is an official G2VLM release directory.*expected a training run"):
        ckpt_lib.open_checkpoint(official, expect=(ckpt_lib.RUN, ckpt_lib.PARAMS))
    with pytest.raises(FileNotFoundError, match="does not exist; expected"):
        ckpt_lib.open_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="is none of these; expected .*g2vlm export"):
        ckpt_lib.open_checkpoint(tmp_path / "empty")
    with pytest.raises(ValueError, match="convert it first with `g2vlm convert --official"):
        ckpt_lib.open_checkpoint(official).metadata()
    (params / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="metadata.json is not valid JSON"):
        ckpt_lib.load_params(params)
