"""The mixture-of-experts layer that replaces a transformer layer's MLP."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.model.config import TransformerConfig
from mp.model.mlp import checkpointed
from mp.model.moe.dispatcher import TokenDispatcher
from mp.model.moe.experts import Experts
from mp.model.moe.router import TopKRouter
from mp.model.moe.shared_experts import SharedExperts
from mp.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
)


class MoELayer(nn.Module):
    """``hidden [s, b, h]`` (``[s / t, b, h]`` with sequence parallelism) ->
    ``(output, None)`` of the same shape, as `mp.model.mlp.MLP` returns.

    Each token goes to the ``moe_router_topk`` experts its router picks (`TopKRouter`), and
    its output is their outputs weighted by the router's probabilities. Each rank of the
    expert TP group (``expert_tensor_group``: the TP group, or with
    ``expert_tensor_parallel_size=1`` none, each expert whole) holds ``1 / t`` of every
    expert. Under sequence parallelism (Megatron's way, which it requires with MoE) each TP
    rank routes its own ``s / t`` tokens, trades them over EP, and the TP ranks then gather
    each other's rows for their shards of the experts and sum the partial outputs back onto
    the rows' owners (`TokenDispatcher`): no all-gather of the hidden states, and each
    routed copy crosses the EP links once. Without it every TP rank routes every token the
    same way and the partial outputs are all-reduced over TP, as in the MLP. With whole
    experts the TP ranks are expert-parallel ranks too (Megatron's parallel folding,
    `mp.parallel_state`): the rows cross the larger EP group only, with no gather nor sum
    over TP. The experts are split over the expert-parallel group (``expert_group``, default
    `parallel_state`'s). Under context parallelism each rank routes its own tokens; the
    routers' auxiliary losses count the whole sequences, summing their statistics over the
    ranks that hold the rest (CP, ``context_group``, default `parallel_state`'s when
    ``context_parallel_size > 1``; and TP under sequence parallelism), and the global
    load-balancing loss every data-parallel rank's micro-batch (DP x CP, ``data_group``,
    default `parallel_state`'s).
    With ``moe_shared_expert_intermediate_size`` a dense MLP of that width (`SharedExperts`,
    ``shared_experts``, Megatron's name; gated with ``moe_shared_expert_gate``) takes every
    token too and its output is added; ``shared_experts`` among the recompute modules
    checkpoints it. With ``moe_apply_probs_on_input`` (top-1 routing) each token is
    multiplied by its probability (in fp32, then cast back) before it leaves for its expert,
    whose output then comes back unweighted (Llama 4's layer, Megatron's
    ``--moe-apply-probs-on-input``, which scales the same rows after the exchange).
    """

    def __init__(self, config: TransformerConfig, group=None, expert_group=None,
                 context_group=None, data_group=None, layer_index: int | None = None):
        """``layer_index``: the layer's 0-based index in the model (multi-token prediction's
        after the decoder's), under which ``moe_per_layer_logging`` tracks its losses."""
        super().__init__()
        self.config = config
        if group is None and expert_group is None:  # parallel_state's: made at the same ETP
            etp = parallel_state.get_expert_tensor_parallel_world_size()
            if etp != (config.expert_tensor_parallel_size
                       or parallel_state.get_tensor_model_parallel_world_size()):
                raise ValueError(f"the expert groups were made with expert_tensor_parallel_size="
                                 f"{etp} but the config has "
                                 f"{config.expert_tensor_parallel_size} (None: TP)")
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
        # the tokens split over TP (each rank routes its own) or replicated there
        self.split = config.sequence_parallel and self.tp > 1
        # the ranks that split each expert: TP, or none (ETP=1: whole experts)
        self.expert_tensor_group = (None if config.expert_tensor_parallel_size == 1
                                    else self.group)
        tensor_group = self.group if self.split else None
        if data_group is None and config.moe_router_load_balancing_type == "global_aux_loss":
            data_group = parallel_state.get_data_parallel_group(with_context_parallel=True)
        self.router = TopKRouter(config, context_group, tensor_group,
                                 replicas=1 if self.split else self.tp, data_group=data_group,
                                 layer_index=layer_index)
        self.experts = Experts(config, self.expert_tensor_group, ep_rank, ep)
        self.dispatcher = TokenDispatcher(
            config.num_moe_experts, expert_group,
            self.expert_tensor_group if self.split else None)
        self.shared_experts = (None if config.moe_shared_expert_intermediate_size is None
                               else SharedExperts(config, self.group))

    def forward(self, hidden: torch.Tensor):
        shared = None
        if self.shared_experts is not None:
            if self.config.recomputes("shared_experts") and self.training:
                shared, _ = checkpointed(self.shared_experts, hidden)
            else:
                shared, _ = self.shared_experts(hidden)
        replicated = self.tp > 1 and not self.split
        if replicated:
            hidden = copy_to_tensor_model_parallel_region(hidden, group=self.group)
        tokens = hidden.reshape(-1, hidden.size(-1))
        probs, chosen = self.router(tokens, hidden.size(1))
        if self.config.moe_apply_probs_on_input:  # [N, 1]: the expert sees p x token
            tokens, probs = (probs * tokens).to(tokens.dtype), torch.ones_like(probs)
        rows, counts, routing = self.dispatcher.dispatch(tokens, chosen)
        output = self.dispatcher.combine(self.experts(rows, counts), probs, routing)
        output = output.view_as(hidden)
        if replicated:
            output = reduce_from_tensor_model_parallel_region(output, group=self.group)
        return (output if shared is None else output + shared), None
