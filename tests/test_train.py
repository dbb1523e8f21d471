"""Training integration: exact resume, stage-1 freezing, CE falls in stage 2 (tiny configs, CPU)."""
import dataclasses
import json
import pathlib

import jax
import numpy as np
import pytest

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import config as C
from g2vlm_jax import sharding
from g2vlm_jax.core import optim
from g2vlm_jax.training import loop
from g2vlm_jax.core import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cfg(workdir, *overrides):
    return C.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:test"), [f"workdir={workdir}", *overrides])


def _losses(workdir) -> dict[int, float]:
    rows = [json.loads(line) for line in (pathlib.Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r["kind"] == "train"}


def _flat(state) -> dict[str, np.ndarray]:
    out = {}
    for part in (state.trainable, state.frozen):
        out.update({k: np.asarray(jax.device_get(v)) for k, v in ckpt_lib.flat_params(part).items()})
    return out


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """6 uninterrupted steps of the test experiment (shared by the tests below)."""
    workdir = tmp_path_factory.mktemp("straight")
    cfg = _cfg(workdir, "profile_steps=2,3")  # profiling must not change the numbers (resume test below)
    result = loop.train(cfg, run_final_eval=False)
    return cfg, result


def test_resume_is_bitwise_exact(straight_run, tmp_path):
    """Also with the checkpoints outside the run directory (`checkpoint.directory`, as gs://... on a pod)."""
    cfg, straight = straight_run
    elsewhere = tmp_path / "bucket" / "checkpoints"
    cfg = dataclasses.replace(cfg, workdir=str(tmp_path / "run"),
                              checkpoint=dataclasses.replace(cfg.checkpoint, directory=str(elsewhere)))
    first = loop.train(cfg, stop_after_steps=3, run_final_eval=False)
    assert first.final_step == 3
    assert (elsewhere / "3").is_dir() and not (tmp_path / "run" / "checkpoints").exists()
    resumed = loop.train(cfg, run_final_eval=False)
    assert resumed.final_step == 6
    a, b = _flat(straight.state), _flat(resumed.state)
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    la, lb = _losses(straight.workdir), _losses(tmp_path / "run")
    assert [la[s] for s in range(1, 7)] == [lb[s] for s in range(1, 7)]


def test_stage1_changes_only_the_geometry_side(straight_run):
    cfg, result = straight_run
    _, init, _ = state_lib.create_train_state(cfg, sharding.make_mesh(cfg.mesh))  # as the trainer does
    before, after = _flat(init), _flat(result.state)
    changed = {name for name in before if not np.array_equal(before[name], after[name])}
    groups_changed = {optim.param_group(tuple(name.split("/"))) for name in changed}
    assert groups_changed <= {"geometry", "dino2llm", "heads"}, groups_changed
    for frozen_group in ("semantic", "embed", "lm_head", "dino"):
        names = [n for n in before if optim.param_group(tuple(n.split("/"))) == frozen_group]
        assert names, frozen_group
        assert not any(n in changed for n in names), frozen_group
    assert {"geometry", "heads"} <= groups_changed


def test_stage1_with_semantic_images_leaves_vit_and_semantic_side_bitwise(tmp_path):
    """Stage 1 on recon-then-QA rows, so the ViT and the semantic expert are in the forward (semantic
    images, question and answer tokens): after 3 steps every semantic-expert, embedding, lm_head,
    ViT and DINO parameter is bitwise unchanged, while the geometry side trained."""
    cfg = C.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:qa_test"), [
        f"workdir={tmp_path}", "optim.stage=stage1", "model.freeze_und=true", "model.freeze_recon=false",
        "loss.vg_weight=1.0", "optim.total_steps=3", "eval.evaluators="])
    assert cfg.model.use_vit
    result = loop.train(cfg, run_final_eval=False)
    _, init, _ = state_lib.create_train_state(cfg, sharding.make_mesh(cfg.mesh))
    before, after = _flat(init), _flat(result.state)
    group = {name: optim.param_group(tuple(name.split("/"))) for name in before}
    changed = {group[n] for n in before if not np.array_equal(before[n], after[n])}
    for frozen_group in ("semantic", "embed", "lm_head", "vit", "dino"):
        assert any(g == frozen_group for g in group.values()), frozen_group
    assert changed == {"geometry", "dino2llm", "heads"}, changed
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(r["ce"] > 0 and r["vg"] > 0 for r in rows if r["kind"] == "train")  # both losses were live


def test_loss_falls_and_checkpoints_rotate(straight_run):
    cfg, result = straight_run
    # This config packs 2 samples into 3 sample slots: padded slots must not poison the gradient.
    assert result.last_metrics["finite"] == 1.0 and result.last_metrics["nonfinite_streak"] == 0
    assert np.isfinite(result.last_metrics["grad_norm"])
    losses = _losses(result.workdir)
    assert np.mean([losses[5], losses[6]]) < np.mean([losses[1], losses[2]])
    manager = ckpt_lib.make_manager(result.workdir / "checkpoints", cfg.checkpoint, read_only=True)
    assert manager.all_steps() == [3, 6]
    assert any((result.workdir / "profile").rglob("*.xplane.pb")), "profile_steps=2,3 wrote no trace"
    metadata = ckpt_lib.read_metadata(manager, 6)
    assert metadata["model_fingerprint"] == C.model_fingerprint(cfg.model)


def test_logs_carry_model_flops_and_mfu(straight_run):
    from g2vlm_jax import flops
    from g2vlm_jax.core import data as data_lib

    cfg, result = straight_run
    rows = [json.loads(line) for line in (result.workdir / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if r["kind"] == "train"}
    # The logged FLOPs of step 1 are the analytic count of step 1's batch.
    first_batch = next(data_lib.make_train_iterator(cfg))
    assert train[1]["flops"] == pytest.approx(flops.step_flops(cfg.model, first_batch).train_total, rel=1e-9)
    for r in train.values():
        assert 0.0 < r["mfu"] < 1.0, r


def test_checkpoint_of_another_model_is_rejected(straight_run, tmp_path):
    cfg, result = straight_run
    other = dataclasses.replace(cfg, workdir=str(result.workdir),
                                model=dataclasses.replace(cfg.model, text=dataclasses.replace(cfg.model.text, mlp_hidden=64)))
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="another model config"):
        loop.train(other, run_final_eval=False)


def test_eval_command_writes_report_and_pictures(straight_run):
    from g2vlm_jax import evaluation

    cfg, result = straight_run
    report = evaluation.evaluate_checkpoint(cfg, result.workdir)
    recon = report["reconstruction"]
    assert report["step"] == 6 and recon["num_samples"] > 0
    assert np.isfinite(recon["vg_loss"]) and 0 <= recon["depth"]["abs_rel"] < 10
    assert 0 <= recon["pose"]["auc@30"] <= 100 and recon["pointmap"]["acc"] >= 0
    eval_dir = result.workdir / "eval"
    assert (eval_dir / "report.json").is_file()
    for name in recon["pictures"]:
        assert (eval_dir / name).stat().st_size > 1000, name
