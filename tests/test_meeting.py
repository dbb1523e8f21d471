"""Meeting points of multi-process runs (g2vlm_jax/meeting.py): a process that reaches a collective
program 40 s after its peer (a slow compile) no longer breaks gloo's 30 s rendezvous."""
import os
import subprocess
import sys

from tests import multihost

# Two processes x 1 CPU device: a sum over an array sharded across both; process 1 arrives late.
PROCESS = """
import sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from g2vlm_jax import meeting
mesh = jax.make_mesh((2,), ("d",), axis_types=(AxisType.Auto,))
x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("d")), np.full((1, 4), 1.0 + jax.process_index()))
total = meeting.MeetBeforeRunning(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P())), "sum")
if jax.process_index() == 1:
    time.sleep(40)  # this process compiles slowly
print("sums", float(total(x)), float(total(x * 2)), flush=True)
"""


def test_a_late_process_meets_its_peer_instead_of_timing_out():
    port = multihost.free_port()
    env = dict(os.environ, PYTHONPATH=str(multihost.ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS, f"127.0.0.1:{port}", str(i)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outputs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, outputs):
        # Without the meeting: "Gloo context initialization failed: DEADLINE_EXCEEDED" after 30 s.
        assert p.returncode == 0, err[-3000:]
        assert "sums 12.0 24.0" in out, err[-3000:]
