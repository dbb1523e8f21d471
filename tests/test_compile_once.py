"""Jitted programs are built once per model and shape and reused (issue #23).

`reconstruct.predict` on N image sets of one shape traces and compiles one program; a new shape adds
exactly one. The train step called on batches of one shape is traced once. Traces are counted with
JAX's own monitoring events (`/jax/core/compile/jaxpr_trace_duration` fires once per jit trace), so
the tests also catch a retrace whose compile the persistent cache would hide.
"""
import jax
import numpy as np
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
