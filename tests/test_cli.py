"""The `g2vlm` command line: listed subcommands exist and user errors are one-line messages."""
import subprocess
import sys

import pytest

from g2vlm_jax import cli


def test_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "eval", "convert-data"):
        assert command in out


def test_config_error_is_one_line_and_exit_code_2(capsys):
    code = cli.main(["train", "--experiment", "experiments/tiny_synthetic.py", "--set", "optim.bogus=1"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("g2vlm: config field 'optim.bogus': unknown key") and "\n" not in err


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "g2vlm_jax.cli", "convert-data", "-h"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "npz" in out.stdout and "scannet" in out.stdout
