"""The top-k router of a mixture-of-experts layer."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mp.device import get_device
from mp.model.config import TransformerConfig
from mp.model.init import init_method
from mp.model.moe.aux_loss import (
    at_least_fp32,
    attach_aux_loss,
    load_balancing_loss,
    track,
    z_loss,
)
from mp.tensor_parallel import reduce_from_tensor_model_parallel_region


_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


class TopKRouter(nn.Module):
    """``tokens [N, h] -> (probs [N, k] fp32, experts [N, k] int64)``.

    Logits ``tokens W^T`` with ``W [E, h]`` (the product in ``moe_router_dtype`` when set, the
    rest in fp32, or the tokens' dtype if wider), then
    either the top ``k`` logits and a softmax over them (the default: each token's ``k``
    weights sum to 1, as Mixtral's) or, with
    ``moe_router_pre_softmax``, a softmax over every expert and its top ``k``. While training,
    the load-balancing and z losses (`mp.model.moe.aux_loss`) are attached to ``probs``.

    ``W`` is replicated on every rank. Under tensor parallelism each TP rank routes every
    token of the sequence (gathered first under SP) but sees only its share of the experts'
    outputs, so ``W``'s gradient is partial there and is summed over TP like a
    sequence-parallel weight's (``W.sequence_parallel``); the auxiliary losses, the same on
    every TP rank, backpropagate ``1 / TP`` of their gradient from each. Under context
    parallelism (``context_group``) the losses' token statistics are summed over the CP ranks
    (an all-reduce whose backward passes each rank its own part), and each rank
    backpropagates ``CP x`` its part, as with the language-model loss (the gradients are
    averaged over DP x CP). Hence ``aux_loss_weight = CP / TP``.
    """

    def __init__(self, config: TransformerConfig, aux_loss_weight: float = 1.0,
                 context_group=None):
        super().__init__()
        self.config = config
        self.topk = config.moe_router_topk
        self.aux_loss_weight = aux_loss_weight
        self.context_group = context_group
        self.cp = 1 if context_group is None else dist.get_world_size(context_group)
        full = torch.empty(config.num_moe_experts, config.hidden_size, dtype=torch.float32,
                           device=get_device())
        init_method(config)(full)
        self.weight = nn.Parameter(full.to(config.params_dtype))
        self.weight.sequence_parallel = True

    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        dtype = _ROUTER_DTYPES.get(cfg.moe_router_dtype)
        if dtype is None:
            logits = at_least_fp32(F.linear(tokens, self.weight))  # [N, E]
        else:
            logits = F.linear(tokens.to(dtype), self.weight.to(dtype))
        scores = torch.softmax(logits, dim=-1) if cfg.moe_router_pre_softmax else None
        if scores is not None:
            probs, experts = torch.topk(scores, self.topk, dim=-1)
        else:
            top, experts = torch.topk(logits, self.topk, dim=-1)
            probs = torch.softmax(top, dim=-1)
        if self.training and torch.is_grad_enabled():
            probs = self._attach_losses(probs, logits, scores, experts)
        return probs, experts

    def _attach_losses(self, probs, logits, scores, experts):
        cfg = self.config
        num_tokens = logits.size(0) * self.cp  # the whole sequences'
        if cfg.moe_router_load_balancing_type == "aux_loss" and cfg.moe_aux_loss_coeff > 0:
            scores = torch.softmax(logits, dim=-1) if scores is None else scores
            counts = torch.bincount(experts.flatten(), minlength=cfg.num_moe_experts)
            sums = self._over_context(scores.sum(0), counts)
            loss = load_balancing_loss(sums, counts, num_tokens, self.topk,
                                       cfg.moe_aux_loss_coeff)
            track("load_balancing_loss", loss / cfg.moe_aux_loss_coeff)
            probs = attach_aux_loss(probs, loss, self.aux_loss_weight)
        if cfg.moe_z_loss_coeff:
            square_sum = torch.logsumexp(logits, dim=-1).square().sum()
            loss = z_loss(self._over_context(square_sum), num_tokens, cfg.moe_z_loss_coeff)
            track("z_loss", loss / cfg.moe_z_loss_coeff)
            probs = attach_aux_loss(probs, loss, self.aux_loss_weight)
        return probs

    def _over_context(self, sums: torch.Tensor, counts: torch.Tensor | None = None):
        """``sums`` added up over the context-parallel ranks (backward: each rank's own
        part), and ``counts`` in place (no gradient)."""
        if self.context_group is None:
            return sums
        if counts is not None:
            dist.all_reduce(counts, group=self.context_group)
        return reduce_from_tensor_model_parallel_region(sums, group=self.context_group)
