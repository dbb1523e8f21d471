"""`checkpoint.open_checkpoint`: the one place that tells a run directory, a params-only checkpoint and an
official release apart, and says what each looks like when a path is none of them."""
import json
import shutil

import pytest
from PIL import Image

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import cli
from g2vlm_jax.inference import load


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


def test_a_run_checkpoint_of_another_parameter_tree_is_named(tiny_trained_run):
    """A run checkpoint written by a version of the code with other parameters (here: before the DINO mask
    token was kept) is a CheckpointMismatchError naming the leaves, not an 'unreadable' fallback that would
    restart the run from step 0."""
    import jax

    from g2vlm_jax import checkpoint as ck
    from g2vlm_jax import config as C
    from g2vlm_jax.core import state as state_lib

    cfg = C.load_experiment("experiments/tiny_synthetic.py:test", [f"workdir={tiny_trained_run}"])
    manager = ck.make_manager(cfg.checkpoint_dir, cfg.checkpoint, read_only=True)
    step = manager.latest_step()
    _, abstract = state_lib.abstract_state(cfg)
    ck.check_same_tree(manager, step, abstract, "now")  # the same tree passes

    def nested(paths):
        tree = {}
        for path in paths:
            node = tree
            for key in path[:-1]:
                node = node.setdefault(key, {})
            node[path[-1]] = 0
        return tree

    stored = [tuple(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in p)
              for p, _ in jax.tree_util.tree_flatten_with_path(manager.item_metadata(step)["state"])[0]]
    older = [p for p in stored if "mask_token" not in p]
    assert len(older) == len(stored) - 1

    class OlderManager:
        def item_metadata(self, step):
            return {"state": nested(older)}

    with pytest.raises(ck.CheckpointMismatchError, match="it lacks 1: frozen/dino_model/embeddings/mask_token"):
        ck.check_same_tree(OlderManager(), step, abstract, "old/3")


def test_a_checkpoint_of_another_builtin_tokenizer_is_refused(tiny_qa_checkpoint, tmp_path, capsys):
    """The built-in vocabulary changed on 2026-12-06 (every printable ASCII character): a tiny checkpoint
    trained before would decode its answers with the wrong pieces. Loading it, as `g2vlm chat` does, says so in
    one line instead; the checkpoint as written (with its tokenizer fingerprint) loads."""
    cfg, _ = load.load_model(tiny_qa_checkpoint)
    assert cfg.data.tokenizer == "sentencepiece:builtin"
    old = tmp_path / "old_vocabulary"
    shutil.copytree(tiny_qa_checkpoint, old)
    metadata = json.loads((old / "metadata.json").read_text())
    del metadata["builtin_tokenizer_sha256"]  # as written before the fingerprint existed
    (old / "metadata.json").write_text(json.dumps(metadata))
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="another version of the built-in tokenizer"):
        load.load_model(old)
    metadata["builtin_tokenizer_sha256"] = "0" * 64
    (old / "metadata.json").write_text(json.dumps(metadata))
    image = tmp_path / "room.png"
    Image.new("RGB", (28, 28), (120, 80, 40)).save(image)
    assert cli.main(["chat", "--checkpoint", str(old), "--images", str(image), "--question", "How far?"]) != 0
    assert "another version of the built-in tokenizer" in capsys.readouterr().err
