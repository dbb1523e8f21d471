"""The decoding cache: every layer's rotated keys and values plus the keys' mask metadata.

Autoregressive decoding (g2vlm_jax/inference/generate.py) runs the prompt once (prefill: semantic
and geometry tokens together, exactly the training forward pass) and then one new semantic token per
step. Each call writes its tokens' k/v into the next free slots of the cache and attends to the whole
cache. Slot order does not matter: the attention rule reads only metadata (`MaskInfo`), so the cache
stores the keys' metadata next to them and never-written slots carry document 0, which the rule
masks out. A cached step therefore computes exactly what the full forward pass over the prompt plus
the new tokens computes for those tokens.

    k, v:    [layers, B, C, Hkv, Dh]  rotated keys / values in the compute dtype (C = capacity)
    info:    MaskInfo, fields [B, C]  metadata of the cached keys (document 0 = empty slot)
    length:  int32[]                  slots filled so far (the next call writes at [length, length + n))
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from g2vlm_jax.batch import PAD_ORDER
from g2vlm_jax.config import ModelConfig
from g2vlm_jax.model.mask import MaskInfo


@struct.dataclass
class KVCache:
    k: jax.Array
    v: jax.Array
    info: MaskInfo
    length: jax.Array

    @classmethod
    def empty(cls, cfg: ModelConfig, batch_size: int, capacity: int, dtype) -> "KVCache":
        """A cache of `capacity` empty slots per row (document 0: masked for every query)."""
        t = cfg.text
        shape = (t.num_layers, batch_size, capacity, t.num_kv_heads, t.head_dim)
        zeros = jnp.zeros((batch_size, capacity), jnp.int32)
        info = MaskInfo(seq_order=jnp.full((batch_size, capacity), PAD_ORDER, jnp.int32), document_ids=zeros,
                        split_ids=zeros, split_full=jnp.zeros((batch_size, capacity), bool),
                        geo_frame=jnp.full((batch_size, capacity), -1, jnp.int32))
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), info=info, length=jnp.zeros((), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def info_with(self, new: MaskInfo) -> MaskInfo:
        """The key metadata after writing the metadata of n new tokens (fields [B, n]) at `length`."""
        return jax.tree.map(lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), self.length, 1),
                            self.info, new)


def write_layer(cache_k: jax.Array, cache_v: jax.Array, k: jax.Array, v: jax.Array,
                start: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One layer's cache [B, C, Hkv, Dh] with k/v of n new tokens [B, n, Hkv, Dh] written at `start`."""
    put = lambda c, x: jax.lax.dynamic_update_slice_in_dim(c, x.astype(c.dtype), start, 1)
    return put(cache_k, k), put(cache_v, v)
