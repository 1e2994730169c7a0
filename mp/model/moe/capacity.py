"""Expert capacity: the most routed copies an expert takes from one rank, the rest dropped
(Megatron's ``--moe-expert-capacity-factor``, GShard's and Switch's capacity factor).

A rank routing ``N`` tokens to ``k`` of ``E`` experts gives each expert room for
``ceil(N k / E x factor)`` of them (`expert_capacity`): ``factor`` times its share under
balanced routing. Which copies an over-full expert keeps (`within_capacity`) follows the drop
policy: ``probs`` keeps those with the highest router probabilities (ties to the earlier
token), ``position`` the earliest tokens. A dropped copy adds nothing to its token's output;
a token whose copies all drop leaves the layer with the shared expert's output alone, or zero
(the residual carries it on). The counts are the rank's own, as in Megatron: with sequence or
context parallelism a rank's capacity covers its part of the sequences.
"""

from __future__ import annotations

import math

import torch

DROP_POLICIES = ("probs", "position")


def expert_capacity(num_tokens: int, topk: int, num_experts: int, factor: float) -> int:
    """Routed copies one expert takes from ``num_tokens`` tokens' ``topk`` choices each."""
    return math.ceil(num_tokens * topk / num_experts * factor)


def within_capacity(probs: torch.Tensor, experts: torch.Tensor, num_experts: int,
                    capacity: int, policy: str = "probs") -> torch.Tensor:
    """``probs [N, k]``, ``experts [N, k]`` -> ``[N, k]`` bool: the copies their experts keep,
    at most ``capacity`` an expert, chosen by ``policy`` (module doc)."""
    if policy not in DROP_POLICIES:
        raise ValueError(f"policy={policy!r} must be one of {', '.join(DROP_POLICIES)}")
    flat = experts.flatten()
    pairs = flat.numel()
    if policy == "probs":  # highest first; a stable sort keeps ties in token order
        ranked = torch.argsort(probs.detach().flatten(), descending=True, stable=True)
    else:  # the copies are in token order already
        ranked = torch.arange(pairs, device=flat.device)
    by_expert = ranked[torch.argsort(flat[ranked], stable=True)]
    counts = torch.bincount(flat, minlength=num_experts)
    starts = torch.cumsum(counts, 0) - counts
    place = torch.empty_like(flat)  # each copy's place in its expert's queue
    place[by_expert] = torch.arange(pairs, device=flat.device) - starts[flat[by_expert]]
    return (place < capacity).view_as(experts)
