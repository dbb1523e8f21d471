"""The blockwise kernel inside the MoT stack (lax.scan over layers, remat) agrees with the XLA kernel."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from model_batches import standard_batch

from g2vlm_jax.config import tiny_model
from g2vlm_jax.model import mot
from g2vlm_jax.model.attention import attention
from g2vlm_jax.model.mask import MaskInfo
from g2vlm_jax.model.rope import mrope_cos_sin


def test_mot_stack_with_blockwise_matches_xla_under_scan_and_remat(monkeypatch):
    """The kernel inside the real stack: lax.scan over layers (traced layer index, 'mixed' mode) and
    full remat, 4 x 4 tiles of 16; outputs and parameter gradients equal the XLA kernel's."""
    # mot.py does not pass ModelConfig.attention_block_size to attention() yet: set the block here.
    monkeypatch.setattr(mot, "attention", functools.partial(attention, block_size=16))

    batch = standard_batch(num_rows=2, views=2)
    lu, info = batch.num_sem_tokens, MaskInfo.from_batch(batch)
    results = []
    for kernel in ("xla", "blockwise"):
        cfg = tiny_model(attention_kernel=kernel, attention_block_size=16, geo_attention="mixed", remat_policy="full")
        graph, state = nnx.split(mot.MoTStack(cfg, rngs=nnx.Rngs(0)))
        t = cfg.text
        cos, sin = mrope_cos_sin(jnp.asarray(batch.positions), t.head_dim, t.rope_theta, t.mrope_sections)
        x = jnp.asarray(np.random.default_rng(0).standard_normal((2, info.length, t.hidden_size), np.float32))

        def loss(state, x, cos, sin, info):
            hu, hg = nnx.merge(graph, state)(x[:, :lu], x[:, lu:], cos, sin, info)
            return jnp.sum(hu ** 2) + jnp.sum(jnp.sin(hg))

        results.append(jax.jit(jax.value_and_grad(loss))(state, x, cos, sin, info))
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
