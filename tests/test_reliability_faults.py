"""In-process fault injection: non-finite steps (skipped, counted, then a clear stop) and an unreadable
newest checkpoint (warning, fallback, set aside, exact resume)."""
import dataclasses
import logging
import pathlib
import shutil

import jax
import numpy as np
import pytest

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import config as C
from g2vlm_jax import sharding
from g2vlm_jax.core import data as data_lib
from g2vlm_jax.training import loop
from g2vlm_jax.core import state as state_lib

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cfg(workdir, *overrides):
    return C.load_experiment(str(ROOT / "experiments/tiny_synthetic.py:test"),
                             [f"workdir={workdir}", "eval.evaluators=", *overrides])


class PoisonedIterator:
    """The real training iterator, with NaN geometry images in the batches of the given (1-based) steps."""

    def __init__(self, inner, poisoned_steps):
        self.inner, self.poisoned = inner, set(poisoned_steps)

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.inner)
        if self.inner.step in self.poisoned:  # `step` is the number of batches handed out so far
            batch = batch.replace(geo_images=np.full_like(batch.geo_images, np.nan))
        return batch

    def get_state(self):
        return self.inner.get_state()

    def set_state(self, state):
        self.inner.set_state(state)


def _poison(monkeypatch, steps):
    real = data_lib.make_train_iterator
    monkeypatch.setattr(data_lib, "make_train_iterator", lambda cfg: PoisonedIterator(real(cfg), steps))


def _restore(cfg, step):
    _, fresh, shardings = state_lib.create_train_state(cfg, sharding.make_mesh(cfg.mesh))
    manager = ckpt_lib.make_manager(cfg.run_dir / "checkpoints", cfg.checkpoint, read_only=True)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), fresh)
    return ckpt_lib.restore(manager, step, abstract, shardings, cfg)[0]


def _same(a, b) -> bool:
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_nonfinite_step_is_skipped_and_counted(tmp_path, monkeypatch):
    _poison(monkeypatch, {2})
    cfg = _cfg(tmp_path, "optim.total_steps=3", "checkpoint.every_steps=1", "checkpoint.keep_last=5")
    result = loop.train(cfg, run_final_eval=False)
    assert int(result.state.nonfinite_total) == 1 and int(result.state.step) == 2  # 3 batches, 1 skipped
    after1, after2 = _restore(cfg, 1), _restore(cfg, 2)
    assert _same(after1.trainable, after2.trainable) and _same(after1.opt_state, after2.opt_state)
    assert int(after2.nonfinite_streak) == 1
    assert not _same(after2.trainable, result.state.trainable)  # step 3 (finite) trained again


def test_nonfinite_streak_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    _poison(monkeypatch, set(range(2, 50)))
    cfg = _cfg(tmp_path, "optim.total_steps=40", "checkpoint.every_steps=1", "checkpoint.keep_last=10",
               "optim.max_nonfinite_steps=3")
    with pytest.raises(loop.NonFiniteTrainingError, match="3 consecutive non-finite steps.*last good checkpoint"):
        loop.train(cfg, run_final_eval=False)
    manager = ckpt_lib.make_manager(tmp_path / "checkpoints", cfg.checkpoint, read_only=True)
    newest = manager.latest_step()
    assert newest is not None and newest <= 5
    last, first = _restore(cfg, newest), _restore(cfg, 1)
    # Every checkpoint after step 1 holds the step-1 parameters: nothing non-finite was ever applied.
    assert _same(last.trainable, first.trainable)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(last.trainable))


def _corrupt(step_dir: pathlib.Path) -> None:
    """Truncates every array file of a checkpoint's state item."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.stat().st_size > 0]
    assert files
    for p in files:
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def test_unreadable_newest_checkpoint_falls_back_and_resumes_exactly(tmp_path, caplog):
    straight = loop.train(_cfg(tmp_path / "straight"), run_final_eval=False)
    broken = tmp_path / "broken"
    shutil.copytree(tmp_path / "straight", broken)
    _corrupt(broken / "checkpoints" / "6")
    cfg = _cfg(broken)
    with caplog.at_level(logging.WARNING):
        resumed = loop.train(cfg, run_final_eval=False)
    text = caplog.text
    assert f"checkpoint {broken / 'checkpoints'}/6 is unreadable" in text and "falling back" in text
    assert (broken / "checkpoints" / "6.unreadable").is_dir()  # kept for inspection, not deleted
    assert resumed.final_step == 6
    assert _same(straight.state.trainable, resumed.state.trainable)
    assert _same(straight.state.opt_state, resumed.state.opt_state)
    manager = ckpt_lib.make_manager(broken / "checkpoints", cfg.checkpoint, read_only=True)
    assert manager.all_steps() == [3, 6]


def test_all_checkpoints_unreadable_starts_over_with_warnings(tmp_path, caplog):
    cfg = _cfg(tmp_path, "optim.total_steps=3")
    loop.train(cfg, run_final_eval=False)
    _corrupt(tmp_path / "checkpoints" / "3")
    _, fresh, shardings = state_lib.create_train_state(cfg, sharding.make_mesh(cfg.mesh))
    manager = ckpt_lib.make_manager(tmp_path / "checkpoints", cfg.checkpoint, read_only=True)
    with caplog.at_level(logging.WARNING):
        assert ckpt_lib.restore_latest(manager, fresh, shardings, cfg) is None
    assert "checkpoints/3 is unreadable" in caplog.text
    assert (tmp_path / "checkpoints" / "3").is_dir()  # a read-only restore renames nothing


def test_checkpoint_of_another_model_config_is_an_error_not_a_fallback(tmp_path):
    cfg = _cfg(tmp_path, "optim.total_steps=3")
    loop.train(cfg, run_final_eval=False)
    other = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, heads=dataclasses.replace(cfg.model.heads,
                                                                                                       point_dim=16)))
    with pytest.raises(ckpt_lib.CheckpointMismatchError, match="another model config"):
        loop.train(other, run_final_eval=False)
    assert (tmp_path / "checkpoints" / "3").is_dir()
