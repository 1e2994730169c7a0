"""GPU types: peak rate, memory, and the links between them.

Figures are the vendors' data-sheet numbers for the SXM parts: dense (not 2:4 sparse) 16-bit
tensor-core rates, HBM bandwidth, NVLink bandwidth per GPU per direction inside a node, and
one InfiniBand NIC per GPU across nodes (400 Gb/s, 50 GB/s per direction, with Hopper; 200
Gb/s with A100). Memory is what the device reports as its total (the "80 GB" H100 shows 79.6
GiB, the "141 GB" H200 140.4 GiB). Every figure can be overridden (`gpu_spec`'s keyword
arguments, the ``tools/estimate.py`` flags), and should be for a cluster that differs.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

GB = 1e9
GiB = 2**30


@dataclass(frozen=True)
class GPUSpec:
    """One GPU type and the links a job on it sees.

    Args:
        name: the key in `GPUS`.
        peak_tflops: dense 16-bit tensor-core peak, TFLOP/s.
        memory_gib: HBM per GPU as the device reports it, GiB.
        hbm_gbps: HBM bandwidth, GB/s (the optimizer step is bound by it).
        intra_node_gbps: per-GPU bandwidth to a GPU of the same node, GB/s per direction.
        inter_node_gbps: per-GPU bandwidth to a GPU of another node, GB/s per direction.
        gpus_per_node: GPUs that share the intra-node links.
    """

    name: str
    peak_tflops: float
    memory_gib: float
    hbm_gbps: float
    intra_node_gbps: float
    inter_node_gbps: float
    gpus_per_node: int = 8

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name != "name" and not value > 0:
                raise ValueError(f"{f.name}={value!r} must be > 0 (GPU {self.name!r})")
        if not isinstance(self.gpus_per_node, int):
            raise ValueError(f"gpus_per_node={self.gpus_per_node!r} must be an integer")

    @property
    def memory_bytes(self) -> float:
        return self.memory_gib * GiB


#: The built-in GPU types (``--gpu NAME``).
GPUS: dict[str, GPUSpec] = {gpu.name: gpu for gpu in (
    GPUSpec("h100", peak_tflops=989.0, memory_gib=79.6, hbm_gbps=3350.0,
            intra_node_gbps=450.0, inter_node_gbps=50.0),
    GPUSpec("h200", peak_tflops=989.0, memory_gib=140.4, hbm_gbps=4800.0,
            intra_node_gbps=450.0, inter_node_gbps=50.0),
    GPUSpec("a100", peak_tflops=312.0, memory_gib=79.3, hbm_gbps=2039.0,
            intra_node_gbps=300.0, inter_node_gbps=25.0),
    GPUSpec("a100-40gb", peak_tflops=312.0, memory_gib=39.4, hbm_gbps=1555.0,
            intra_node_gbps=300.0, inter_node_gbps=25.0),
)}


def gpu_spec(name: str, **overrides) -> GPUSpec:
    """The built-in GPU ``name`` with any field replaced, e.g.
    ``gpu_spec("h100", inter_node_gbps=100.0)`` for two NICs per GPU."""
    if name not in GPUS:
        raise ValueError(f"gpu={name!r} must be one of {', '.join(map(repr, GPUS))}")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(GPUSpec)}
    if unknown:
        raise ValueError(f"unknown GPU field(s) {', '.join(sorted(unknown))}")
    return dataclasses.replace(GPUS[name], **{k: v for k, v in overrides.items()
                                              if v is not None})
