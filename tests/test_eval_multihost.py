"""Evaluators in a multi-process run (what `g2vlm train` does every `eval.every_steps` on a pod): two
JAX processes, each scoring its share of the held-out packs and answering the questions with the
model sharded across both, write the report one process writes for the same parameters."""
import json
import os
import subprocess
import sys

import numpy as np

from data_pipelines.synthetic import spatial_qa
from g2vlm_jax import config as C
from g2vlm_jax import evaluation
from g2vlm_jax import sharding
from g2vlm_jax.core import state as state_lib
from g2vlm_jax.training.logger import flatten_scalars
from tests import multihost

EXPERIMENT = str(multihost.ROOT / "experiments" / "tiny_synthetic.py:qa_test")
# 4 packs: one per device of the 2-process x 2-device fsdp mesh.
OVERRIDES = ["data.packs_per_step=4", "eval.evaluators=reconstruction,spatial_qa", "eval.num_batches=1"]

PROCESS = """
import json, sys
import jax
jax.distributed.initialize(sys.argv[1], 2, int(sys.argv[2]))
from g2vlm_jax import config as C, evaluation, sharding
from g2vlm_jax.core import state as state_lib
cfg = C.load_experiment(sys.argv[3], [f"workdir={sys.argv[4]}", *sys.argv[5:]])
spec, state, _ = state_lib.create_train_state(cfg, sharding.make_mesh(cfg.mesh))
report = evaluation.run_evaluators(spec, cfg, state, cfg.run_dir, step=0, write_pictures=True)
print("REPORT " + json.dumps(report, default=float), flush=True)
"""


def test_two_processes_write_the_one_process_report(tmp_path):
    port = multihost.free_port()
    env = dict(os.environ, PYTHONPATH=str(multihost.ROOT), XLA_FLAGS="--xla_force_host_platform_device_count=2")
    workdir = tmp_path / "two"
    procs = [subprocess.Popen([sys.executable, "-c", PROCESS, f"127.0.0.1:{port}", str(i), EXPERIMENT, str(workdir),
                               *OVERRIDES], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    try:
        outputs = [p.communicate(timeout=900) for p in procs]
    finally:
        for p in procs:
            p.kill()
    reports = []
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
        reports.append(json.loads(next(line for line in out.splitlines() if line.startswith("REPORT "))[7:]))

    cfg = C.load_experiment(EXPERIMENT, [f"workdir={tmp_path / 'one'}", *OVERRIDES])
    spec, state, _ = state_lib.create_train_state(cfg, sharding.make_mesh(cfg.mesh))
    single = json.loads(json.dumps(evaluation.run_evaluators(spec, cfg, state, cfg.run_dir, step=0,
                                                             write_pictures=True), default=float))

    # qa_test: eval.qa_per_task = 2 questions of each task family of the generator.
    assert single["reconstruction"]["num_samples"] >= 4 \
        and single["spatial_qa"]["num_questions"] == 2 * len(spatial_qa.TASKS)
    expected = flatten_scalars(single)
    for report in reports:  # every process returns the whole report
        got = flatten_scalars(report)
        assert got.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_allclose(got[key], value, rtol=1e-4, atol=1e-6, err_msg=key)
        assert [e["prediction"] for e in report["spatial_qa"]["examples"]] == \
            [e["prediction"] for e in single["spatial_qa"]["examples"]]
    # Process 0 alone wrote the report and the pictures.
    written = json.loads((workdir / "eval" / "report.json").read_text())
    assert flatten_scalars(written) == flatten_scalars(reports[0])
    assert set(p.name for p in (workdir / "eval").iterdir()) == set(p.name for p in (tmp_path / "one" / "eval").iterdir())
