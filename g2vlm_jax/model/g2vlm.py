"""The whole G2VLM network: packed batch in, logits and geometry out (SPEC 1).

    batch (g2vlm_jax/batch.py, expert-grouped rows: semantic slots [0, Lu), geometry slots [Lu, L))
      xU = embed_tokens(token_ids[:, :Lu]);  ViT(sem_images) scattered onto sem_token_pos
      xG = dino2llm(DINO(geo_images))        [B, S, V, h*w, D] reshaped to [B, Lg, D] (no gather)
      hU, hG = language_model(xU, xG, M-RoPE(positions), mask metadata)      (model/mot.py)
      logits = lm_head(hU)                   float32[B, Lu, vocab]
      geometry = heads(hG as [B*S, V, h*w, D]) reshaped to [B, S, V, ...]

Encoders are frozen by `stop_gradient` on their outputs when `cfg.freeze_vit` / `cfg.freeze_dino`
(the projection `dino2llm` stays trainable, as in the official stages).

Parameter names (ours -> official; `kernel` is the transposed torch `weight`):

    embed_tokens.weight [vocab, D]            language_model.model.embed_tokens.weight
    lm_head.kernel [D, vocab]                 language_model.lm_head.weight (transposed)
    language_model.layers.X [layers, ...]     language_model.model.layers.{i}.X (see model/mot.py)
    language_model.norm[_moe_geo].weight      language_model.model.norm[_moe_geo].weight
    vit_model.*                               vit_model.*   (model/vit.py)
    dino_model.*                              dino_model.*  (model/dino.py)
    dino2llm.kernel [1024, D], .bias          dino2llm.weight (transposed), dino2llm.bias
    heads.{point,camera,global_points}_decoder.*, heads.{point,global_point,camera}_head.*
                                              the same names without `heads.` (model/heads.py)

`official_backbone_params` spells out the backbone part (embeddings, layers, norms, lm_head,
dino2llm) for converters; the encoders and heads carry their own loaders.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, struct

from g2vlm_jax.batch import PackedBatch, check_batch
from g2vlm_jax.config import ModelConfig
from g2vlm_jax.model.mask import MaskInfo
from g2vlm_jax.model import encoder_layers
from g2vlm_jax.model.dino import GeometryEncoder
from g2vlm_jax.model.heads import GeometryHeads
from g2vlm_jax.model.kv_cache import KVCache
from g2vlm_jax.model.mot import ACT_AXES, MoTStack, dense, dtype_of, freeze, official_layer_params
from g2vlm_jax.model.rope import mrope_cos_sin
from g2vlm_jax.model.vit import SemanticEncoder
from g2vlm_jax.sharding import constrain, logical


@struct.dataclass
class ModelOutput:
    """What one forward pass returns.

    logits:            float32[B, Lu, vocab] over the semantic slots, or None (compute_logits=False)
    hidden_states:     [B, Lu, D] final-normed semantic hidden states (for chunked CE: `model.logits(h)`)
    geo_hidden_states: [B, Lg, D] final-normed geometry hidden states (the heads' input)
    geometry:          None (compute_geometry=False or no geometry slots) or a dict of float32
                       local_points / world_points / global_points [B, S, V, H, W, 3],
                       camera_poses [B, S, V, 4, 4] (camera-to-world)
    cache:             the decoding cache holding this call's tokens, when one was passed in
    """

    logits: jax.Array | None
    hidden_states: jax.Array
    geo_hidden_states: jax.Array
    geometry: dict[str, jax.Array] | None
    cache: KVCache | None = None


class TokenEmbedding(nnx.Module):
    """Token id -> row of `weight` [vocab, D] (official `embed_tokens.weight`, init normal 0.02)."""

    def __init__(self, vocab: int, dim: int, *, rngs: nnx.Rngs, dtype, param_dtype):
        self.dtype = dtype
        self.weight = nnx.Param(nnx.initializers.normal(0.02)(rngs.params(), (vocab, dim), param_dtype),
                                **logical("vocab", "embed"))

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...], ids, axis=0).astype(self.dtype)


def _host_counted_rngs(rngs: nnx.Rngs) -> nnx.Rngs:
    """A child `Rngs` (seeded by one draw of `rngs`) whose draw counter is a host numpy scalar.

    Why: inside a trace (`eval_shape`, the jitted sharded init) every draw from an `Rngs` whose
    counter is a tracer makes Flax 0.12 probe the tracer's `.sharding`, and JAX builds an error
    message by scanning the whole trace; with the ~1000 draws of the encoders and heads that is
    quadratic (about a minute for the 2B model). A host counter keeps each draw O(1); the keys
    themselves are unchanged in kind (fold_in of the traced key with the draw index).
    """
    child = nnx.Rngs(rngs.params())
    child.params.count.set_value(np.zeros((), np.uint32))
    return child


class G2VLM(nnx.Module):
    """The G2VLM network (see the module docstring); `__call__` takes a `PackedBatch`."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        cdt, pdt = dtype_of(cfg.compute_dtype), dtype_of(cfg.param_dtype)
        self.cfg = cfg
        self.embed_tokens = TokenEmbedding(t.vocab_size, t.hidden_size, rngs=rngs, dtype=cdt, param_dtype=pdt)
        self.language_model = MoTStack(cfg, rngs=rngs)
        self.lm_head = dense(cfg, t.hidden_size, t.vocab_size, ("embed", "vocab"), bias=False, rngs=rngs)
        if cfg.use_vit:
            self.vit_model = SemanticEncoder(cfg.vit, out_dim=t.hidden_size, rngs=_host_counted_rngs(rngs),
                                             dtype=cdt, param_dtype=pdt)
        self.dino_model = GeometryEncoder(cfg.dino, rngs=_host_counted_rngs(rngs), dtype=cdt, param_dtype=pdt)
        # Zero-initialised (SPEC 1.3): geometry tokens enter the LLM as exactly 0 at the start of stage 1.
        self.dino2llm = nnx.Linear(cfg.dino.hidden_size, t.hidden_size, dtype=cdt, param_dtype=pdt,
                                   kernel_init=nnx.initializers.zeros_init(), bias_init=nnx.initializers.zeros_init(),
                                   kernel_metadata=logical("enc_embed", "embed"), bias_metadata=logical("embed"),
                                   rngs=rngs)
        self.heads = GeometryHeads(cfg, rngs=_host_counted_rngs(rngs), dtype=cdt, param_dtype=pdt)

    # ---- inputs ---------------------------------------------------------------------------------
    def embed_semantic(self, batch: PackedBatch) -> jax.Array:
        """Semantic slots [0, Lu): text embeddings with the merged ViT tokens scattered in. -> [B, Lu, D]."""
        lu = batch.num_sem_tokens
        b, n = batch.sem_images.shape[:2]
        if n and not self.cfg.use_vit:
            raise ValueError(f"the batch holds {n} semantic images per pack but model.use_vit=False; build the "
                             "model with use_vit=True or give the data pipeline no semantic images")
        x = self.embed_tokens(batch.token_ids[:, :lu])
        if n == 0:
            return x
        tokens = self.vit_model(batch.sem_images.reshape((b * n,) + batch.sem_images.shape[2:]))
        tokens = freeze(tokens, self.cfg.freeze_vit).astype(x.dtype)
        ts = tokens.shape[1]
        # Invalid images point at slot L >= Lu (and are forced there): their writes are dropped.
        pos = jnp.where(batch.sem_image_valid[:, :, None], batch.sem_token_pos, lu).reshape(b, n * ts)
        return x.at[jnp.arange(b)[:, None], pos].set(tokens.reshape(b, n * ts, -1), mode="drop")

    def embed_geometry(self, batch: PackedBatch) -> jax.Array:
        """Geometry slots [Lu, L): DINO patch tokens of every frame through dino2llm. -> [B, Lg, D]."""
        b, s, v, hh, ww, _ = batch.geo_images.shape
        d = self.cfg.text.hidden_size
        if batch.num_geo_tokens == 0:
            return jnp.zeros((b, 0, d), dtype_of(self.cfg.compute_dtype))
        feats = self.dino_model(batch.geo_images.reshape(b * s * v, hh, ww, 3))  # [B*S*V, h*w, 1024]
        feats = freeze(feats, self.cfg.freeze_dino)
        # Row-major (s, v, i, j) is exactly the slot order of the geometry part of a row.
        return self.dino2llm(feats).reshape(b, batch.num_geo_tokens, d)

    # ---- outputs --------------------------------------------------------------------------------
    def logits(self, hidden: jax.Array) -> jax.Array:
        """hidden [..., D] -> float32 logits [..., vocab] (fp32 accumulation of the lm_head matmul)."""
        kernel = self.lm_head.kernel[...].astype(hidden.dtype)
        return jnp.einsum("...d,dv->...v", hidden, kernel, preferred_element_type=jnp.float32)

    def geometry(self, geo_hidden: jax.Array, batch: PackedBatch, *, global_points: bool = True) -> dict[str, Any]:
        """geo_hidden [B, Lg, D] -> heads' outputs, each reshaped to [B, S, V, ...]."""
        b, s, v = batch.geo_images.shape[:3]
        h, w = batch.geo_grid
        tokens = geo_hidden.reshape(b * s, v, h * w, geo_hidden.shape[-1])
        out = self.heads(tokens, (h, w), with_global=global_points, sample_valid=batch.sample_valid.reshape(b * s))
        return {name: a.reshape((b, s) + a.shape[1:]) for name, a in out.items()}

    def __call__(self, batch: PackedBatch, *, compute_logits: bool = True, compute_geometry: bool = True,
                 global_points: bool = True, cache: KVCache | None = None) -> ModelOutput:
        """The forward pass; with a decoding `cache` (prefill) the batch's k/v are also written into it."""
        check_batch(batch)
        with encoder_layers.model_kernel(self.cfg.attention_kernel):  # encoders and heads: the model's kernel
            return self._forward(batch, compute_logits, compute_geometry, global_points, cache)

    def _forward(self, batch: PackedBatch, compute_logits: bool, compute_geometry: bool, global_points: bool,
                 cache: KVCache | None) -> ModelOutput:
        t = self.cfg.text
        xu = constrain(self.embed_semantic(batch), ACT_AXES)
        xg = constrain(self.embed_geometry(batch), ACT_AXES)
        cos, sin = mrope_cos_sin(batch.positions, t.head_dim, t.rope_theta, t.mrope_sections)
        hu, hg, *new_cache = self.language_model(xu, xg, cos, sin, MaskInfo.from_batch(batch), cache)
        logits = constrain(self.logits(hu), ("batch", "length", "vocab")) if compute_logits else None
        geometry = None
        if compute_geometry and batch.num_geo_tokens:
            geometry = self.geometry(hg, batch, global_points=global_points)
        return ModelOutput(logits=logits, hidden_states=hu, geo_hidden_states=hg, geometry=geometry,
                           cache=new_cache[0] if new_cache else None)

    def decode(self, token_ids: jax.Array, positions: jax.Array, info: MaskInfo,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
        """New text tokens through the semantic expert, attending to the cache (one decoding step).

        token_ids: int32[B, n]; positions: int32[B, 3, n] M-RoPE ids; info: their mask metadata
        (fields [B, n]). Returns (float32 logits [B, n, vocab], the cache with the tokens appended).
        """
        t = self.cfg.text
        xu = self.embed_tokens(token_ids)
        xg = jnp.zeros((xu.shape[0], 0, xu.shape[2]), xu.dtype)
        cos, sin = mrope_cos_sin(positions, t.head_dim, t.rope_theta, t.mrope_sections)
        hu, _, cache = self.language_model(xu, xg, cos, sin, info, cache)
        return self.logits(hu), cache


# --------------------------------------------------------------------------------------------------
# Official names and parameter counts
# --------------------------------------------------------------------------------------------------
def official_backbone_params(cfg: ModelConfig) -> list[tuple[tuple[str, ...], int | None, str, bool]]:
    """(our parameter path, layer index or None, official name, transposed?) of every backbone tensor.

    For a stacked layer parameter, official tensor `layers.{i}.X` is slice `i` of our path.
    """
    out = [(("embed_tokens", "weight"), None, "language_model.model.embed_tokens.weight", False),
           (("lm_head", "kernel"), None, "language_model.lm_head.weight", True),
           (("language_model", "norm", "weight"), None, "language_model.model.norm.weight", False),
           (("language_model", "norm_moe_geo", "weight"), None, "language_model.model.norm_moe_geo.weight", False),
           (("dino2llm", "kernel"), None, "dino2llm.weight", True),
           (("dino2llm", "bias"), None, "dino2llm.bias", False)]
    for i in range(cfg.text.num_layers):
        for path, name, transposed in official_layer_params():
            out.append((("language_model", "layers") + path, i, f"language_model.model.layers.{i}.{name}", transposed))
    return out


def parameter_counts(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of the parts of SPEC 1.6, from `eval_shape` (nothing is allocated).

    one_expert: the semantic expert's layers + its final norm; llm: both experts, embeddings and
    lm_head; vit; dino; heads: decoders, heads and dino2llm; total: everything.
    """
    model = nnx.eval_shape(lambda: G2VLM(cfg, rngs=nnx.Rngs(0)))
    counts = {"one_expert": 0, "llm": 0, "vit": 0, "dino": 0, "heads": 0, "total": 0}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = [str(p) for p in path]
        size = math.prod(var.get_value().shape)
        counts["total"] += size
        if names[0] in ("embed_tokens", "lm_head", "language_model"):
            counts["llm"] += size
            geo = any(n.endswith("_moe_geo") or n in ("ls1", "ls2") for n in names)
            if names[0] == "language_model" and not geo:
                counts["one_expert"] += size
        elif names[0] == "vit_model":
            counts["vit"] += size
        elif names[0] == "dino_model":
            counts["dino"] += size
        else:
            counts["heads"] += size
    return counts
