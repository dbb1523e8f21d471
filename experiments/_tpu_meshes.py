"""TPU slices: chip facts, and the mesh of the G2VLM-2B experiments per generation and slice size.

A slice is named by its topology as libtpu spells it, `GEN:AxB[xC]` (chips per dimension), e.g.
`v5e:16x16` (256 chips) or `v5p:4x4x8` (128 chips). Cloud accelerator types count differently:
v4/v5p types count TensorCores (v5p-256 = 128 chips = `v5p:4x4x8`), v5e/v6e types count chips
(v5litepod-256 = `v5e:16x16`).

The mesh table was chosen with `tools/aot_compile.py` (the compiled per-chip peak against the
chip's HBM; committed reports under experiments/aot/). The reasoning, per generation:

- Parameters (2.2 B, float32) and the trainable half's Adam moments are ~27-36 GB in all, so they
  are sharded over 'fsdp' (ZeRO-3): at 64+ chips they are well under 1 GB per chip.
- What decides the fit is activations: one pack per chip (25,600 / 40,960 tokens) with full
  rematerialisation keeps one layer input per decoder layer plus one layer's working set.
- Each experiment's global batch has one pack per chip of its target slice (stage 1a: 128 packs
  on 128 chips; stages 1b and 2: 256 on 256), so the batch axis (data x fsdp) is the whole slice
  and no tensor parallelism is needed: 'fsdp' spans the slice, 'data' = 1. Committed peaks:
  stage 1a 39 %, 1b 69 %, 2 33 %, 2-SR 33 % of a v5p chip's HBM.
"""
from __future__ import annotations

import math
import re

from g2vlm_jax import config as c

GIB = 1024**3
# HBM per chip (bytes) and the device-kind prefix libtpu reports for each generation.
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# v4 runs its two TensorCores as one device ("megacore"); libtpu's default topology would give two.
CHIP_CONFIG = {"v4": "megacore"}

_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """'v5p:4x4x8' -> ('v5p', (4, 4, 8)); errors name the accepted form."""
    m = _TOPOLOGY.match(name)
    if not m:
        raise c.ConfigError(f"TPU topology {name!r} is not of the form GEN:AxB[xC] with GEN in {sorted(HBM_BYTES)} "
                            "(e.g. v5e:2x2, v5p:4x4x8)")
    dims = tuple(int(d) for d in m.groups()[1:] if d is not None)
    if (m.group(1) in ("v4", "v5p")) != (len(dims) == 3):
        raise c.ConfigError(f"TPU topology {name!r}: v4/v5p slices are 3-D (AxBxC), v5e/v6e slices 2-D (AxB)")
    return m.group(1), dims


def num_chips(name: str) -> int:
    return math.prod(parse_topology(name)[1])


# Mesh of the 2B experiments per generation and chip count (see the module docstring). 'fsdp'
# spans the slice; slices too small for the global batch's activations are not listed.
_FSDP = c.MeshConfig(preset="fsdp", data=1, fsdp=-1, tensor=1)
MESHES: dict[str, dict[int, c.MeshConfig]] = {
    "v4": {n: _FSDP for n in (64, 128, 256, 512)},
    "v5e": {n: _FSDP for n in (128, 256)},
    "v5p": {n: _FSDP for n in (64, 128, 256, 512)},
    "v6e": {n: _FSDP for n in (64, 128, 256)},
}


def mesh_for_topology(name: str) -> c.MeshConfig:
    """The 2B experiments' mesh for a TPU slice, e.g. mesh_for_topology('v5p:4x4x8')."""
    gen, _ = parse_topology(name)
    chips = num_chips(name)
    if chips not in MESHES[gen]:
        raise c.ConfigError(f"no G2VLM-2B mesh for {name} ({chips} chips); {gen} slices with a mesh have "
                            f"{sorted(MESHES[gen])} chips (experiments/_tpu_meshes.py)")
    return MESHES[gen][chips]
