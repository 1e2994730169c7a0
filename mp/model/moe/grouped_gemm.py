"""The experts' matrix products as grouped GEMMs (Megatron's ``--moe-grouped-gemm``).

A rank's experts take consecutive groups of rows (``counts[l]`` for local expert ``l``); the
loop in `mp.model.moe.experts.Experts` runs two or three matrix products per expert, and this
runs one grouped product per weight kind for all of them: torch's ``grouped_mm``
(``torch.nn.functional.grouped_mm``, or ``torch._grouped_mm`` in the torch releases before it
was public), ``rows [P, in] x weight [L, out, in]ᵀ`` with ``offs`` the groups' ends.

The kernels want every group to start on a 16-byte boundary of the rows' inner (token)
dimension in backward (the weight gradient contracts over tokens), so each group is padded
with zero rows to a multiple of ``16 / itemsize`` rows (`GroupedRows`): at most 7 rows an
expert in bf16. Zero rows add nothing to a weight's gradient, and their outputs are dropped.

`usable` is the gate: torch has the operation, and the dtype and device are ones it runs
(CUDA: bf16 on compute capability 9.0 and later; CPU, where torch 2.9 and later have a
kernel: fp32 and bf16), and each row of the inputs and weights is a multiple of 16 bytes.
Otherwise the experts loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_ALIGN_BYTES = 16


def usable(rows: torch.Tensor, *weights: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM runs ``rows [M, in]`` against each of ``weights
    [L, out, in]`` (module doc)."""
    if _GROUPED_MM is None:
        return False
    if rows.device.type == "cuda":
        if rows.dtype != torch.bfloat16 or torch.cuda.get_device_capability(rows.device) < (9, 0):
            return False
    elif rows.device.type != "cpu" or rows.dtype not in (torch.float32, torch.bfloat16):
        return False
    size = rows.element_size()
    return all(w.dtype == rows.dtype and w.size(-1) * size % _ALIGN_BYTES == 0
               and w.size(-2) * size % _ALIGN_BYTES == 0 for w in weights)


class GroupedRows:
    """``counts[l]`` rows for each of ``L`` groups, laid out for grouped GEMMs: each group
    padded with zero rows to a multiple of ``16 / element_size`` rows.

    ``pad(rows [M, ...]) -> [P, ...]``; ``unpad([P, ...]) -> [M, ...]``; ``mm(x [P, in],
    weight [L, out, in]) -> [P, out]``, group ``l`` against ``weight[l]``; ``group [P]``: each
    padded row's group (for per-group biases)."""

    def __init__(self, counts: list[int], element_size: int, device: torch.device):
        align = max(1, _ALIGN_BYTES // element_size)
        sizes = torch.tensor(counts, dtype=torch.int64)
        padded = (sizes + align - 1) // align * align
        starts = torch.cumsum(padded, 0) - padded  # each group's first padded row
        first = torch.cumsum(sizes, 0) - sizes  # each group's first row
        group = torch.repeat_interleave(torch.arange(len(counts)), sizes)
        # row i of group l goes to starts[l] + (i - first[l]); a padding row reads row M, a
        # zero row appended to the rows (index_select keeps only its index for backward,
        # where index_copy would keep the rows too)
        rows = int(sizes.sum())
        positions = torch.arange(rows) - first[group] + starts[group]
        source = torch.full((int(padded.sum()),), rows, dtype=torch.int64)
        source[positions] = torch.arange(rows)
        self.positions, self.source = positions.to(device), source.to(device)
        self.offs = torch.cumsum(padded, 0).to(device=device, dtype=torch.int32)
        self.group = torch.repeat_interleave(torch.arange(len(counts)), padded).to(device)

    def pad(self, rows: torch.Tensor) -> torch.Tensor:
        zero = rows.new_zeros((1, *rows.shape[1:]))
        return torch.cat((rows, zero)).index_select(0, self.source)

    def unpad(self, rows: torch.Tensor) -> torch.Tensor:
        return rows.index_select(0, self.positions)

    def mm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _GROUPED_MM(x, weight.transpose(-2, -1), offs=self.offs)
