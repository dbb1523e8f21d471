"""Shared pieces of the G2VLM-2B experiments (SPEC §3): hardware presets and the base config."""
from g2vlm_jax import config as c

from experiments import _tpu_meshes

# Mesh presets per target (SPEC §3 / DESIGN §3). 2B parameters + fp32 Adam state = ~73 GB, so
# parameters and optimizer state are sharded over 'fsdp' inside a slice and replicated over 'data'.
HARDWARE = {
    "": c.MeshConfig(preset="fsdp", data=1, fsdp=-1, tensor=1),  # whatever devices are present
    "v5p": c.MeshConfig(preset="fsdp", data=1, fsdp=-1, tensor=1),  # v5p slice: pure FSDP over the slice
    "v5e": c.MeshConfig(preset="fsdp", data=1, fsdp=-1, tensor=1),  # v5e: 16 GB HBM -> FSDP over the slice
    "h100x8": c.MeshConfig(preset="fsdp", data=-1, fsdp=8, tensor=1),  # 8xH100 nodes: FSDP within a node
}


def mesh_for(arg: str) -> c.MeshConfig:
    """A HARDWARE preset name, or a TPU slice topology such as 'v5p:4x4x8' (experiments/_tpu_meshes.py)."""
    if arg in HARDWARE:
        return HARDWARE[arg]
    if ":" in arg:
        return _tpu_meshes.mesh_for_topology(arg)
    raise c.ConfigError(f"unknown hardware arg {arg!r}; allowed values are {sorted(HARDWARE)} or a TPU topology "
                        "GEN:AxB[xC] (e.g. v5p:4x4x8)")


def model_2b(**overrides) -> c.ModelConfig:
    return c.g2vlm_2b_model(compute_dtype="bfloat16", param_dtype="float32", remat_policy="full", **overrides)
