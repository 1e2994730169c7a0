"""The top-k router of a mixture-of-experts layer."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from mp.device import get_device
from mp.model.aux_losses import attach_aux_loss, router_loss_names, track
from mp.model.config import TransformerConfig
from mp.model.init import init_method, init_method_normal
from mp.model.moe.aux_loss import at_least_fp32, load_balancing_loss, z_loss
from mp.model.moe.capacity import expert_capacity, within_capacity
from mp.tensor_parallel import reduce_from_tensor_model_parallel_region

_ROUTER_DTYPES = {"fp32": torch.float32, "fp64": torch.float64}


class TopKRouter(nn.Module):
    """``tokens [N, h] -> (probs [N, k] fp32, experts [N, k] int64)``.

    Logits ``tokens W^T`` with ``W [E, h]`` (the product in ``moe_router_dtype`` when set, the
    rest in fp32, or the tokens' dtype if wider), then, with ``moe_router_score_function=
    "sigmoid"``, the top ``k`` sigmoids (chosen with the expert bias added when
    ``moe_router_enable_expert_bias``) renormalized, or
    either the top ``k`` logits and a softmax over them (the default: each token's ``k``
    weights sum to 1, as Mixtral's) or, with
    ``moe_router_pre_softmax``, a softmax over every expert and its top ``k``; the weights times
    ``moe_router_topk_scaling_factor`` when set; the top ``k`` within the best groups of
    experts with ``moe_router_num_groups`` (`_topk`). While training, the load-balancing and z
    losses (`mp.model.moe.aux_loss`) are attached to ``probs`` (`mp.model.aux_losses`; the
    load balancing over the sigmoids normalized over the experts, for a sigmoid router). With
    ``moe_expert_capacity_factor`` the copies over an expert's capacity are dropped after
    that (`mp.model.moe.capacity`): their expert reads -1 and their probability 0.

    With ``moe_router_bias`` the logits are ``tokens W^T + b`` with a learned ``b [E]``
    (gpt-oss's; Megatron-Core's ``router.bias``), replicated and reduced as ``W`` is.

    With ``moe_input_jitter_eps`` eps, in training the tokens are first multiplied by noise
    uniform in ``[1 - eps, 1 + eps]`` (the Switch Transformer's input jitter, Megatron's
    ``--moe-input-jitter-eps``), drawn from the default generator as Megatron draws it: the
    same on every TP rank, which route the same tokens without sequence parallelism, and
    redrawn alike when activation recompute replays the layer. Megatron jitters in evaluation
    too; mp does not.

    With ``moe_router_force_load_balancing`` (Megatron's, for benchmarks) the logits are
    replaced by draws from N(0, 1), so every expert gets about ``k / E`` of the tokens
    whatever the weights; their gradient passes to the real logits unchanged (a
    straight-through estimate, as Megatron's), so the router still trains. Megatron draws
    from a generator of its own seeded by the global rank; mp draws from the default one, as
    the jitter, so TP ranks that route the same tokens route them alike and recompute replays
    the draw.

    ``W`` is replicated on every rank and its gradient is partial on each TP rank, summed
    over TP like a sequence-parallel weight's (``W.sequence_parallel``): under sequence
    parallelism each TP rank routes its own tokens (``tensor_group``); otherwise every TP rank
    routes every token (``replicas = TP``) but sees only its share of the experts' outputs,
    and the auxiliary losses, the same on every TP rank, backpropagate ``1 / TP`` of their
    gradient from each. The losses' token statistics are summed over the ranks holding the
    rest of the sequences, ``tensor_group`` and the context-parallel ``context_group`` (an
    all-reduce whose backward passes each rank its own part), and each rank backpropagates
    ``CP x`` its part, as with the language-model loss (the gradients are averaged over
    DP x CP): the losses' weight is ``CP / replicas``.

    The global load-balancing loss (``moe_router_load_balancing_type="global_aux_loss"``,
    Megatron's) counts the micro-batch of every data-parallel rank together: the statistics
    are summed over ``data_group`` (DP x CP) too, and the weight is ``DP CP / replicas``, so
    the gradient averaged over DP is that of the loss of all those tokens. Its expert
    fractions are the mean of the micro-batches' so far in the iteration
    (`end_iteration` starts them again), as Megatron's running average.
    """

    def __init__(self, config: TransformerConfig, context_group=None, tensor_group=None,
                 replicas: int = 1, data_group=None, layer_index: int | None = None):
        super().__init__()
        self.config = config
        self.layer_index = layer_index if config.moe_per_layer_logging else None
        self.topk = config.moe_router_topk
        self.tensor_group = tensor_group
        # the ranks holding the rest of the sequences, and (global loss) of the global batch
        self.token_groups = [g for g in (tensor_group, context_group) if g is not None]
        self.global_groups = [g for g in (tensor_group, data_group) if g is not None]
        self.token_shares, self.global_shares = (
            _world(groups) for groups in (self.token_groups, self.global_groups))
        self.aux_loss_weight = _world([context_group]) / replicas
        self.global_loss_weight = _world([data_group]) / replicas
        self.global_tokens_per_expert = None  # [E] summed over this iteration's micro-batches
        if config.moe_router_load_balancing_type == "global_aux_loss":
            self.global_tokens_per_expert = torch.zeros(config.num_moe_experts,
                                                        dtype=torch.float64, device=get_device())
            self.global_micro_batches = 0
        full = torch.empty(config.num_moe_experts, config.hidden_size, dtype=torch.float32,
                           device=get_device())
        init_method(config)(full)
        self.weight = nn.Parameter(full.to(config.params_dtype))
        self.weight.sequence_parallel = True
        self.bias = None
        if config.moe_router_bias:  # N(0, init_method_std) after the weight, as Megatron
            full = torch.empty(config.num_moe_experts, dtype=torch.float32, device=get_device())
            init_method_normal(config.init_method_std)(full)
            self.bias = nn.Parameter(full.to(config.params_dtype))
            self.bias.sequence_parallel = True
        self.expert_bias = None  # [E] fp32, the same on every rank (`update_expert_bias`)
        if config.moe_router_enable_expert_bias:
            zeros = torch.zeros(config.num_moe_experts, device=get_device())
            self.expert_bias = nn.Parameter(zeros, requires_grad=False)  # checkpointed
            self.tokens_per_expert = torch.zeros_like(zeros)  # routed this iteration

    def forward(self, tokens: torch.Tensor, sequences: int = 1
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens [N, h]``, position-major over ``sequences`` sequences (``[s, b, h]``
        flattened; the sequence-level load-balancing loss needs ``b``)."""
        cfg = self.config
        eps = cfg.moe_input_jitter_eps
        if self.training and eps is not None:
            tokens = tokens * torch.empty_like(tokens).uniform_(1 - eps, 1 + eps)
        dtype = _ROUTER_DTYPES.get(cfg.moe_router_dtype)
        if dtype is None:
            logits = at_least_fp32(F.linear(tokens, self.weight, self.bias))  # [N, E]
        else:
            logits = F.linear(tokens.to(dtype), self.weight.to(dtype),
                              None if self.bias is None else self.bias.to(dtype))
        if cfg.moe_router_force_load_balancing:  # the draws' values, the logits' gradient
            logits = logits - logits.detach() + torch.randn_like(logits)
        scores = torch.softmax(logits, dim=-1) if cfg.moe_router_pre_softmax else None
        if cfg.moe_router_score_function == "sigmoid":
            probs, experts = self._sigmoid_topk(logits)
        elif scores is not None:
            probs, experts = self._topk(scores)
        else:
            top, experts = self._topk(logits)
            probs = torch.softmax(top, dim=-1)
        if cfg.moe_router_topk_scaling_factor is not None:
            probs = probs * cfg.moe_router_topk_scaling_factor
        if self.training and torch.is_grad_enabled():  # the losses see every choice
            probs = self._attach_losses(probs, logits, scores, experts, sequences)
        if cfg.moe_expert_capacity_factor is not None:
            capacity = expert_capacity(logits.size(0), self.topk, cfg.num_moe_experts,
                                       cfg.moe_expert_capacity_factor)
            kept = within_capacity(probs, experts, cfg.num_moe_experts, capacity,
                                   cfg.moe_token_drop_policy)
            probs, experts = probs * kept, experts.masked_fill(~kept, -1)
        if self.training and torch.is_grad_enabled() and self.expert_bias is not None:
            self.tokens_per_expert += torch.bincount(experts[experts >= 0],
                                                     minlength=cfg.num_moe_experts)
        return probs, experts

    def _sigmoid_topk(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The top ``k`` of ``sigmoid(logits)`` (plus the expert bias, for the choice only),
        their scores renormalized to sum to 1 when ``k > 1``."""
        scores = torch.sigmoid(logits)
        with torch.no_grad():  # the choice only
            choice = scores if self.expert_bias is None else scores + self.expert_bias
            experts = self._topk(choice).indices
        probs = scores.gather(1, experts)
        if self.topk > 1:
            probs = probs / (probs.sum(dim=-1, keepdim=True) + 1e-20)
        return probs, experts

    def _topk(self, scores: torch.Tensor):
        """``torch.topk`` of ``scores [N, E]`` over the experts; with ``moe_router_num_groups``
        ``G``, over the experts of the ``moe_router_group_topk`` groups (of ``E / G``
        consecutive experts) whose top ``k / group_topk`` scores sum highest (DeepSeek's
        device- and node-limited routing, Megatron's ``group_limited_topk``)."""
        groups, chosen = self.config.moe_router_num_groups, self.config.moe_router_group_topk
        if groups is None:
            return torch.topk(scores, self.topk, dim=-1)
        with torch.no_grad():
            grouped = scores.view(scores.size(0), groups, -1)
            group_scores = grouped.topk(self.topk // chosen, dim=-1).values.sum(-1)
            best = group_scores.topk(chosen, dim=-1).indices
            allowed = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)
            allowed = allowed.repeat_interleave(grouped.size(-1), dim=1)  # [N, E]
        return torch.topk(scores.masked_fill(~allowed, float("-inf")), self.topk, dim=-1)

    @torch.no_grad()
    def end_iteration(self, group=None) -> None:
        """After an iteration's backward (`mp.distributed.finalize_model_grads`;
        ``group``: DP x CP): `update_expert_bias` when the router has an expert bias, and the
        global load-balancing loss's counts start again."""
        if self.expert_bias is not None:
            self.update_expert_bias(group)
        if self.global_tokens_per_expert is not None:
            self.global_tokens_per_expert.zero_()
            self.global_micro_batches = 0

    @torch.no_grad()
    def update_expert_bias(self, group=None) -> None:
        """After an iteration's backward (`mp.distributed.finalize_model_grads`): move each
        expert's bias by ``moe_router_bias_update_rate`` toward balance, up for an expert
        that took fewer than the mean tokens and down for one that took more, counting the
        tokens of every rank in ``group`` (DP x CP) and, when each TP rank routes its own
        tokens, over TP; DeepSeek-V3's rule, as Megatron applies it."""
        counts = self.tokens_per_expert
        for over in (self.tensor_group, group):
            if over is not None and dist.get_world_size(over) > 1:
                dist.all_reduce(counts, group=over)
        self.expert_bias += torch.sign(counts.mean() - counts) \
            * self.config.moe_router_bias_update_rate
        counts.zero_()

    def _attach_losses(self, probs, logits, scores, experts, sequences):
        cfg = self.config
        num_tokens = logits.size(0) * self.token_shares  # the whole sequences'
        names = router_loss_names(cfg)
        if names and names[0] != "z_loss":  # a load-balancing loss
            if cfg.moe_router_score_function == "sigmoid":  # normalized over the experts
                scores = torch.sigmoid(logits)
                scores = scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)
            elif scores is None:
                scores = torch.softmax(logits, dim=-1)
            experts_count, weight = cfg.num_moe_experts, self.aux_loss_weight
            kind = cfg.moe_router_load_balancing_type
            groups = self.global_groups if kind == "global_aux_loss" else self.token_groups
            if kind == "seq_aux_loss":  # [b, E] per sequence
                sequence = torch.arange(logits.size(0), device=logits.device) % sequences
                pair = sequence.repeat_interleave(self.topk) * experts_count + experts.flatten()
                counts = torch.bincount(pair, minlength=sequences * experts_count)
                counts = counts.view(sequences, experts_count)
                sums = scores.view(-1, sequences, experts_count).sum(0)
                sums, length = self._summed(sums, groups, counts), num_tokens // sequences
            else:
                counts = torch.bincount(experts.flatten(), minlength=experts_count)
                sums, length = self._summed(scores.sum(0), groups, counts), num_tokens
            if kind == "global_aux_loss":  # every DP rank's micro-batch, the counts averaged
                length, weight = logits.size(0) * self.global_shares, self.global_loss_weight
                self.global_tokens_per_expert += counts
                self.global_micro_batches += 1
                counts = self.global_tokens_per_expert / self.global_micro_batches
            loss = load_balancing_loss(sums, counts, length, self.topk, cfg.moe_aux_loss_coeff)
            track(names[0], loss / cfg.moe_aux_loss_coeff, self.layer_index)
            probs = attach_aux_loss(probs, loss, weight)
        if cfg.moe_z_loss_coeff:
            square_sum = torch.logsumexp(logits, dim=-1).square().sum()
            loss = z_loss(self._summed(square_sum, self.token_groups), num_tokens,
                          cfg.moe_z_loss_coeff)
            track("z_loss", loss / cfg.moe_z_loss_coeff, self.layer_index)
            probs = attach_aux_loss(probs, loss, self.aux_loss_weight)
        return probs

    @staticmethod
    def _summed(sums: torch.Tensor, groups: list, counts: torch.Tensor | None = None):
        """``sums`` added up over ``groups`` (the ranks holding the rest of the tokens the loss
        counts; backward: each rank's own part), and ``counts`` in place (no gradient)."""
        for group in groups:
            if counts is not None:
                dist.all_reduce(counts, group=group)
            sums = reduce_from_tensor_model_parallel_region(sums, group=group)
        return sums


def _world(groups) -> int:
    """The ranks of ``groups`` together (None counts 1)."""
    size = 1
    for group in groups:
        size *= 1 if group is None else dist.get_world_size(group)
    return size
