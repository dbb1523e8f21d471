"""Jitted programs are built once per model and shape and reused, and a call leaves no memory behind (issue #23).

`reconstruct.predict` on N image sets of one shape traces and compiles one program; a new shape adds
exactly one. The train step called on batches of one shape is traced once. Traces are counted with
JAX's own monitoring events (`/jax/core/compile/jaxpr_trace_duration` fires once per jit trace), so
the tests also catch a retrace whose compile the persistent cache would hide.
"""
import pathlib
import platform
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from g2vlm_jax import config as C
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.core import state as state_lib
from g2vlm_jax.inference import reconstruct
from g2vlm_jax.model.g2vlm import G2VLM
from g2vlm_jax.tokenizer import load_tokenizer
from g2vlm_jax.training import step as step_lib
from tools.bench_common import recon_batch

TRACE_EVENT = "/jax/core/compile/jaxpr_trace_duration"
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class EventCounter:
    """Counts trace and backend-compile events of jitted functions whose name contains `name`."""

    def __init__(self, name: str):
        self.name, self.traces, self.compiles = name, 0, 0
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event: str, duration: float, **kwargs) -> None:
        if self.name not in str(kwargs.get("fun_name", "")):
            return
        self.traces += event == TRACE_EVENT
        self.compiles += event == COMPILE_EVENT


def _images(seed: int, views: int, h: int, w: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (views, h, w, 3), dtype=np.uint8)


def test_predict_compiles_once_per_image_shape():
    model = G2VLM(C.tiny_model(use_vit=False), rngs=nnx.Rngs(0))
    kernel = model.dino2llm.kernel  # zero-initialised: random, so that the pixels reach the outputs
    kernel.set_value(0.1 * np.random.default_rng(0).standard_normal(kernel.get_value().shape).astype(np.float32))
    tok = load_tokenizer("sentencepiece:builtin")
    # The program is shared by the process (lru_cache per mesh and preset): other tests of this worker may
    # have compiled it for other shapes, so count what this test adds.
    program = reconstruct.reconstruction_program(sharding_lib.mesh_of(nnx.state(model)), "dp")
    cached = program._cache_size()
    counter = EventCounter("_geometry")
    first = reconstruct.predict(model, tok, _images(0, 2, 28, 42))
    assert (counter.traces, counter.compiles) == (1, 1)
    for seed in (1, 2, 3):  # other pixels, same shape: the same program
        out = reconstruct.predict(model, tok, _images(seed, 2, 28, 42))
        assert out["world_points"].shape == (2, 28, 42, 3)
    assert (counter.traces, counter.compiles) == (1, 1)
    assert not np.allclose(out["world_points"], first["world_points"])  # the inputs did reach the program
    assert program._cache_size() == cached + 1
    reconstruct.predict(model, tok, _images(4, 3, 28, 42))  # one more view: one more program
    reconstruct.predict(model, tok, _images(5, 3, 28, 42))
    assert (counter.traces, counter.compiles) == (2, 2)
    assert program._cache_size() == cached + 2


def test_train_step_is_traced_once(tmp_path):
    cfg = C.load_experiment("experiments/tiny_synthetic.py:test", [f"workdir={tmp_path}"])
    mesh = sharding_lib.make_mesh(cfg.mesh)
    spec, state, shardings = state_lib.create_train_state(cfg, mesh)
    batch_sharding = sharding_lib.batch_sharding(mesh)
    step_fn = step_lib.make_train_step(spec, cfg, shardings, batch_sharding)
    counter = EventCounter("train_step")
    for seed in range(3):  # other pixels, same shape
        host = recon_batch(2, packs=cfg.data.packs_per_step, hw=cfg.data.image_size, seed=seed)
        state, metrics = step_fn(state, jax.device_put(host, batch_sharding))
        assert np.isfinite(float(metrics["loss"]))
    assert (counter.traces, counter.compiles) == (1, 1)
    assert int(state.step) == 3  # three optimiser updates were applied


def test_reconstructor_reuses_one_split_and_program():
    """A Reconstructor (one model split, many image sets) gives predict's results and compiles nothing more."""
    model = G2VLM(C.tiny_model(use_vit=False), rngs=nnx.Rngs(1))
    tok = load_tokenizer("sentencepiece:builtin")
    images = [_images(seed, 2, 28, 28) for seed in range(3)]
    want = [reconstruct.predict(model, tok, im) for im in images]
    counter = EventCounter("_geometry")
    reconstructor = reconstruct.Reconstructor(model, tok)
    for im, ref in zip(images, want):
        got = reconstructor(im)
        for key in ("local_points", "world_points", "c2w"):
            np.testing.assert_array_equal(got[key], ref[key])
    assert (counter.traces, counter.compiles) == (0, 0)


_FRAGMENTED_HEAP = """
import numpy as np
from g2vlm_jax.inference import reconstruct
def rss_mib():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20
big, keep = [], []
for _ in range(2000):  # 100 KB buffers (malloc's heap) with 1 KiB survivors between them, as a call leaves
    big.append(np.ones(100_000 // 8))
    keep.append(np.ones(128))
full = rss_mib()
del big
freed = rss_mib()
released = reconstruct.release_freed_memory()
print(full, freed, rss_mib(), released)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="malloc_trim is glibc's")
def test_freed_heap_is_returned_to_the_os():
    """The mechanism behind the Reconstructor's flat peak RSS: 190 MiB of freed heap chunks stay resident
    (glibc keeps them) until `release_freed_memory` hands them back."""
    proc = subprocess.run([sys.executable, "-c", _FRAGMENTED_HEAP], capture_output=True, text=True, timeout=120,
                          cwd=pathlib.Path(__file__).resolve().parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    full, freed, released, ok = proc.stdout.split()[-4:]
    assert ok == "True"
    assert float(freed) > float(full) - 50  # free() alone returned (almost) nothing
    assert float(released) < float(freed) - 150  # the trim returned the ~190 MiB


def test_reconstructor_releases_freed_memory_after_each_call(monkeypatch):
    model = G2VLM(C.tiny_model(use_vit=False), rngs=nnx.Rngs(1))
    calls = []
    monkeypatch.setattr(reconstruct, "release_freed_memory", lambda: calls.append(1))
    reconstructor = reconstruct.Reconstructor(model, load_tokenizer("sentencepiece:builtin"))
    for seed in range(2):
        assert reconstructor(_images(seed, 2, 28, 28))["world_points"].shape == (2, 28, 28, 3)
    assert len(calls) == 2
