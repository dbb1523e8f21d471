"""g2vlm_jax: G2VLM (geometry-grounded vision-language model) in JAX / Flax NNX."""
import flax

# Parameters carry *logical* axis names (see g2vlm_jax/sharding.py), which our rules map to mesh
# axes when the sharded state is created (eval_shape -> shardings -> jit(out_shardings)). Flax 0.12's
# eager variable sharding would instead try to shard each variable at construction time and fails
# without a mesh, so it is switched off for the whole package.
flax.config.update("flax_always_shard_variable", False)
