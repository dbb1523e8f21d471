"""The `g2vlm` command line: listed subcommands exist and user errors are one-line messages."""
import pathlib
import subprocess
import sys

import pytest

from g2vlm_jax import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "convert-data", "reconstruct", "chat", "benchmark", "export", "convert"):
        assert command in out


TINY = "experiments/tiny_synthetic.py:test"
MISSING_DATA_EXPERIMENT = """
from g2vlm_jax import config as c
import dataclasses

def get_config(arg=""):
    base = c.load_experiment("{root}/experiments/tiny_synthetic.py:test")
    source = c.DataSource(name="npz_scenes", kind="recon", data_dir="{data_dir}")
    return dataclasses.replace(base, data=dataclasses.replace(base.data, sources=(source,), eval_sources=(source,)))
"""


def _last_line(stderr: str) -> str:
    """The error line (progress bars of dataset building may precede it on stderr)."""
    return stderr.replace("\r", "\n").strip().splitlines()[-1]


@pytest.mark.parametrize("overrides, message", [
    (["optim.bogus=1"], "config field 'optim.bogus': unknown key; valid keys here are"),
    (["optim.total_steps=abc"], "optim.total_steps"),
    (["model.geo_attention=diagonal"], "allowed values are ['global', 'frame', 'mixed', 'block_causal']"),
    (["mesh.fsdp=3"], "mesh"),
    (["optim.grad_accum_steps=3"], "not divisible by optim.grad_accum_steps=3"),
])
def test_config_errors_are_one_line_naming_the_fix(overrides, message, tmp_path, capsys):
    argv = ["train", "--experiment", TINY, "--set", f"workdir={tmp_path}"]
    for o in overrides:
        argv += ["--set", o]
    code = cli.main(argv)
    err = _last_line(capsys.readouterr().err)
    assert code == cli.USER_ERROR_EXIT_CODE, err
    assert err.startswith("g2vlm train: ") and message in err, err


def test_missing_experiment_and_data_are_one_line(tmp_path, capsys):
    assert cli.main(["train", "--experiment", str(tmp_path / "nope.py")]) == 2
    assert "nope.py" in capsys.readouterr().err
    experiment = tmp_path / "missing_data.py"
    experiment.write_text(MISSING_DATA_EXPERIMENT.format(root=ROOT, data_dir=tmp_path / "no_such_dir"))
    assert cli.main(["train", "--experiment", str(experiment), "--set", f"workdir={tmp_path / 'run'}"]) == 2
    err = _last_line(capsys.readouterr().err)
    assert err.startswith("g2vlm train: cannot open 'npz_scenes'") and "g2vlm convert-data" in err
    assert len(err) < 600, err  # not tfds's catalogue of public datasets


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "g2vlm_jax.cli", "convert-data", "-h"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "npz" in out.stdout and "scannet" in out.stdout


def test_bad_inference_arguments_are_one_line(tiny_trained_run, capsys):
    """Accepted silently before: reconstruct --width 0 / -56, chat --temperature -1, chat --question "";
    eval --step of a step that does not exist now lists the steps there are."""
    ckpt = str(tiny_trained_run)
    cases = [
        (["reconstruct", "--checkpoint", ckpt, "--images", ckpt, "--out", ckpt + "/r", "--width", "0"], "at least 14"),
        (["reconstruct", "--checkpoint", ckpt, "--images", ckpt, "--out", ckpt + "/r", "--width", "-56"], "at least 14"),
        (["chat", "--checkpoint", ckpt, "--question", "Which is closer?", "--temperature", "-1"], "must be >= 0"),
        (["chat", "--checkpoint", ckpt, "--question", "  "], "--question is empty"),
        (["eval", "--experiment", "experiments/tiny_synthetic.py:test", "--set", f"workdir={ckpt}",
          "--checkpoint", ckpt, "--step", "150"], "has no checkpoint of step 150; its steps are [3]"),
    ]
    for argv, message in cases:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and message in err, (argv, err)


def test_output_paths_are_checked_before_any_work(tmp_path):
    """An --out / --workdir / OUT_DIR that is a file, or under one, is one line naming the option, exit 2,
    through the real entry point, before a model is loaded or an image is read."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    cases = [
        (["train", "--experiment", TINY, "--workdir", f"{a_file}/run"], f"--workdir {a_file}/run cannot be created"),
        (["reconstruct", "--checkpoint", str(tmp_path / "no_run"), "--images", str(tmp_path), "--out", str(a_file)],
         f"--out {a_file} is a file, not a directory"),
        (["export", "--checkpoint", str(tmp_path / "no_run"), "--out", str(a_file)], f"--out {a_file} is a file"),
        (["convert", "--official", str(tmp_path / "no_release"), "--out", f"{a_file}/x"], f"--out {a_file}/x cannot be"),
        (["convert-data", "npz", str(tmp_path), str(a_file)], f"OUT_DIR {a_file} is a file"),
    ]
    for argv, message in cases:
        out = subprocess.run([sys.executable, "-m", "g2vlm_jax.cli", *argv], capture_output=True, text=True,
                             cwd=str(ROOT), timeout=300)
        assert out.returncode == 2, (argv, out.stderr[-1500:])
        assert "Traceback" not in out.stderr and message in _last_line(out.stderr), (argv, out.stderr[-800:])
