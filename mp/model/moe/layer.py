"""The mixture-of-experts layer that replaces a transformer layer's MLP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.model.config import TransformerConfig
from mp.model.mlp import MLP
from mp.model.moe.dispatcher import TokenDispatcher
from mp.model.moe.experts import Experts
from mp.model.moe.router import TopKRouter
from mp.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
)


class MoELayer(nn.Module):
    """``hidden [s, b, h]`` (``[s / t, b, h]`` with sequence parallelism) ->
    ``(output, None)`` of the same shape, as `mp.model.mlp.MLP` returns.

    Each token goes to the ``moe_router_topk`` experts its router picks (`TopKRouter`), and
    its output is their outputs weighted by the router's probabilities. Tensor parallelism
    works as in the MLP: every TP rank routes every token of the sequence (all-gathered first
    under sequence parallelism) the same way and runs its ``1 / t`` of each expert, and the
    partial outputs are summed over TP (reduce-scattered back to ``[s / t, b, h]`` under
    sequence parallelism, which Megatron requires with MoE and mp does not). The
    experts are split over the expert-parallel group (``expert_group``, default
    `parallel_state`'s; `TokenDispatcher` moves the tokens). Under context parallelism each
    rank routes its own tokens; the routers' auxiliary losses count the whole sequences
    (``context_group``, default `parallel_state`'s when ``context_parallel_size > 1``).
    With ``moe_shared_expert_intermediate_size`` a dense `MLP` of that width (``shared_experts``,
    Megatron's name) takes every token too and its output is added.
    """

    def __init__(self, config: TransformerConfig, group=None, expert_group=None,
                 context_group=None):
        super().__init__()
        self.config = config
        self.group = parallel_state.get_tensor_model_parallel_group() if group is None \
            else group
        if expert_group is None:
            expert_group = parallel_state.get_expert_model_parallel_group()
        ep = 1 if expert_group is None else dist.get_world_size(expert_group)
        if ep != config.expert_model_parallel_size:
            raise ValueError(f"the expert-parallel group has {ep} ranks but "
                             f"expert_model_parallel_size={config.expert_model_parallel_size}")
        ep_rank = 0 if expert_group is None else dist.get_rank(expert_group)
        self.tp = dist.get_world_size(self.group)
        if context_group is None and config.context_parallel_size > 1:
            context_group = parallel_state.get_context_parallel_group()
        cp = 1 if context_group is None else dist.get_world_size(context_group)
        self.router = TopKRouter(config, aux_loss_weight=cp / self.tp, context_group=context_group)
        self.experts = Experts(config, self.group, ep_rank, ep)
        self.dispatcher = TokenDispatcher(config.num_moe_experts, expert_group)
        shared = config.moe_shared_expert_intermediate_size
        self.shared_experts = None if shared is None else MLP(config, self.group, shared)

    def forward(self, hidden: torch.Tensor):
        shared = None
        if self.shared_experts is not None:
            shared, bias = self.shared_experts(hidden)
            shared = shared if bias is None else shared + bias
        sequence_parallel = self.config.sequence_parallel
        if self.tp > 1:
            enter = gather_from_sequence_parallel_region if sequence_parallel \
                else copy_to_tensor_model_parallel_region
            hidden = enter(hidden, group=self.group)
        tokens = hidden.reshape(-1, hidden.size(-1))
        probs, chosen = self.router(tokens)
        rows, counts, routing = self.dispatcher.dispatch(tokens, chosen)
        output = self.dispatcher.combine(self.experts(rows, counts), probs, routing)
        output = output.view_as(hidden)
        if self.tp > 1:
            leave = reduce_scatter_to_sequence_parallel_region if sequence_parallel \
                else reduce_from_tensor_model_parallel_region
            output = leave(output, group=self.group)
        return (output if shared is None else output + shared), None
