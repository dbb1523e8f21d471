"""The program `g2vlm train` runs is the program the AOT tool lowers (issue: one program from laptop to pod).

For each preset (dp, fsdp, fsdp_tp) on 8 fake CPU devices, `g2vlm train` runs one step and its
final evaluation with JAX_DUMP_IR_TO set, so JAX writes the StableHLO of every program the trainer
compiles. A worker process then lowers the same experiment through g2vlm_jax/aot.py (the code
behind `g2vlm aot`) on the same devices and compares: the train step and the reconstruction
evaluator's program must be the same text (source locations aside), and their activation
constraints (`sdy.sharding_constraint`) must equal the committed golden
`tests/golden/sharding/tiny_synthetic_test.<preset>.json` (regenerate with
`G2VLM_UPDATE_GOLDENS=1`, then review the diff).
"""
import collections
import json
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GOLDEN_DIR = ROOT / "tests" / "golden" / "sharding"
EXPERIMENT = "experiments/tiny_synthetic.py:test"
PRESETS = {
    "dp": ("mesh.preset=dp", "mesh.data=8", "mesh.fsdp=1", "mesh.tensor=1"),
    "fsdp": ("mesh.preset=fsdp", "mesh.data=2", "mesh.fsdp=4", "mesh.tensor=1"),
    "fsdp_tp": ("mesh.preset=fsdp_tp", "mesh.data=1", "mesh.fsdp=4", "mesh.tensor=2"),
}
RUN = ("optim.total_steps=1", "data.packs_per_step=8", "checkpoint.every_steps=1")
PROGRAMS = ("train_step", "eval_geometry")

_LOC_LINE = re.compile(r"^#loc\d* = .*$", re.M)
_LOC_REF = re.compile(r"\s*loc\((?:[^()\"]|\"[^\"]*\"|\((?:[^()\"]|\"[^\"]*\")*\))*\)")
_CONSTRAINT = re.compile(r"sdy\.sharding_constraint %\S+ (<@mesh, \[.*?\]>) : (tensor<[^>]*>)")


def program_text(mlir: str) -> str:
    """StableHLO text without source locations (they name the caller's frames, not the program)."""
    return _LOC_REF.sub("", _LOC_LINE.sub("", mlir)).strip()


def constraints(mlir: str) -> dict[str, int]:
    """'<@mesh, [{"data", "fsdp"}, {}, {}]> : tensor<8x40x64xf32>' -> count, for every activation constraint."""
    return dict(sorted(collections.Counter(f"{spec} : {t}" for spec, t in _CONSTRAINT.findall(mlir)).items()))


def _worker(dump_dirs: dict[str, str]) -> dict:
    """Lowers each preset's programs through g2vlm_jax/aot.py and compares them with the trainer's dumps."""
    import jax

    from g2vlm_jax import aot
    from g2vlm_jax import config as C

    out = {}
    for preset, dump in dump_dirs.items():
        cfg = C.load_experiment(EXPERIMENT, [*PRESETS[preset], *RUN, f"workdir={dump}/run"])
        target = aot.prepare(cfg, jax.devices())
        lowered = {"train_step": [aot.lower_train(target, s).as_text(debug_info=True) for s in aot.train_shapes(cfg)],
                   "eval_geometry": [aot.lower_eval(target).as_text(debug_info=True)]}
        result = {}
        for program in PROGRAMS:
            files = sorted(pathlib.Path(dump).glob(f"jax_ir*_jit_{program}_compile.mlir"))
            ran = [program_text(f.read_text()) for f in files]
            proven = {program_text(t): t for t in lowered[program]}
            result[program] = {"ran": len(ran), "equal": [t in proven for t in ran],
                               "constraints": constraints(next(proven[t] for t in ran if t in proven))
                               if any(t in proven for t in ran) else {}}
        out[preset] = result
    return out


def _env(**extra) -> dict:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu", **extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def comparison(tmp_path_factory):
    dumps = {}
    for preset, mesh in PRESETS.items():
        dump = tmp_path_factory.mktemp(f"dump_{preset}")
        sets = [a for o in (*mesh, *RUN, f"workdir={dump / 'run'}") for a in ("--set", o)]
        proc = subprocess.run([sys.executable, "-m", "g2vlm_jax.cli", "train", "--experiment", EXPERIMENT, *sets],
                              cwd=ROOT, env=_env(JAX_DUMP_IR_TO=str(dump)), capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert (dump / "run" / "eval" / "report.json").is_file()
        dumps[preset] = str(dump)
    proc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(dumps)], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_trainer_runs_the_program_the_aot_tool_lowers(comparison, preset):
    for program in PROGRAMS:
        r = comparison[preset][program]
        assert r["ran"] >= 1, f"g2vlm train compiled no {program} program"
        assert all(r["equal"]), f"{preset}: the {program} that g2vlm train ran differs from the AOT tool's lowering"


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_activation_constraints_match_the_golden(comparison, preset):
    got = {program: comparison[preset][program]["constraints"] for program in PROGRAMS}
    # What every preset must show: the backbone activations with the batch over data x fsdp.
    assert any(spec.startswith('<@mesh, [{"data", "fsdp"}, {}, {}]>') for spec in got["train_step"])
    tensor_constraints = [s for s in got["train_step"] if '"tensor"' in s]
    assert bool(tensor_constraints) == (preset == "fsdp_tp")  # only fsdp_tp shards activations over 'tensor'
    path = GOLDEN_DIR / f"tiny_synthetic_test.{preset}.json"
    if os.environ.get("G2VLM_UPDATE_GOLDENS"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(got, indent=1) + "\n")
    assert got == json.loads(path.read_text()), f"activation constraints of {preset} changed: review, then regenerate"


def test_program_text_ignores_only_locations():
    a = '#loc1 = loc("x")\nfunc(%a: tensor<2xf32> loc("state.step")) {\n  %0 = stablehlo.add %a, %a : tensor<2xf32> loc(#loc1)\n}'
    b = '#loc7 = loc("y")\nfunc(%a: tensor<2xf32>) {\n  %0 = stablehlo.add %a, %a : tensor<2xf32> loc(#loc7)\n}'
    assert program_text(a) == program_text(b)
    assert program_text(a) != program_text(b.replace("add", "multiply"))
    mlir = ('%8 = sdy.sharding_constraint %7 <@mesh, [{"data", "fsdp"}, {}, {}]> : tensor<8x40x64xf32> loc(#l)\n'
            '%9 = sdy.sharding_constraint %8 <@mesh, [{"data", "fsdp"}, {}, {}]> : tensor<8x40x64xf32> loc(#l)\n')
    assert constraints(mlir) == {'<@mesh, [{"data", "fsdp"}, {}, {}]> : tensor<8x40x64xf32>': 2}


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    print(json.dumps(_worker(json.loads(sys.argv[2]))))
