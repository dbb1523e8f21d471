"""Two JAX processes: a peer's death stops the survivor quickly, a restart resumes, and the
2-process checkpoint restores onto a single-process mesh and keeps training."""
import json
import time

import jax
import numpy as np

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import cli
from g2vlm_jax import config as C
from g2vlm_jax import sharding
from g2vlm_jax.training import loop
from g2vlm_jax.core import state as state_lib
from tests import multihost

# 2 processes x 4 CPU devices: the fsdp mesh spans 8 devices, one pack per device.
DEVICES_PER_PROCESS = 4
OVERRIDES = ["data.packs_per_step=8", "eval.evaluators=", "checkpoint.every_steps=2", "checkpoint.keep_last=2"]


def _train_steps(workdir) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if '"kind": "train"' in line]


def _newest_committed_checkpoint(workdir) -> int | None:
    """The newest checkpoint step whose (asynchronous) save has been committed, or None."""
    if not (workdir / "checkpoints").exists():
        return None
    manager = ckpt_lib.make_manager(workdir / "checkpoints", C.CheckpointConfig(), read_only=True)
    try:
        return manager.latest_step()
    finally:
        manager.close()


def test_peer_death_restart_and_restore_on_another_mesh(tmp_path):
    workdir = tmp_path / "run"
    # 1. A long run; once a checkpoint is committed and training has gone past it, process 1 dies (SIGKILL).
    # (Saves are asynchronous: a logged step 3 does not mean step 2's save has been committed yet.)
    procs = multihost.launch(2, workdir, OVERRIDES + ["optim.total_steps=500"],
                             devices_per_process=DEVICES_PER_PROCESS)
    # The log is read first: the checkpoint directory is only listed once step 3 has been logged.
    multihost.wait_for(lambda: max(_train_steps(workdir), default=0) >= 3
                       and (_newest_committed_checkpoint(workdir) or 0) >= 2, 600, procs,
                       "a committed checkpoint and step 3 of the first run")
    procs[1].kill()
    killed_at = time.monotonic()
    code = procs[0].wait(timeout=120)
    assert time.monotonic() - killed_at < 60, "the survivor took too long to notice the dead peer"
    assert code == cli.PEER_FAILURE_EXIT_CODE
    log0 = (workdir / "proc0.log").read_text()
    assert "g2vlm: process 0 of 2 stopped: a peer process died" in log0
    newest = _newest_committed_checkpoint(workdir)
    assert newest is not None and newest >= 2

    # 2. Restarting both processes resumes from the newest complete checkpoint and finishes. (The test
    # shortens the run to 2 more steps: another schedule, so the restart says so with --allow-config-change.)
    total = newest + 2
    logged_before = len(_train_steps(workdir))
    procs = multihost.launch(2, workdir, OVERRIDES + [f"optim.total_steps={total}"],
                             devices_per_process=DEVICES_PER_PROCESS, extra_args=("--allow-config-change",))
    assert multihost.wait_all(procs, 600) == [0, 0], (workdir / "proc0.log").read_text()[-3000:]
    assert _train_steps(workdir)[logged_before:] == [newest + 1, newest + 2]

    # 3. One process, one device (another mesh): the 2-process checkpoint restores and trains on.
    cfg = C.load_experiment(multihost.EXPERIMENT, [f"workdir={workdir}", *OVERRIDES,
                                                   f"optim.total_steps={total + 2}"])
    _, fresh, shardings = state_lib.create_train_state(cfg, sharding.make_mesh(cfg.mesh))
    manager = ckpt_lib.make_manager(workdir / "checkpoints", cfg.checkpoint, read_only=True)
    step, restored, data_state = ckpt_lib.restore_latest(manager, fresh, shardings, cfg)
    assert step == total and data_state["step"] == total and int(restored.step) == total
    leaves = jax.tree.leaves(restored.trainable)
    assert all(np.isfinite(np.asarray(x)).all() for x in leaves)
    changed = [not np.array_equal(np.asarray(a), np.asarray(b))
               for a, b in zip(leaves, jax.tree.leaves(fresh.trainable))]
    assert any(changed), "the restored parameters equal the initialisation"
    result = loop.train(cfg, run_final_eval=False, allow_config_change=True)
    assert result.final_step == total + 2 and np.isfinite(result.last_metrics["loss"])
