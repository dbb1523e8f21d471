"""Test-only: launch `g2vlm train` as N local JAX processes (jax.distributed on 127.0.0.1, gloo on CPU)."""
from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXPERIMENT = str(ROOT / "experiments" / "tiny_synthetic.py:test")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(num_processes: int, workdir: pathlib.Path, overrides: list[str], *, devices_per_process: int = 2,
           heartbeat_timeout: int = 10, extra_args: tuple[str, ...] = ()) -> list[subprocess.Popen]:
    """Starts the processes of one run; process i writes workdir/proc{i}.log (stdout and stderr).
    `extra_args` are appended to every `g2vlm train` command line (e.g. '--allow-config-change')."""
    port = free_port()
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    workdir.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(num_processes):
        cmd = [sys.executable, "-m", "g2vlm_jax.cli", "train", "--experiment", EXPERIMENT,
               "--set", f"workdir={workdir}", *[a for o in overrides for a in ("--set", o)],
               "--coordinator", f"127.0.0.1:{port}", "--num-processes", str(num_processes), "--process-id", str(i),
               "--heartbeat-timeout", str(heartbeat_timeout), *extra_args]
        log = open(workdir / f"proc{i}.log", "ab")
        procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=str(ROOT)))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float) -> list[int]:
    """Return codes of every process; kills them all and fails if any is still running after `timeout`."""
    deadline = time.monotonic() + timeout
    codes = []
    try:
        for p in procs:
            codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        raise
    return codes


def wait_for(condition, timeout: float, procs: list[subprocess.Popen], what: str) -> None:
    """Polls `condition()` until true; fails early if a process exits, or after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if any(p.poll() is not None for p in procs) or time.monotonic() > deadline:
            for p in procs:
                p.kill()
            raise AssertionError(f"gave up waiting for {what} (exit codes {[p.poll() for p in procs]})")
        time.sleep(0.5)
