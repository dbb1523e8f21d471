"""The mixture-of-transformers (MoT) decoder: per-expert weights, one shared attention (SPEC 1.1).

A row of L slots is stored expert-grouped (g2vlm_jax/batch.py): semantic tokens in [0, Lu),
geometry tokens in [Lu, L). A layer therefore carries the pair (xu: [B, Lu, D], xg: [B, Lg, D]) and
each expert computes only on its own slice: a MoT layer costs what one dense layer costs on L tokens.
The two slices meet only inside attention, where q/k/v of both are concatenated along the length
and go through one softmax with the packed-row mask (model/attention.py).

Per layer (U = semantic, G = geometry):

    hU = input_layernorm(xU)                       hG = input_layernorm_moe_geo(xG)
    q,k,v = self_attn.{q,k,v}_proj(hU)             q,k,v = self_attn.{q,k,v}_proj_moe_geo(hG)
    q,k = self_attn.{q,k}_norm(.)                  q,k = self_attn.{q,k}_norm_moe_geo(.)     # over head_dim
    q,k = M-RoPE(q,k);  o = attention([qU;qG], [kU;kG], [vU;vG])                              # one softmax
    xU += self_attn.o_proj(oU)                     xG += ls1 * self_attn.o_proj_moe_geo(oG)
    xU += mlp(post_attention_layernorm(xU))        xG += ls2 * mlp_moe_geo(post_attention_layernorm_moe_geo(xG))

Activation-level freezing (SPEC 1.1): `freeze_und` stops gradients through the semantic tokens' stack
input, q, k, v, attention output, MLP output and final norm; `freeze_recon` does the same for the
geometry tokens. For the geometry branch the stop sits after the LayerScale multiply, so that with
`freeze_recon` no geometry parameter (ls1/ls2 included) receives a gradient. (The official code
detaches before ls1, so ls1.gamma still gets a gradient there; its optimiser freezes it anyway.)

Parameter names and layouts (torch Linear stores W as [out, in]; ours is kernel [in, out] = W.T).
Our layers are stacked along a leading 'layers' axis: our `layers.X[i]` is official `layers.{i}.X`.

    ours (inside MoTStack)                            official (language_model.model.)         transpose
    layers.self_attn.{q,k,v}_proj[_moe_geo].kernel    layers.{i}.self_attn.{q,k,v}_proj[_moe_geo].weight   yes
    layers.self_attn.{q,k,v}_proj[_moe_geo].bias      layers.{i}.self_attn.{q,k,v}_proj[_moe_geo].bias     no
    layers.self_attn.o_proj[_moe_geo].kernel          layers.{i}.self_attn.o_proj[_moe_geo].weight         yes
    layers.self_attn.{q,k}_norm[_moe_geo].weight      layers.{i}.self_attn.{q,k}_norm[_moe_geo].weight     no
    layers.mlp[_moe_geo].{gate,up,down}_proj.kernel   layers.{i}.mlp[_moe_geo].{gate,up,down}_proj.weight  yes
    layers.{input,post_attention}_layernorm[_moe_geo].weight   same name                                    no
    layers.ls1.gamma, layers.ls2.gamma                layers.{i}.ls1.gamma, layers.{i}.ls2.gamma           no
    norm.weight, norm_moe_geo.weight                  norm.weight, norm_moe_geo.weight                     no

`official_layer_params()` returns this table in machine-readable form (for converters and tests).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from g2vlm_jax.config import ModelConfig
from g2vlm_jax.model.attention import attention
from g2vlm_jax.model.mask import MaskInfo
from g2vlm_jax.model.kv_cache import KVCache, write_layer
from g2vlm_jax.model.rope import apply_rotary
from g2vlm_jax.sharding import LOGICAL_AXES_KEY, constrain, logical

SEM, GEO = "", "_moe_geo"  # parameter-name suffixes of the semantic and the geometry expert
EXPERTS = (SEM, GEO)
ACT_AXES = ("batch", "length", "embed")  # logical names of a [B, L, D] activation

_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole layer in the backward pass
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


def dtype_of(name: str) -> jnp.dtype:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16}[name]


def freeze(x: jax.Array, frozen: bool) -> jax.Array:
    """`stop_gradient` when the expert owning `x` is frozen (activation-level freezing)."""
    return jax.lax.stop_gradient(x) if frozen else x


class RMSNorm(nnx.Module):
    """`weight * x / rms(x)` over the last axis, computed in fp32, returned in x's dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), **logical("norm"))

    def __call__(self, x: jax.Array) -> jax.Array:
        xf = x.astype(jnp.float32)
        normed = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
        return (self.weight[...].astype(jnp.float32) * normed).astype(x.dtype)


class LayerScale(nnx.Module):
    """Per-channel scale `gamma * x` (geometry expert only)."""

    def __init__(self, dim: int, init: float, *, param_dtype=jnp.float32):
        self.gamma = nnx.Param(jnp.full((dim,), init, param_dtype), **logical("norm"))

    def __call__(self, x: jax.Array) -> jax.Array:
        return x * self.gamma[...].astype(x.dtype)


def dense(cfg: ModelConfig, din: int, dout: int, axes: tuple[str, str], *, bias: bool, rngs: nnx.Rngs) -> nnx.Linear:
    """Linear layer with the backbone's init (normal 0.02, zero bias) and logical axis names."""
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype_of(cfg.compute_dtype),
                      param_dtype=dtype_of(cfg.param_dtype), kernel_init=nnx.initializers.normal(0.02),
                      bias_init=nnx.initializers.zeros_init(), kernel_metadata=logical(*axes),
                      bias_metadata=logical(axes[1]), rngs=rngs)


class SwiGLU(nnx.Module):
    """`down(silu(gate(x)) * up(x))`, no biases."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        d, f = cfg.text.hidden_size, cfg.text.mlp_hidden
        self.gate_proj = dense(cfg, d, f, ("embed", "mlp"), bias=False, rngs=rngs)
        self.up_proj = dense(cfg, d, f, ("embed", "mlp"), bias=False, rngs=rngs)
        self.down_proj = dense(cfg, f, d, ("mlp", "embed"), bias=False, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class MoTAttention(nnx.Module):
    """Per-expert q/k/v (bias) and o (no bias) projections plus per-expert QK RMSNorm over head_dim."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        self.num_heads, self.num_kv_heads, self.head_dim = t.num_heads, t.num_kv_heads, t.head_dim
        pdt = dtype_of(cfg.param_dtype)
        q_width, kv_width = t.num_heads * t.head_dim, t.num_kv_heads * t.head_dim
        for sfx in EXPERTS:
            setattr(self, f"q_proj{sfx}", dense(cfg, t.hidden_size, q_width, ("embed", "heads"), bias=True, rngs=rngs))
            setattr(self, f"k_proj{sfx}", dense(cfg, t.hidden_size, kv_width, ("embed", "kv_heads"), bias=True, rngs=rngs))
            setattr(self, f"v_proj{sfx}", dense(cfg, t.hidden_size, kv_width, ("embed", "kv_heads"), bias=True, rngs=rngs))
            setattr(self, f"o_proj{sfx}", dense(cfg, q_width, t.hidden_size, ("heads", "embed"), bias=False, rngs=rngs))
            setattr(self, f"q_norm{sfx}", RMSNorm(t.head_dim, t.rms_eps, param_dtype=pdt))
            setattr(self, f"k_norm{sfx}", RMSNorm(t.head_dim, t.rms_eps, param_dtype=pdt))

    def project(self, h: jax.Array, expert: str) -> tuple[jax.Array, jax.Array, jax.Array]:
        """h: [B, l, D] of one expert -> q [B, l, Hq, Dh], k, v [B, l, Hkv, Dh] (QK-normed, no RoPE)."""
        b, l, _ = h.shape
        q = getattr(self, f"q_proj{expert}")(h).reshape(b, l, self.num_heads, self.head_dim)
        k = getattr(self, f"k_proj{expert}")(h).reshape(b, l, self.num_kv_heads, self.head_dim)
        v = getattr(self, f"v_proj{expert}")(h).reshape(b, l, self.num_kv_heads, self.head_dim)
        return getattr(self, f"q_norm{expert}")(q), getattr(self, f"k_norm{expert}")(k), v

    def output(self, o: jax.Array, expert: str) -> jax.Array:
        """o: [B, l, Hq, Dh] attention output of one expert's tokens -> [B, l, D]."""
        b, l = o.shape[:2]
        return getattr(self, f"o_proj{expert}")(o.reshape(b, l, self.num_heads * self.head_dim))


class MoTLayer(nnx.Module):
    """One decoder layer holding both experts; see the module docstring for the computation."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        pdt = dtype_of(cfg.param_dtype)
        self.geo_mode, self.kernel, self.block_size = cfg.geo_attention, cfg.attention_kernel, cfg.attention_block_size
        self.freeze_und, self.freeze_recon = cfg.freeze_und, cfg.freeze_recon
        self.self_attn = MoTAttention(cfg, rngs=rngs)
        self.mlp = SwiGLU(cfg, rngs=rngs)
        self.mlp_moe_geo = SwiGLU(cfg, rngs=rngs)
        for sfx in EXPERTS:
            setattr(self, f"input_layernorm{sfx}", RMSNorm(t.hidden_size, t.rms_eps, param_dtype=pdt))
            setattr(self, f"post_attention_layernorm{sfx}", RMSNorm(t.hidden_size, t.rms_eps, param_dtype=pdt))
        self.ls1 = LayerScale(t.hidden_size, t.layerscale_init, param_dtype=pdt)
        self.ls2 = LayerScale(t.hidden_size, t.layerscale_init, param_dtype=pdt)

    def qkv(self, xu: jax.Array, xg: jax.Array, cos: jax.Array, sin: jax.Array):
        """Rotated q [B, L, Hq, Dh] and k, v [B, L, Hkv, Dh] of the row [xu ; xg] (cos/sin: [B, L, Dh])."""
        qu, ku, vu = (freeze(a, self.freeze_und) for a in self.self_attn.project(self.input_layernorm(xu), SEM))
        qg, kg, vg = (freeze(a, self.freeze_recon)
                      for a in self.self_attn.project(self.input_layernorm_moe_geo(xg), GEO))
        q = apply_rotary(jnp.concatenate([qu, qg], axis=1), cos, sin)
        k = apply_rotary(jnp.concatenate([ku, kg], axis=1), cos, sin)
        return q, k, jnp.concatenate([vu, vg], axis=1)

    def __call__(self, xu: jax.Array, xg: jax.Array, cos: jax.Array, sin: jax.Array, mask_info: MaskInfo, *,
                 layer_idx=None, kv=None):
        """xu: [B, Lu, D], xg: [B, Lg, D]; cos/sin: [B, Lu+Lg, Dh]; mask_info fields [B, Lu+Lg].

        `layer_idx` (int or traced int) is only read by the 'mixed' attention mode.
        `kv` (decoding, model/kv_cache.py): (cache_k, cache_v [B, C, Hkv, Dh], key_info MaskInfo [B, C]
        already holding these tokens' metadata, start int32[]): the tokens' k/v are written at slots
        [start, start + Lu + Lg) and the queries attend to the whole cache.
        Returns the updated (xu, xg), plus the updated (cache_k, cache_v) when `kv` is given.
        """
        xu, xg = constrain(xu, ACT_AXES), constrain(xg, ACT_AXES)
        lu = xu.shape[1]
        q, k, v = self.qkv(xu, xg, cos, sin)
        key_info = None
        if kv is not None:
            cache_k, cache_v, key_info, start = kv
            k, v = write_layer(cache_k, cache_v, k, v, start)
        o = attention(q, k, v, mask_info, key_info=key_info, geo_mode=self.geo_mode, layer_idx=layer_idx,
                      kernel=self.kernel, block_size=self.block_size)
        xu = xu + freeze(self.self_attn.output(o[:, :lu], SEM), self.freeze_und)
        xg = xg + freeze(self.ls1(self.self_attn.output(o[:, lu:], GEO)), self.freeze_recon)
        xu = xu + freeze(self.mlp(self.post_attention_layernorm(xu)), self.freeze_und)
        xg = xg + freeze(self.ls2(self.mlp_moe_geo(self.post_attention_layernorm_moe_geo(xg))), self.freeze_recon)
        if kv is not None:
            return constrain(xu, ACT_AXES), constrain(xg, ACT_AXES), (k, v)
        return constrain(xu, ACT_AXES), constrain(xg, ACT_AXES)


def _stacked_layers(cfg: ModelConfig, rngs: nnx.Rngs) -> MoTLayer:
    """`num_layers` independently initialised layers stacked along a leading 'layers' axis."""

    @nnx.split_rngs(splits=cfg.text.num_layers)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers", LOGICAL_AXES_KEY: "layers"})
    def make(layer_rngs: nnx.Rngs) -> MoTLayer:
        return MoTLayer(cfg, rngs=layer_rngs)

    return make(rngs)


class MoTStack(nnx.Module):
    """All decoder layers plus the per-expert final norms (embeddings live in the top-level model).

    The layer parameters are always stacked ([num_layers, ...]); `cfg.scan_layers` only chooses how
    they run: `lax.scan` over the stack (one compiled layer body) or a Python loop over slices.
    Both give the same parameter tree, so checkpoints do not depend on it. `cfg.remat_policy`
    ('none' | 'full' | 'dots' | 'dots_no_batch') wraps each layer in `jax.checkpoint`.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        t = cfg.text
        pdt = dtype_of(cfg.param_dtype)
        self.num_layers, self.scan_layers, self.remat_policy = t.num_layers, cfg.scan_layers, cfg.remat_policy
        self.freeze_und, self.freeze_recon = cfg.freeze_und, cfg.freeze_recon
        self.layers = _stacked_layers(cfg, rngs)
        self.norm = RMSNorm(t.hidden_size, t.rms_eps, param_dtype=pdt)
        self.norm_moe_geo = RMSNorm(t.hidden_size, t.rms_eps, param_dtype=pdt)
        if cfg.geo_init == "copy_semantic":
            self.copy_semantic_to_geometry()

    def copy_semantic_to_geometry(self) -> None:
        """Initialises every geometry-expert weight as a copy of its semantic twin (ls1/ls2 keep their init)."""
        layers, attn = self.layers, self.layers.self_attn
        pairs = [(getattr(attn, f"{n}"), getattr(attn, f"{n}{GEO}"))
                 for n in ("q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm")]
        pairs += [(getattr(layers, n), getattr(layers, f"{n}{GEO}"))
                  for n in ("mlp", "input_layernorm", "post_attention_layernorm")]
        pairs.append((self.norm, self.norm_moe_geo))
        for src, dst in pairs:
            nnx.update(dst, jax.tree.map(jnp.copy, nnx.state(src)))

    def __call__(self, xu: jax.Array, xg: jax.Array, cos: jax.Array, sin: jax.Array,
                 mask_info: MaskInfo, cache: KVCache | None = None):
        """xu: [B, Lu, D], xg: [B, Lg, D] embeddings -> final-normed (hU [B, Lu, D], hG [B, Lg, D]).

        With a decoding `cache` the tokens are appended to it and attend to everything cached;
        returns (hU, hG, updated cache) then (see `decode`).
        """
        xu, xg = freeze(xu, self.freeze_und), freeze(xg, self.freeze_recon)
        if cache is not None:
            return self.decode(xu, xg, cos, sin, mask_info, cache)
        graphdef, state = nnx.split(self.layers)

        def run_layer(carry, layer_state, layer_idx):
            return nnx.merge(graphdef, layer_state)(*carry, cos, sin, mask_info, layer_idx=layer_idx)

        carry = (xu, xg)
        if self.scan_layers:
            step = self._remat(run_layer, in_scan=True)
            layer_ids = jnp.arange(self.num_layers, dtype=jnp.int32)
            carry, _ = jax.lax.scan(lambda c, xs: (step(c, *xs), None), carry, (state, layer_ids))
        else:
            for i in range(self.num_layers):
                layer_state = jax.tree.map(lambda a: a[i], state)
                carry = self._remat(functools.partial(run_layer, layer_idx=i), in_scan=False)(carry, layer_state)
        xu, xg = carry
        return freeze(self.norm(xu), self.freeze_und), freeze(self.norm_moe_geo(xg), self.freeze_recon)

    def decode(self, xu: jax.Array, xg: jax.Array, cos: jax.Array, sin: jax.Array, mask_info: MaskInfo,
               cache: KVCache) -> tuple[jax.Array, jax.Array, KVCache]:
        """The layers over new tokens with a KV cache (inference only: no remat, always a scan).

        The new tokens' metadata and k/v go into slots [cache.length, cache.length + Lu + Lg).
        """
        graphdef, state = nnx.split(self.layers)
        key_info = cache.info_with(mask_info)

        def body(carry, xs):
            layer_state, layer_idx, ck, cv = xs
            layer = nnx.merge(graphdef, layer_state)
            xu, xg, (ck, cv) = layer(*carry, cos, sin, mask_info, layer_idx=layer_idx,
                                     kv=(ck, cv, key_info, cache.length))
            return (xu, xg), (ck, cv)

        layer_ids = jnp.arange(self.num_layers, dtype=jnp.int32)
        (xu, xg), (ks, vs) = jax.lax.scan(body, (xu, xg), (state, layer_ids, cache.k, cache.v))
        new_cache = KVCache(k=ks, v=vs, info=key_info, length=cache.length + xu.shape[1] + xg.shape[1])
        return self.norm(xu), self.norm_moe_geo(xg), new_cache

    def _remat(self, fn, *, in_scan: bool):
        if self.remat_policy == "none":
            return fn
        # Inside scan the loop boundary already keeps XLA from CSE-ing the recomputation away.
        return jax.checkpoint(fn, policy=_REMAT_POLICIES[self.remat_policy], prevent_cse=not in_scan)


def official_layer_params() -> list[tuple[tuple[str, ...], str, bool]]:
    """(our path inside one MoTLayer, official name after `layers.{i}.`, transposed?) for every parameter."""
    table = []
    for sfx in EXPERTS:
        for p in ("q", "k", "v"):
            table.append((("self_attn", f"{p}_proj{sfx}", "kernel"), f"self_attn.{p}_proj{sfx}.weight", True))
            table.append((("self_attn", f"{p}_proj{sfx}", "bias"), f"self_attn.{p}_proj{sfx}.bias", False))
        table.append((("self_attn", f"o_proj{sfx}", "kernel"), f"self_attn.o_proj{sfx}.weight", True))
        for p in ("q", "k"):
            table.append((("self_attn", f"{p}_norm{sfx}", "weight"), f"self_attn.{p}_norm{sfx}.weight", False))
        for p in ("gate", "up", "down"):
            table.append(((f"mlp{sfx}", f"{p}_proj", "kernel"), f"mlp{sfx}.{p}_proj.weight", True))
        for n in ("input_layernorm", "post_attention_layernorm"):
            table.append(((f"{n}{sfx}", "weight"), f"{n}{sfx}.weight", False))
    table += [(("ls1", "gamma"), "ls1.gamma", False), (("ls2", "gamma"), "ls2.gamma", False)]
    return table
