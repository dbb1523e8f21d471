"""Per-chip facts: HBM bytes and dense bf16 peak FLOP/s per accelerator, and TPU slice names.

One table, read by the AOT reports (per-chip peak memory against HBM, the MFU bound;
g2vlm_jax/aot.py) and by the training logs' MFU (g2vlm_jax/flops.py).

A TPU slice is named by its topology as libtpu spells it, `GEN:AxB[xC]` (chips per dimension), e.g.
`v5e:16x16` (256 chips) or `v5p:4x4x8` (128 chips). Cloud accelerator types count differently:
v4/v5p types count TensorCores (v5p-256 = 128 chips = `v5p:4x4x8`), v5e/v6e types count chips
(v5litepod-256 = `v5e:16x16`).
"""
from __future__ import annotations

import dataclasses
import math
import re

from g2vlm_jax.config import ConfigError

GIB = 1024**3


@dataclasses.dataclass(frozen=True)
class Chip:
    """name: our short name (a TPU generation in topologies); device_kinds: lower-case substrings of
    `jax.Device.device_kind` that identify it; hbm_bytes: memory per chip (None where the part
    comes in several sizes); peak_bf16_flops: dense bf16 FLOP/s per chip (one jax device)."""

    name: str
    device_kinds: tuple[str, ...]
    hbm_bytes: int | None
    peak_bf16_flops: float


# Order matters: the first chip whose pattern occurs in a device kind wins.
CHIPS: tuple[Chip, ...] = (
    Chip("v6e", ("v6 lite", "v6e"), 32 * GIB, 918e12),  # TPU v6e (Trillium)
    Chip("v5e", ("v5 lite", "v5e"), 16 * GIB, 197e12),
    Chip("v5p", ("v5p", "tpu v5"), 95 * GIB, 459e12),  # v5p reports "TPU v5"
    Chip("v4", ("v4",), 32 * GIB, 275e12),
    Chip("h200", ("h200",), 141 * 10**9, 989e12),
    Chip("h100", ("h100",), 80 * 10**9, 989e12),  # SXM parts (H100 PCIe: 756e12)
    Chip("a100", ("a100",), None, 312e12),  # 40 or 80 GB
)
TPU_GENERATIONS = ("v4", "v5e", "v5p", "v6e")
# v4 runs its two TensorCores as one device ("megacore"); libtpu's default topology would give two.
TOPOLOGY_CHIP_CONFIG = {"v4": "megacore"}

_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+)x(\d+)(?:x(\d+))?$")


class UnknownChipError(ConfigError):
    """A device kind or topology that the chip table does not describe (a one-line error in the CLI)."""


def chip_named(name: str) -> Chip:
    for chip in CHIPS:
        if chip.name == name:
            return chip
    raise UnknownChipError(f"no chip named {name!r}; known chips are {[c.name for c in CHIPS]} (g2vlm_jax/chips.py)")


def chip_of(device_kind: str) -> Chip:
    """The chip of a `jax.Device.device_kind`, e.g. 'TPU v5' -> v5p, 'NVIDIA H100 80GB HBM3' -> h100."""
    kind = device_kind.lower()
    for chip in CHIPS:
        if any(pattern in kind for pattern in chip.device_kinds):
            return chip
    raise UnknownChipError(f"no chip facts known for device kind {device_kind!r}; add it to g2vlm_jax/chips.py "
                           "(or pass a measured peak, e.g. flops.measure_matmul_flops() on CPU)")


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """'v5p:4x4x8' -> ('v5p', (4, 4, 8)); errors name the accepted form."""
    m = _TOPOLOGY.match(name)
    if not m:
        raise UnknownChipError(f"TPU topology {name!r} is not of the form GEN:AxB[xC] with GEN in "
                               f"{list(TPU_GENERATIONS)} (e.g. v5e:2x2, v5p:4x4x8)")
    dims = tuple(int(d) for d in m.groups()[1:] if d is not None)
    if (m.group(1) in ("v4", "v5p")) != (len(dims) == 3):
        raise UnknownChipError(f"TPU topology {name!r}: v4/v5p slices are 3-D (AxBxC), v5e/v6e slices 2-D (AxB)")
    return m.group(1), dims


def num_chips(topology: str) -> int:
    return math.prod(parse_topology(topology)[1])
