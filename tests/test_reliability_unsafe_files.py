"""No code path loads pickles; malformed or pickled inputs get a clear error naming the file."""
import json
import pathlib
import pickle
import re

import numpy as np
import pytest

from data_pipelines.builders import npz_scenes
from g2vlm_jax import checkpoint as ckpt_lib
from g2vlm_jax import convert

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGES = ("g2vlm_jax", "data_pipelines", "tools", "experiments")


def _sources():
    for package in PACKAGES:
        yield from (ROOT / package).rglob("*.py")


def test_no_source_can_unpickle():
    offenders = []
    for path in _sources():
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if re.search(r"\bimport pickle\b|\bpickle\.loads?\(|torch\.load\(|allow_pickle\s*=\s*True|"
                         r"\bjoblib\.load\(|\bdill\b", code):
                offenders.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
            if re.search(r"\bnp\.load\(", code) and "allow_pickle=False" not in code:
                offenders.append(f"{path.relative_to(ROOT)}:{n}: np.load without allow_pickle=False")
    assert not offenders, "\n".join(offenders)


def _room_like(tmp_path, condition_bytes: bytes) -> pathlib.Path:
    scene = tmp_path / "scene"
    (scene / "rgb").mkdir(parents=True)
    (scene / "condition.npz").write_bytes(condition_bytes)
    return scene


def test_npz_converter_refuses_pickles_and_garbage(tmp_path):
    buf = tmp_path / "objects.npz"
    np.savez(buf, depths=np.array([{"evil": 1}], dtype=object), poses=np.eye(4)[None], intrinsics=np.eye(3))
    scene = _room_like(tmp_path / "a", buf.read_bytes())
    with pytest.raises(ValueError, match="condition.npz holds pickled object arrays, which g2vlm never loads"):
        npz_scenes.read_npz_scene(scene)
    scene = _room_like(tmp_path / "b", pickle.dumps({"depths": 1}))  # a bare pickle named .npz: never opened
    with pytest.raises(ValueError, match=r"condition.npz is not a .npz archive \(it starts with b'\\x80"):
        npz_scenes.read_npz_scene(scene)
    scene = _room_like(tmp_path / "c", b"PK\x03\x04 truncated zip")
    with pytest.raises(ValueError, match="condition.npz is not a readable .npz archive"):
        npz_scenes.read_npz_scene(scene)


def test_weights_refuse_pickles_and_garbage(tmp_path):
    from g2vlm_jax import config as C

    official = tmp_path / "official"
    official.mkdir()
    for name, content in convert.official_config_files(C.tiny_model()).items():
        (official / name).write_text(json.dumps(content))
    (official / "model.safetensors").write_bytes(pickle.dumps({"w": np.zeros(3)}))
    with pytest.raises(ValueError, match="model.safetensors"):
        convert.read_official_dir(official)
    params = tmp_path / "params_only"
    (params / "params").mkdir(parents=True)
    (params / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match="metadata.json is not valid JSON"):
        ckpt_lib.load_params(params)
