"""Device mesh, logical-axis rules, and helpers that create sharded state and shard activations.

Mesh axes are ('data', 'fsdp', 'tensor'). Every parameter carries *logical* axis names in its
Variable metadata under the key `logical_axes` (see `logical`); a preset's rules table maps those
names to mesh axes. Logical names used by the model:

    vocab      token vocabulary (embedding rows, lm_head columns)
    embed      backbone width D
    heads      query projection width Hq * Dh (o_proj input)
    kv_heads   key/value projection width Hkv * Dh
    mlp        SwiGLU hidden width
    layers     the stacked-layer axis of the scanned decoder
    norm       norm / LayerScale vectors (never sharded)
    enc_embed, enc_heads, enc_mlp   the encoders' width, attention width, MLP width
  activations (used by `constrain`):
    batch, length, and the parameter names above

Presets (the batch always goes over data+fsdp):

    dp        parameters replicated
    fsdp      embed / enc_embed over 'fsdp'
    fsdp_tp   embed / enc_embed over 'fsdp'; heads, kv_heads, mlp, vocab, enc_heads, enc_mlp over 'tensor'

Rule resolution follows Flax's logical partitioning: a logical name may have several rules, the first
one whose mesh axes are still unused by earlier dimensions of the same array wins, otherwise the
dimension is replicated. So the activation names ('batch', 'length', 'embed') under `fsdp` give
P(('data', 'fsdp'), None, None): 'embed' would reuse 'fsdp' and falls back to replication.
A parameter dimension that its mesh axes do not divide is replicated (logged) instead of failing.

Activation rules are bound to the jitted program, not to the caller: `jit_sharded(fn, mesh,
preset)` is `jax.jit(fn)` whose tracing always happens under the preset's rules on that mesh, so
the program that runs is the program that was lowered, whoever calls or lowers it (the trainer,
the evaluators, generation, the AOT tool). Inside it, `constrain` places activations and
`bound_mesh()` gives shard_map kernels (model/kernels/tpu_flash.py) their mesh. Outside any such
program `constrain` is a no-op (one device, plain jit).

Typical use:

    mesh = make_mesh(cfg.mesh)
    model = create_sharded_model(lambda: G2VLM(cfg.model, rngs=nnx.Rngs(0)), mesh, cfg.mesh.preset)
    step = jit_sharded(train_step, mesh, cfg.mesh.preset)
    loss = step(model, shard_batch(batch, mesh))
"""
from __future__ import annotations

import contextlib
import functools
import logging
import math
import threading
from typing import Any, Callable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from g2vlm_jax.config import MeshConfig

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
LOGICAL_AXES_KEY = "logical_axes"  # Variable metadata key holding a parameter's logical names
BATCH_AXES = ("data", "fsdp")

LogicalRules = tuple[tuple[str, Any], ...]

PARAM_NAMES = ("vocab", "embed", "heads", "kv_heads", "mlp", "layers", "norm", "enc_embed", "enc_heads", "enc_mlp")
ACTIVATION_NAMES = ("batch", "length")
KNOWN_NAMES = frozenset(PARAM_NAMES + ACTIVATION_NAMES)

_BATCH_RULE = (("batch", BATCH_AXES),)
RULES: dict[str, LogicalRules] = {
    "dp": _BATCH_RULE,
    "fsdp": _BATCH_RULE + (("embed", "fsdp"), ("enc_embed", "fsdp")),
    "fsdp_tp": _BATCH_RULE + (
        ("embed", "fsdp"), ("enc_embed", "fsdp"),
        ("heads", "tensor"), ("kv_heads", "tensor"), ("mlp", "tensor"), ("vocab", "tensor"),
        ("enc_heads", "tensor"), ("enc_mlp", "tensor"),
    ),
}


def logical(*names: str | None) -> dict[str, tuple[str | None, ...]]:
    """Variable metadata that tags a parameter with logical axis names, one per dimension.

    Use as `nnx.Param(value, **logical('embed', 'mlp'))` or
    `nnx.Linear(..., kernel_metadata=logical('embed', 'mlp'))`.
    """
    unknown = [n for n in names if n is not None and n not in KNOWN_NAMES]
    if unknown:
        raise ValueError(f"unknown logical axis names {unknown}; known names are {sorted(KNOWN_NAMES)}")
    return {LOGICAL_AXES_KEY: tuple(names)}


def rules_for(preset: str) -> LogicalRules:
    if preset not in RULES:
        raise ValueError(f"sharding preset {preset!r} is unknown; allowed values are {sorted(RULES)}")
    return RULES[preset]


# --------------------------------------------------------------------------------------------------
# Mesh
# --------------------------------------------------------------------------------------------------
def mesh_shape(cfg: MeshConfig, num_devices: int) -> tuple[int, int, int]:
    """Resolves the -1 entry of (data, fsdp, tensor) against `num_devices`; errors name the fix."""
    sizes = [cfg.data, cfg.fsdp, cfg.tensor]
    fixed = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if num_devices % fixed:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))}: the fixed axes (product {fixed}) do not divide "
                             f"the {num_devices} devices; pick sizes whose product divides {num_devices}")
        sizes[sizes.index(-1)] = num_devices // fixed
    if math.prod(sizes) != num_devices:
        raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                         f"{num_devices} are available; set one axis to -1 or make the product {num_devices}")
    return tuple(sizes)


def make_mesh(cfg: MeshConfig, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ('data', 'fsdp', 'tensor') mesh with Auto axis types (sharding propagated by XLA)."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(cfg, len(devices))
    # Auto, not Explicit: explicit axes would make every op's output sharding part of its type.
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


# --------------------------------------------------------------------------------------------------
# Logical names -> PartitionSpec
# --------------------------------------------------------------------------------------------------
def logical_to_spec(names: Sequence[str | None], rules: LogicalRules) -> P:
    """Maps logical axis names (one per dimension) to a PartitionSpec under `rules`."""
    used: set[str] = set()
    out = []
    for name in names:
        if name is not None and name not in KNOWN_NAMES:
            raise ValueError(f"unknown logical axis name {name!r}; known names are {sorted(KNOWN_NAMES)}")
        chosen = None
        for rule_name, axes in rules:
            if rule_name != name:
                continue
            axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
            if not used.intersection(axes_t):
                chosen = axes
                used.update(axes_t)
                break
        out.append(chosen)
    return P(*out)


def axis_size(mesh: Mesh, axes) -> int:
    """Number of devices along one mesh axis name or a tuple of them (None -> 1)."""
    if axes is None:
        return 1
    axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes_t)


def fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, what: str = "") -> P:
    """Replicates every dimension of `spec` that its mesh axes do not divide (logged when `what`)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is not None and dim % axis_size(mesh, axes):
            if what:
                log.info("sharding: %s dim of size %d is not divisible by mesh axes %s (size %d); replicated",
                         what, dim, axes, axis_size(mesh, axes))
            axes = None
        out.append(axes)
    return P(*out)


def _logical_names(var: nnx.Variable) -> tuple | None:
    meta = var.get_metadata()
    names = meta.get(LOGICAL_AXES_KEY)
    if names is None and meta.get("out_sharding"):
        names = tuple(meta["out_sharding"])  # Flax's own annotation key, accepted as logical names
    return names


def variable_sharding(var: nnx.Variable, mesh: Mesh, rules: LogicalRules, where: str = "") -> NamedSharding:
    """NamedSharding of one Variable from its logical names; no names -> replicated."""
    shape = var.get_value().shape
    names = _logical_names(var)
    if names is None:
        return NamedSharding(mesh, P())
    if len(names) != len(shape):
        raise ValueError(f"parameter {where}: logical names {names} do not match its rank {len(shape)} (shape {shape})")
    return NamedSharding(mesh, fit_spec(logical_to_spec(names, rules), shape, mesh, what=where or str(names)))


def tree_shardings(tree: Any, mesh: Mesh, preset: str) -> Any:
    """A NamedSharding for every leaf of any pytree holding nnx Variables (model state, train state).

    Variables (parameters, and optimiser moments, which keep their parameter's metadata) are
    sharded by their logical names; every other leaf (step counters, scalars) is replicated.
    Variables come back as `var.replace(sharding)`, so the result has the structure `jit` expects
    for `out_shardings` / `in_shardings` of that tree.
    """
    rules = rules_for(preset)

    def one(path, x):
        if isinstance(x, nnx.Variable):
            return x.replace(variable_sharding(x, mesh, rules, where=jax.tree_util.keystr(path)))
        return NamedSharding(mesh, P())

    return jax.tree_util.tree_map_with_path(one, tree, is_leaf=lambda x: isinstance(x, nnx.Variable))


def param_shardings(abstract_state: nnx.State, mesh: Mesh, preset: str) -> nnx.State:
    """NamedSharding for every Variable of an (abstract) model state; see `tree_shardings`."""
    return tree_shardings(abstract_state, mesh, preset)


def create_sharded_model(model_ctor: Callable[[], nnx.Module], mesh: Mesh, preset: str) -> nnx.Module:
    """Builds `model_ctor()` with every parameter created directly in its sharded layout.

    eval_shape gives the abstract state; the rules give its shardings; a jitted constructor with
    those `out_shardings` materialises each shard on its device (no host ever holds the full model).
    """
    abstract = nnx.eval_shape(model_ctor)
    graphdef, abstract_state = nnx.split(abstract)
    shardings = param_shardings(abstract_state, mesh, preset)
    state = jax.jit(lambda: nnx.split(model_ctor())[1], out_shardings=shardings)()
    return nnx.merge(graphdef, state)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of every PackedBatch field: the leading batch dimension over ('data', 'fsdp')."""
    return NamedSharding(mesh, P(BATCH_AXES))


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Places a host batch (any pytree of [B, ...] arrays) on the mesh, B over data x fsdp."""
    n = axis_size(mesh, BATCH_AXES)
    for leaf in jax.tree.leaves(batch):
        if np.shape(leaf)[0] % n:
            raise ValueError(f"batch dimension {np.shape(leaf)[0]} is not divisible by data x fsdp = {n}; "
                             "make data.packs_per_step a multiple of the data-parallel size")
    return jax.device_put(batch, batch_sharding(mesh))


# --------------------------------------------------------------------------------------------------
# Activation constraints
# --------------------------------------------------------------------------------------------------
class _BoundRules(threading.local):
    """The (mesh, rules) of the jitted programs being traced on this thread, innermost last."""

    def __init__(self):
        self.stack: list[tuple[Mesh, LogicalRules]] = []


_BOUND = _BoundRules()


@contextlib.contextmanager
def _tracing_under(mesh: Mesh, preset: str):
    _BOUND.stack.append((mesh, rules_for(preset)))
    try:
        yield
    finally:
        _BOUND.stack.pop()


def jit_sharded(fn: Callable, mesh: Mesh, preset: str, **jit_kwargs) -> Callable:
    """`jax.jit(fn, **jit_kwargs)` traced under `preset`'s activation rules on `mesh`.

    The rules are part of the program: every call and every `.lower(...)` traces `fn` with them,
    wherever that happens. `jit_kwargs` are jax.jit's (in/out_shardings, donate_argnums,
    static_argnames, ...).
    """
    rules_for(preset)  # an unknown preset fails here, not at the first trace

    @functools.wraps(fn)
    def traced(*args, **kwargs):
        with _tracing_under(mesh, preset):
            return fn(*args, **kwargs)

    # The program's name (jit_<name> in HLO, profiles, dumps): a partial's function's name.
    traced.__name__ = getattr(fn, "__name__", None) or getattr(getattr(fn, "func", None), "__name__", "program")
    return jax.jit(traced, **jit_kwargs)


def mesh_of(tree: Any) -> Mesh:
    """The mesh that the (sharded) arrays of `tree` live on, e.g. a train state's.

    Arrays on one device (a model loaded for inference) give a 1-device mesh of that device.
    """
    sharding = jax.tree.leaves(tree)[0].sharding
    if isinstance(sharding, NamedSharding):
        return sharding.mesh
    (device,) = sharding.device_set
    return Mesh(np.array([device]).reshape((1,) * len(MESH_AXES)), MESH_AXES,
                axis_types=(AxisType.Auto,) * len(MESH_AXES))


def bound_mesh() -> Mesh | None:
    """The mesh of the `jit_sharded` program being traced, or None outside one."""
    return _BOUND.stack[-1][0] if _BOUND.stack else None


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint of an activation by logical names; a no-op outside a `jit_sharded` program."""
    if not _BOUND.stack:
        return x
    mesh, rules = _BOUND.stack[-1]
    if len(names) != x.ndim:
        raise ValueError(f"constrain: {len(names)} names {tuple(names)} for an array of rank {x.ndim}")
    spec = fit_spec(logical_to_spec(names, rules), x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))
