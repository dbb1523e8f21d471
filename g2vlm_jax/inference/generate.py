"""Answering questions: chat prompts -> packed batch -> prefill -> jitted KV-cache decoding.

    prompts (question, geometry frames, semantic images)
      -> `prompt_batch`: one sample per row in the stage-2 chat layout (data_pipelines/sequence.py),
         ending at "<|im_start|>assistant"; rows padded to a multiple of `PAD_MULTIPLE` semantic slots
      -> prefill: the ordinary forward pass, writing every layer's k/v into a `KVCache`
         (model/kv_cache.py) of capacity L + max_new_tokens; geometry outputs come for free
      -> decode: one token per row per step through the semantic expert, each attending to the cache;
         greedy (temperature 0) or temperature + top-p sampling; a row stops at <|im_end|>.

A generated token i of row b sits at reading order n_b + i and M-RoPE position (p_b + i) x 3, where
n_b is the prompt length and p_b the next position of the prompt: exactly where a training sample
puts its answer tokens, so the cached computation equals recomputing the whole sequence
(tests/test_generate.py checks tokens and logits against full recomputation).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from data_pipelines import sequence
from g2vlm_jax import meeting
from g2vlm_jax import sharding as sharding_lib
from g2vlm_jax.batch import GEO_PATCH, IMAGE_FIELDS, VIT_MERGED_PATCH, PackedBatch, RowShape, empty_row
from g2vlm_jax.model.mask import MaskInfo
from g2vlm_jax.model.kv_cache import KVCache
from g2vlm_jax.tokenizer import Tokenizer

PAD_MULTIPLE = 32  # prompts are padded to a multiple of this many semantic slots (fewer compiles)
DECODE_SPLIT = 2**20  # split id of generated tokens (causal text: any id not used by the prompt)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One question and its images.

    geo_images: float32[V, H, W, 3] in [0, 1], H and W multiples of 14 (V may be 0: no geometry frames)
    sem_images: float32[N, Hs, Ws, 3] in [0, 1], Hs and Ws multiples of 28 (N may be 0)
    """

    question: str
    geo_images: np.ndarray
    sem_images: np.ndarray


@dataclasses.dataclass
class PromptBatch:
    """A packed batch of prompts and where each row's continuation starts.

    next_position: int32[B] M-RoPE position of the first generated token
    next_order:    int32[B] reading-order index of the first generated token
    last_slot:     int32[B] slot of the prompt's last token (its logits predict the first answer token)
    """

    batch: PackedBatch
    next_position: np.ndarray
    next_order: np.ndarray
    last_slot: np.ndarray


def prompt_sample(tok: Tokenizer, prompt: Prompt, answer_ids: list[int] = ()) -> sequence.SampleTokens:
    """The chat-layout tokens of `prompt` and the answer's start (`sequence.ANSWER_START`, whose logits
    give the first answer token), optionally followed by (already generated) answer tokens."""
    v, h, w = prompt.geo_images.shape[:3] if len(prompt.geo_images) else (0, 0, 0)
    n = len(prompt.sem_images)
    sh, sw = prompt.sem_images.shape[1:3] if n else (0, 0)
    builder = sequence.chat_prompt(tok, v, h, w, n, sh, sw, prompt.question)
    builder.tokens(tok.encode(sequence.ANSWER_START) + list(answer_ids))
    return builder.build()


def _check_same_images(prompts: list[Prompt]) -> None:
    first = prompts[0]
    for i, p in enumerate(prompts):
        if p.geo_images.shape != first.geo_images.shape or p.sem_images.shape != first.sem_images.shape:
            raise ValueError(f"prompt {i} has geometry frames {p.geo_images.shape} / semantic images "
                             f"{p.sem_images.shape}, prompt 0 has {first.geo_images.shape} / {first.sem_images.shape}; "
                             "prompts batched together need the same image shapes (resize them, or batch separately)")


def pack_single_samples(samples: list[sequence.SampleTokens], geo_images: np.ndarray,
                        sem_images: np.ndarray) -> PackedBatch:
    """One sample per row, rows padded to a multiple of `PAD_MULTIPLE` semantic slots; no ground truth.

    geo_images: float32[B, V, H, W, 3] (V may be 0); sem_images: float32[B, N, Hs, Ws, 3] (N may be 0).
    """
    b, views, height, width = geo_images.shape[:4]
    n_sem, sem_h, sem_w = sem_images.shape[1:4]
    height, width = (height, width) if views else (GEO_PATCH, GEO_PATCH)
    sem_h, sem_w = (sem_h, sem_w) if n_sem else (VIT_MERGED_PATCH, VIT_MERGED_PATCH)
    lu = -(-max(s.num_semantic_tokens for s in samples) // PAD_MULTIPLE) * PAD_MULTIPLE
    shape = RowShape(lu + views * (height // GEO_PATCH) * (width // GEO_PATCH), 1, views, height, width, n_sem, sem_h,
                     sem_w)
    # Every row holds one real sample and all its images; no ground truth (padding values). The images are the
    # caller's, so no padding images are built for them (18.6 MiB a call at 8 views of 518x392).
    padded = tuple(name for name in IMAGE_FIELDS if name not in ("geo_images", "sem_images"))
    rows = [{**sequence.pack_row([s], shape), **empty_row(shape, padded)} for s in samples]
    fields = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    fields.update(geo_images=geo_images.astype(np.float32).reshape((b, 1, views, height, width, 3)),
                  sample_valid=np.ones((b, 1), bool),
                  sem_images=sem_images.astype(np.float32).reshape((b, n_sem, sem_h, sem_w, 3)),
                  sem_image_valid=np.ones((b, n_sem), bool))
    return PackedBatch(**fields)


def prompt_batch(tok: Tokenizer, prompts: list[Prompt], answers: list[list[int]] | None = None) -> PromptBatch:
    """Packs one prompt per row (rows share image shapes; text lengths may differ)."""
    if not prompts:
        raise ValueError("prompt_batch: no prompts")
    _check_same_images(prompts)
    answers = answers or [[] for _ in prompts]
    samples = [prompt_sample(tok, p, a) for p, a in zip(prompts, answers)]
    batch = pack_single_samples(samples, np.stack([p.geo_images for p in prompts]),
                                np.stack([p.sem_images for p in prompts]))
    lengths = np.array([len(s.token_ids) for s in samples], np.int32)
    next_pos = np.array([int(s.positions.max()) + 1 for s in samples], np.int32)
    # The last token in reading order is text (the assistant turn), stored at semantic slot n_sem_b - 1.
    last_slot = np.array([s.num_semantic_tokens - 1 for s in samples], np.int32)
    return PromptBatch(batch, next_pos, lengths, last_slot)


# --------------------------------------------------------------------------------------------------
# Jitted prefill and decode (the model's graph is static; its state is an argument)
# --------------------------------------------------------------------------------------------------
def _prefill(graphdef, state, batch: PackedBatch, last_slot: jax.Array, capacity: int):
    model = nnx.merge(graphdef, state)
    dtype = model.embed_tokens.dtype
    cache = KVCache.empty(model.cfg, batch.token_ids.shape[0], capacity, dtype)
    out = model(batch, compute_logits=False, cache=cache)
    last_hidden = jnp.take_along_axis(out.hidden_states, last_slot[:, None, None], axis=1)  # [B, 1, D]
    return model.logits(last_hidden)[:, 0], out.cache, out.geometry


def _decode(graphdef, state, token: jax.Array, position: jax.Array, order: jax.Array, cache: KVCache):
    """token, position, order: int32[B] -> (float32 logits [B, vocab], cache)."""
    model = nnx.merge(graphdef, state)
    b = token.shape[0]
    ones = jnp.ones((b, 1), jnp.int32)
    info = MaskInfo(seq_order=order[:, None], document_ids=ones, split_ids=ones * DECODE_SPLIT,
                    split_full=jnp.zeros((b, 1), bool), geo_frame=-ones)
    positions = jnp.broadcast_to(position[:, None, None], (b, 3, 1))
    logits, cache = model.decode(token[:, None], positions, info, cache)
    return logits[:, 0], cache


@functools.lru_cache(maxsize=8)
def generation_programs(mesh: jax.sharding.Mesh, preset: str) -> tuple[Callable, Callable]:
    """(prefill, decode) traced under `preset`'s activation rules on the model's `mesh`.

    Every process of a multi-process run (the evaluator during training) compiles a new prompt
    shape before any of them runs it (g2vlm_jax/meeting.py).
    """
    prefill = sharding_lib.jit_sharded(_prefill, mesh, preset, static_argnames=("graphdef", "capacity"))
    decode = sharding_lib.jit_sharded(_decode, mesh, preset, static_argnames=("graphdef",), donate_argnames=("cache",))
    return (meeting.MeetBeforeRunning(prefill, "generation prefill", static_argnums=(0, 4)),
            meeting.MeetBeforeRunning(decode, "generation decode", static_argnums=(0,)))


def sample_token(logits: jax.Array, key: jax.Array, temperature: float, top_p: float) -> jax.Array:
    """logits float32[B, vocab] -> int32[B]: argmax when temperature == 0, else nucleus sampling."""
    if temperature <= 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits / temperature
    if top_p < 1.0:
        sorted_logits = jnp.sort(scaled, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always survives).
        keep = jnp.cumsum(probs, axis=-1) - probs < top_p
        threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        scaled = jnp.where(scaled >= threshold, scaled, -jnp.inf)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def _to_devices(tree, state):
    """Host inputs of the jitted prefill/decode. With one process: plain device arrays. When the model
    spans processes: replicated over its mesh (every process passes the same prompts, e.g. the
    spatial-QA evaluator's)."""
    if jax.process_count() == 1:
        return jax.tree.map(jnp.asarray, tree)
    replicated = NamedSharding(sharding_lib.mesh_of(state), P())
    return jax.tree.map(lambda x: jax.make_array_from_callback(np.shape(x), replicated,
                                                               lambda index: np.asarray(x)[index]), tree)


def _local(x):
    """An output of prefill/decode where this process can use it: itself with one process, else the
    whole array on the host (sampling then runs on this process's default device)."""
    return x if jax.process_count() == 1 else meeting.to_host(x)


@dataclasses.dataclass
class Generation:
    """token_ids: per row, the generated ids up to (excluding) <|im_end|>; texts: their decoding;
    logits: float32[B, T, vocab] of every step when requested; geometry: the prefill's geometry outputs."""

    token_ids: list[list[int]]
    texts: list[str]
    logits: np.ndarray | None
    geometry: dict | None


def generate(model: nnx.Module, tok: Tokenizer, prompts: list[Prompt], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, keep_logits: bool = False,
             preset: str = "dp") -> Generation:
    """Answers `prompts` (one row each) with KV-cache decoding; stops a row at <|im_end|>.

    `preset` is the sharding preset the model's parameters were placed with (the experiment's
    `mesh.preset`); prefill and decode run under its activation rules on the parameters' mesh.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    pb = prompt_batch(tok, prompts)
    graphdef, state = nnx.split(model)
    prefill, decode = generation_programs(sharding_lib.mesh_of(state), preset)
    length = pb.batch.token_ids.shape[1]
    capacity = length + max_new_tokens
    logits, cache, geometry = prefill(graphdef, state, _to_devices(pb.batch, state),
                                       _to_devices(pb.last_slot, state), capacity)
    logits = _local(logits)
    key = jax.random.key(seed)
    stop = tok.special.im_end
    b = len(prompts)
    out_ids: list[list[int]] = [[] for _ in range(b)]
    done = np.zeros(b, bool)
    steps_logits = []
    for i in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token = sample_token(logits, sub, temperature, top_p)
        if keep_logits:
            steps_logits.append(np.asarray(logits))
        host = np.asarray(token)
        for r in range(b):
            if not done[r]:
                if host[r] == stop:
                    done[r] = True
                else:
                    out_ids[r].append(int(host[r]))
        if done.all() or i == max_new_tokens - 1:
            break
        # length + i + 1 <= capacity always holds here: the cache never overflows.
        logits, cache = decode(graphdef, state, *_to_devices((host, pb.next_position + i, pb.next_order + i), state),
                                cache)
        logits = _local(logits)
    texts = [tok.decode(ids).strip() for ids in out_ids]
    geometry = meeting.to_host(geometry) if geometry is not None else None
    return Generation(out_ids, texts, np.stack(steps_logits, axis=1) if keep_logits else None, geometry)
