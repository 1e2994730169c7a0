"""torch.distributed's single-tensor all-gather and reduce-scatter, under whichever name this
torch has: ``all_gather_single`` / ``reduce_scatter_single`` since torch 2.13 (where the old
``all_gather_into_tensor`` / ``reduce_scatter_tensor`` warn that they are deprecated), the old
names before. The function is looked up at each call, so wrappers installed on
``torch.distributed`` (`mp.estimate.measure.CollectiveMeter`) see every call.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_gather_single(output: torch.Tensor, input: torch.Tensor, group=None,
                      async_op: bool = False):
    """Gather every rank's ``input`` into ``output`` (their concatenation along dim 0)."""
    gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    return gather(output, input, group=group, async_op=async_op)


def reduce_scatter_single(output: torch.Tensor, input: torch.Tensor, group=None,
                          async_op: bool = False):
    """Sum ``input`` over the ranks and give this rank its slice (dim 0) in ``output``."""
    scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
    return scatter(output, input, group=group, async_op=async_op)
