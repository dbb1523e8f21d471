"""The trainer, top to bottom: mesh -> sharded state -> data -> resume -> steps -> checkpoints -> eval.

Read it in order; each section is one concern. Evaluation comes in as a hook (`evaluate`, e.g.
`evaluation.training_hook(cfg)`, what `g2vlm train` passes): the trainer imports no evaluator. The run is a pure function of (config, seed): the
data iterator is step-indexed and checkpointed with the state, so a resume continues the exact same
run (bitwise-equal parameters, see tests/test_train.py and tests/test_reliability_preemption.py).
"""
from __future__ import annotations

import dataclasses
import pathlib
import signal
import threading
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from tqdm import tqdm

from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import config as config_lib
from g2vlm_jax import console
from g2vlm_jax import flops as flops_lib
from g2vlm_jax import meeting
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.core import data as data_lib
from g2vlm_jax.core import optim as optim_lib
from g2vlm_jax.core import state as state_lib
from g2vlm_jax.training import step as step_lib
from g2vlm_jax.training import logger as logger_lib
from g2vlm_jax.training.logger import MetricLogger


# (spec, state, step, final) -> report: runs the held-out evaluators on every process at `step`
# (`final`: the last evaluation of the run, which also writes pictures). See evaluation.training_hook.
EvaluateHook = Callable[[state_lib.StateSpec, state_lib.TrainState, int, bool], dict]


class NonFiniteTrainingError(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


@dataclasses.dataclass
class TrainResult:
    workdir: pathlib.Path
    start_step: int  # 0, or the step the run resumed from
    final_step: int
    last_metrics: dict
    eval_report: dict | None
    preempted: bool  # stopped early by a signal (`stop_signal`), checkpoint saved
    spec: state_lib.StateSpec
    state: state_lib.TrainState
    stop_signal: str = ""  # with `preempted`: 'SIGTERM' or 'SIGINT' (a peer's SIGTERM reads as SIGTERM)


class PreemptionWatcher:
    """Turns SIGTERM and Ctrl-C (SIGINT) into a flag checked between steps (a save, then a clean exit).
    A second Ctrl-C interrupts at once (the previous handler is back after the first).

    One process checks its flag after every step. The processes of a multi-process run must stop
    (and save, a collective) at the same step, so they agree by an all-gather of their flags, but
    only after every `check_every` steps (steps counted from 0 alike on every process): a host
    sync per step would stall the pipeline of dispatched steps.
    """

    def __init__(self, enabled: bool, check_every: int = 1):
        self.requested = threading.Event()
        self.check_every = check_every
        self.signal_name = ""  # the signal that asked to stop ('SIGTERM' / 'SIGINT')
        self._previous: dict = {}
        if enabled and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        how = " (Ctrl-C again to interrupt without saving)" if signum == signal.SIGINT else ""
        logging.warning("%s received: checkpointing at the next step boundary, then exiting%s", self.signal_name, how)
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, self._previous.pop(signal.SIGINT))
        self.requested.set()

    def should_stop(self, step: int) -> bool:
        """After `step`: True on every process once any process saw SIGTERM (agreed across processes)."""
        local = self.requested.is_set()
        if jax.process_count() == 1:
            return local
        if step % self.check_every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array([local]))))

    def close(self):
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous = {}


def _warn_if_geometry_tokens_are_blank(spec: state_lib.StateSpec, state, cfg: config_lib.ExperimentConfig) -> None:
    """One warning when the geometry tokens of a QA run carry no image: `dino2llm` is zero-initialised
    (SPEC 1.3), so a stage that does not train it (stage 2) and starts from no run that did feeds every
    geometry token to the LLM as 0, and the semantic expert answers without geometry context."""
    if "dino2llm" in optim_lib.trainable_groups(cfg) or not any(s.kind == "recon_qa" for s in cfg.data.sources):
        return
    kernel = spec.model(state).dino2llm.kernel[...]
    if float(jax.jit(lambda k: jnp.max(jnp.abs(k)))(kernel)) == 0.0:
        logging.warning("the geometry tokens carry no image: dino2llm is all zero (its initial value) and "
                        "optim.stage=%r does not train it, so the semantic expert gets no geometry context; start "
                        "from a stage-1 run with --set checkpoint.init_from=STAGE1_EXPORT[,VIT_SOURCE]",
                        cfg.optim.stage)


def train(cfg: config_lib.ExperimentConfig, *, evaluate: EvaluateHook | None = None,
          stop_after_steps: int | None = None, run_final_eval: bool = True,
          allow_config_change: bool = False) -> TrainResult:
    """Trains `cfg` until `optim.total_steps` (or `stop_after_steps` more steps), resuming if possible.

    `evaluate` runs at step 0, every `eval.every_steps` and at the end (`run_final_eval`); without
    it the run trains only. A resume whose config differs from the checkpoint's (beyond
    `config.RESUME_FREE_FIELDS`) is refused unless `allow_config_change`. A finished run is not
    evaluated again when its final report exists.
    """
    workdir = cfg.run_dir
    workdir.mkdir(parents=True, exist_ok=True)

    # ---- Data (first: a missing dataset fails before any device memory is spent) ----------------
    train_iter = data_lib.make_train_iterator(cfg)

    # ---- Mesh and sharded state -------------------------------------------------------------
    mesh = sharding_lib.make_mesh(cfg.mesh)
    logging.info("mesh %s over %d devices (%d processes)", dict(mesh.shape), mesh.size, jax.process_count())
    spec, state, shardings = state_lib.create_train_state(cfg, mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh)

    # ---- Resume, or initialise from an earlier stage -----------------------------------------
    manager = ckpt_lib.make_manager(cfg.checkpoint_dir, cfg.checkpoint)
    meeting.wait("train state created")  # Orbax's restore synchronises with collectives: arrive together
    restored = ckpt_lib.restore_latest(manager, state, shardings, cfg, set_aside_unreadable=True)
    if restored is not None:
        start_step, state, data_state = restored
        _check_resume_config(manager, start_step, cfg, allow_config_change)
        train_iter.set_state(data_state)
        if jax.process_index() == 0 and start_step < cfg.optim.total_steps:  # a restart says where it picks up
            print(f"resumed from step {start_step} of {cfg.optim.total_steps} ({cfg.checkpoint_dir})", flush=True)
    else:
        start_step = 0
        if cfg.checkpoint.init_from:
            state = ckpt_lib.initialise_from(state, cfg)
    _warn_if_geometry_tokens_are_blank(spec, state, cfg)
    step_fn = step_lib.make_train_step(spec, cfg, shardings, batch_sharding)

    # ---- Steps ---------------------------------------------------------------------------------
    logger = MetricLogger(workdir, cfg.log_every, peak_flops_per_second=flops_lib.run_peak_flops())
    watcher = PreemptionWatcher(cfg.checkpoint.save_on_preemption, cfg.checkpoint.preemption_check_every_steps)
    end_step = cfg.optim.total_steps if stop_after_steps is None else min(cfg.optim.total_steps,
                                                                           start_step + stop_after_steps)
    if evaluate and cfg.eval.every_steps and start_step == 0 and stop_after_steps is None:
        _evaluate(evaluate, spec, state, logger, 0, final=False)  # the untrained baseline
    pending = None  # (step, device metrics) of the previous step: read one step late
    tracing = False
    last_metrics: dict = {}
    preempted = False
    step = last_saved = start_step
    if start_step < end_step and jax.process_index() == 0:
        print(f"[train] step {start_step} of {cfg.optim.total_steps}: compiling the train step (the first step of "
              "each view bucket takes longest)", flush=True)
    bar = console.progress(total=cfg.optim.total_steps, initial=start_step, unit="step", desc="train",
                           disable=None if jax.process_index() == 0 else True)
    try:
        while step < end_step:
            tracing = _toggle_profiler(cfg, step, tracing, workdir, manager)
            host_batch = next(train_iter)
            batch = data_lib.to_global(host_batch, batch_sharding)
            with jax.profiler.StepTraceAnnotation("train", step_num=step):
                state, metrics = step_fn(state, batch)
            # Model FLOPs of the global step, counted on the host while the device runs the step
            # (this process's packs times the process count: every process draws alike packs).
            step_flops = flops_lib.step_flops(cfg.model, host_batch).train_total * jax.process_count()
            step += 1
            bar.update(1)
            if pending is not None:
                last_metrics = _log(logger, pending, cfg)
            pending = (step, metrics, step_flops)
            if step % cfg.checkpoint.every_steps == 0 or step == end_step:
                ckpt_lib.save(manager, step, state, train_iter.get_state(), cfg)
                last_saved = step
            if evaluate and cfg.eval.every_steps and step % cfg.eval.every_steps == 0 and step < end_step:
                _evaluate(evaluate, spec, state, logger, step, final=False)
            if watcher.should_stop(step):
                if last_saved != step:  # this step may have just been saved by the schedule above
                    ckpt_lib.save(manager, step, state, train_iter.get_state(), cfg, force=True)
                preempted = True
                break
        if pending is not None:
            last_metrics = _log(logger, pending, cfg, force=True)
    finally:
        bar.close()
        manager.wait_until_finished()  # before stop_trace: see _toggle_profiler
        if tracing:
            jax.profiler.stop_trace()  # the run ended inside the profiling window
        watcher.close()

    # ---- Final evaluation --------------------------------------------------------------------
    report = None
    finished_before = start_step >= cfg.optim.total_steps and (workdir / "eval" / f"report_step{step}.json").exists()
    if finished_before and jax.process_index() == 0:
        print(f"the run had already finished at step {start_step}; its report is "
              f"{workdir / 'eval' / f'report_step{step}.json'} (g2vlm eval evaluates again)", flush=True)
    if evaluate and run_final_eval and not preempted and step >= cfg.optim.total_steps and not finished_before:
        report = _evaluate(evaluate, spec, state, logger, step, final=True)
    logger.close()
    manager.close()
    return TrainResult(workdir=workdir, start_step=start_step, final_step=step, last_metrics=last_metrics, eval_report=report,
                       preempted=preempted, spec=spec, state=state, stop_signal=watcher.signal_name or "SIGTERM")


def _check_resume_config(manager, step: int, cfg: config_lib.ExperimentConfig, allow: bool) -> None:
    """Refuses (ConfigError, one line) to continue a run with a config other than the one it was written with."""
    stored = ckpt_lib.read_metadata(manager, step).get("config")
    changes = config_lib.resume_changes(stored, cfg) if stored is not None else []
    if not changes:
        return
    shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in changes[:6])
    shown += f"; ... ({len(changes)} fields)" if len(changes) > 6 else ""
    if allow:
        logging.warning("resuming step %d of %s with a changed config (--allow-config-change): %s", step,
                        manager.directory, shown)
        return
    raise config_lib.ConfigError(
        f"{manager.directory} holds a run written with another config ({shown}); run the command it was started "
        "with, pick another --workdir, or pass --allow-config-change to continue it with this config")


def _toggle_profiler(cfg: config_lib.ExperimentConfig, step: int, tracing: bool, workdir: pathlib.Path,
                     manager) -> bool:
    """Traces steps [start, stop) of `cfg.profile_steps` with jax.profiler (view in TensorBoard).

    The trace stops only once no checkpoint is being written: `stop_trace` while Orbax's async save
    thread was finalising crashed the process (a segmentation fault in CI).
    """
    start, stop = cfg.profile_steps
    if not tracing and start <= step < stop:
        jax.profiler.start_trace(str(workdir / "profile"))
        return True
    if tracing and step >= stop:
        manager.wait_until_finished()
        jax.profiler.stop_trace()
        return False
    return tracing


def _log(logger: MetricLogger, pending, cfg: config_lib.ExperimentConfig, force: bool = False) -> dict:
    """Fetches the previous step's metrics, logs them and enforces the non-finite limit."""
    step, metrics, step_flops = pending
    host = {k: float(np.asarray(v)) for k, v in jax.device_get(metrics).items()}
    if host["nonfinite_streak"] >= cfg.optim.max_nonfinite_steps:
        raise NonFiniteTrainingError(
            f"{int(host['nonfinite_streak'])} consecutive non-finite steps (limit optim.max_nonfinite_steps="
            f"{cfg.optim.max_nonfinite_steps}) at step {step}; the last good checkpoint is intact — lower the "
            "learning rate or inspect the data, then resume")
    if not host["finite"]:
        logging.warning("step %d: non-finite loss/gradient, update skipped (streak %d)", step,
                        int(host["nonfinite_streak"]))
    logger.record(step, host, {"flops": step_flops}, force=force)
    return host


def _evaluate(evaluate: EvaluateHook, spec, state, logger, step, *, final: bool) -> dict:
    if jax.process_index() == 0:
        tqdm.write(f"[eval] step {step}: running the held-out evaluators{' and drawing pictures' if final else ''}")
    t0 = time.perf_counter()
    report = evaluate(spec, state, step, final)
    flat = {f"eval/{k}": v for k, v in logger_lib.flatten_scalars(report).items()}
    logger.write(step, {**flat, "eval_time_s": time.perf_counter() - t0}, prefix="eval")
    pictures = [name for part in report.values() if isinstance(part, dict) for name in part.get("pictures", [])]
    logger.images(step, [logger.workdir / "eval" / name for name in pictures])
    return report

