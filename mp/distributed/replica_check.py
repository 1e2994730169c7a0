"""Are the data-parallel replicas still one model? (Megatron's
``--check-weight-hash-across-dp-replicas-interval``.)

Data-parallel ranks start from the same weights and apply the same averaged gradients, so
their parameters stay bitwise equal; a rank that drifts (silent data corruption, a faulty
GPU, a step one rank skipped) trains on quietly and poisons the next checkpoint.
`check_param_hashes_across_dp_replicas` hashes every parameter of this rank (SHA-256 of its
bytes) and gathers the digests over the ranks that must hold the same values: the
data-parallel group with context parallelism for the dense parameters, the
expert-data-parallel group for the experts' (``param.allreduce = False``, which differ across
expert-parallel ranks). Every rank then learns, through one all-reduce over the world,
whether any group disagreed, and all of them raise `ReplicaMismatchError` together (no rank
is left waiting in a collective); a rank whose group disagreed names the parameters and the
ranks.
"""

from __future__ import annotations

import hashlib

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.comm import all_gather_single
from mp.distributed.distributed_data_parallel import finish_param_sync

DIGEST_BYTES = 32  # SHA-256


class ReplicaMismatchError(RuntimeError):
    """Data-parallel replicas hold different parameter values."""


def param_digests(params: list[torch.Tensor]) -> torch.Tensor:
    """``[len(params), 32]`` uint8: the SHA-256 of each tensor's bytes (on the CPU)."""
    digests = [hashlib.sha256(p.detach().cpu().contiguous().view(torch.uint8).numpy()).digest()
               for p in params]
    return torch.tensor([list(d) for d in digests], dtype=torch.uint8).view(-1, DIGEST_BYTES)


def _differing(named: list[tuple[str, torch.Tensor]], group: dist.ProcessGroup) -> list[str]:
    """One line for each of ``named``'s parameters whose digest differs within ``group``,
    naming the global ranks that hold each version."""
    if not named or dist.get_world_size(group) == 1:
        return []
    mine = param_digests([p for _, p in named])
    gathered = torch.empty((dist.get_world_size(group), *mine.shape), dtype=torch.uint8)
    all_gather_single(gathered.view(-1, DIGEST_BYTES), mine, group=group)
    ranks = dist.get_process_group_ranks(group)
    lines = []
    for index, (name, _) in enumerate(named):
        versions: dict[bytes, list[int]] = {}
        for member, rank in enumerate(ranks):
            versions.setdefault(bytes(gathered[member, index].tolist()), []).append(rank)
        if len(versions) > 1:
            lines.append(f"{name}: " + " vs ".join(f"ranks {held}"
                                                   for held in versions.values()))
    return lines


def check_param_hashes_across_dp_replicas(model: list[nn.Module], iteration: int) -> None:
    """Raise `ReplicaMismatchError` on every rank when the parameters of ``model`` (this
    rank's chunks) differ from a data-parallel replica's (module doc), once the distributed
    optimizer's parameter all-gathers have landed. Collective over the world: every rank
    calls it at the same iteration."""
    finish_param_sync(model)
    named = [(f"chunk {i}: {name}" if len(model) > 1 else name, p)
             for i, chunk in enumerate(model) for name, p in chunk.named_parameters()]
    dense = [(name, p) for name, p in named if getattr(p, "allreduce", True)]
    experts = [(name, p) for name, p in named if not getattr(p, "allreduce", True)]
    lines = _differing(dense, parallel_state.get_data_parallel_group(with_context_parallel=True))
    if experts:
        lines += _differing(experts, parallel_state.get_expert_data_parallel_group())
    anywhere = torch.tensor([len(lines)], dtype=torch.int64)
    dist.all_reduce(anywhere, op=dist.ReduceOp.MAX)
    if anywhere.item() == 0:
        return
    where = ("\n  ".join(lines) if lines else
             "this rank's replicas agree; another data-parallel group's ranks name theirs")
    raise ReplicaMismatchError(
        f"iteration {iteration}: the data-parallel replicas hold different weights "
        f"(rank {dist.get_rank()}):\n  {where}")
