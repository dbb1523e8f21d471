"""The mesh of the G2VLM-2B experiments per TPU generation and slice size.

Slices are named by topology, `GEN:AxB[xC]` (g2vlm_jax/chips.py, which also holds each chip's HBM
and peak FLOP/s). The mesh table was chosen with `g2vlm aot` (the compiled per-chip peak against the
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

from g2vlm_jax import config as c
from g2vlm_jax.chips import num_chips, parse_topology  # noqa: F401 (re-exported for the experiments)


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
