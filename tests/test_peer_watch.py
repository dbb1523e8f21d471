"""The peer watch of multi-process runs (g2vlm_jax/peer_watch.py), without training: N local JAX
processes start the way `g2vlm train` does; killing any one stops every survivor at once with one
line and exit status 3, and a clean finish of every process is not mistaken for a death."""
import os
import signal
import subprocess
import sys
import time

import pytest

from g2vlm_jax import peer_watch
from tests import multihost

# Starts jax.distributed like the CLI, then waits for "finish" on stdin (a clean end) or forever.
PROCESS = """
import argparse, sys
from g2vlm_jax import cli
args = argparse.Namespace(distributed="explicit", coordinator=sys.argv[1], num_processes=int(sys.argv[2]),
                          process_id=int(sys.argv[3]), heartbeat_timeout=100)
watch = cli.initialize_distributed(args)
print("ready", flush=True)
if sys.stdin.readline().strip() == "finish":
    watch.close()
    print("finished", flush=True)
"""


def _launch(n: int) -> list[subprocess.Popen]:
    port = multihost.free_port()
    env = dict(os.environ, PYTHONPATH=str(multihost.ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS, f"127.0.0.1:{port}", str(n), str(i)], env=env,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(n)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return procs


@pytest.mark.parametrize("victim", [0, 1])
def test_killing_any_process_stops_every_survivor_with_one_line(victim):
    procs = _launch(3)
    procs[victim].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    for i, p in enumerate(procs):
        if i == victim:
            continue
        # The heartbeat timeout is 100 s: stopping well before it is the peer watch's doing.
        assert p.wait(timeout=60) == peer_watch.EXIT_CODE
        assert time.monotonic() - killed_at < 30
        err = p.stderr.read()
        assert f"g2vlm: process {i} of 3 stopped: a peer process died" in err
        assert f"process {victim} disconnected" in err
        assert "Check failure stack trace" not in err
    procs[victim].wait()


def test_clean_finish_is_not_a_death():
    procs = _launch(2)
    # Process 1 finishes first; process 0 keeps running and must not take that for a death.
    procs[1].stdin.write("finish\n")
    procs[1].stdin.flush()
    assert procs[1].stdout.readline().strip() == "finished"
    time.sleep(3)
    assert procs[0].poll() is None, procs[0].stderr.read()
    procs[0].stdin.write("finish\n")
    procs[0].stdin.flush()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stderr.read()
