"""Every `g2vlm train` command of the README resolves to a valid config exactly as written (issue #21:
README examples must run as written). Running them is what the other tests do for the tiny ones; here
every one, 2B included, is parsed and validated (no data, no weights needed)."""
import pathlib
import re
import shlex

import pytest

from g2vlm_jax import config

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def _code_lines() -> list[str]:
    """Lines of the README's ``` blocks, continuation lines joined."""
    blocks = README.read_text().split("```")[1::2]
    return [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]


def _train_commands() -> list[list[str]]:
    commands = []
    for line in _code_lines():
        match = re.search(r"(?:\.venv/bin/)?g2vlm train (.*)", line)
        if match and "--experiment" in match.group(1):
            args = match.group(1).split("#")[0].replace("$BUCKET", "gs://bucket").rstrip("\"'` ")
            commands.append(shlex.split(args))
    return commands


def test_the_readme_has_train_commands():
    assert len(_train_commands()) >= 5


@pytest.mark.parametrize("args", _train_commands(), ids=lambda a: " ".join(a)[:80])
def test_readme_train_command_resolves(args):
    experiment = args[args.index("--experiment") + 1]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = config.load_experiment(experiment, overrides)
    for assignment in overrides:
        key, value = assignment.split("=", 1)
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        assert str(node).lower() == value.lower() or node == type(node)(value), (key, node, value)


def test_a_conflicting_override_names_the_field_the_user_set():
    with pytest.raises(config.ConfigError) as e:
        config.load_experiment("experiments/g2vlm_2b_stage1a.py:v5p", ["optim.total_steps=1000"])
    message = str(e.value)
    assert message.startswith("config field 'optim.total_steps' (set to 1000) conflicts with 'optim.warmup_steps'")
    assert "warmup_steps=5000, total_steps=1000" in message and "set optim.warmup_steps as well" in message
    with pytest.raises(config.ConfigError, match=r"'data.packs_per_step': must be positive, got 0"):
        config.load_experiment("experiments/tiny_synthetic.py", ["data.packs_per_step=0"])
    with pytest.raises(config.ConfigError, match=r"'optim.total_steps': must be > 0, got -5"):
        config.load_experiment("experiments/tiny_synthetic.py", ["optim.total_steps=-5"])
