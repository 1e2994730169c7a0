"""Bytes each collective moves in one iteration, per rank (their time on the wire is
`mp.estimate.collective`'s).

`collectives` lists what one rank of pipeline stage ``pp_rank`` calls in an iteration of ``m``
micro-batches (forward and backward of each, then the gradient reduction and the optimizer
step), following mp's code call by call (``e`` bytes an activation element, ``P`` the rank's
parameters):

- TP and CP: `mp.estimate.model_comm` (the layers', embedding's, output layer's and loss's
  calls).
- Muon over TP (``muon_tp_mode`` duplicated or distributed), once:
  `mp.estimate.newton_schulz.tp_mode_collectives`.
- Mixture of experts: `mp.estimate.expert_comm` (the tokens' exchanges, the routers' sums).
- DP, once: the gradient buffer, ``g P`` all-reduced; with the distributed optimizer
  reduce-scattered, then the updated parameters (``e P``) all-gathered, but for the word
  embedding's pair kept over the first and last stage (below), whose bucket of its own is
  all-reduced. With CP the gradients are reduced over DP x CP (group ``dp_cp``). With N
  distributed-optimizer instances the reduce-scatter and the all-gather run inside the
  instance (``intra_dp_cp``, DP x CP / N ranks; experts ``intra_edp``, EDP / N), and each
  rank's reduced shard, ``g P / (DP x CP / N)``, is all-reduced across the instances
  (``inter_dist_opt``, N ranks; the experts' shard too). Muon's layer-wise distributed
  optimizer (`mp.optim.layer_wise`) all-reduces the gradients as without it, then each owner
  broadcasts its updated parameters, one flat tensor per owner and dtype over DP (x CP), the
  experts' over EDP: ``e P`` a rank over the group's broadcasts, as an all-gather's output.
- PP: each chunk's output forward and its gradient backward, ``e s b h`` (``/ t`` with SP;
  ``e`` = 4 with ``fp32_residual_connection``, whose residual stream the stages send);
  once per iteration, the word-embedding gradients of the first stage and the last stage's
  copy (tied embeddings, or multi-token prediction's), ``g V h / t``, over the embedding
  group.

Gradients are read from the buffers, ``g`` bytes an element: 4 (fp32), or 2 with
``grad_reduce_in_bf16`` (`Setup.grad_bytes`).
- FSDP (``Setup.fully_sharded``, `mp.distributed.torch_fsdp2`) instead of the DP rows: in
  every micro-batch each unit's weights, ``e P`` in all, all-gathered over DP (x CP) for its
  forward and, with ``reshard_after_forward``, again for its backward (with full recompute,
  for the rerun of its forward, which keeps it for its backward), under any schedule (the
  wrapper sets FSDP2's backward prefetch, `mp.distributed.torch_fsdp2`), and its gradients,
  ``g P``, reduce-scattered; the TP (`model_comm`) and embedding-group all-reduces then move each
  rank's fp32 shard, ``4 / (DP x CP)`` bytes an element (each tensor's rows padded to a
  multiple of DP x CP by FSDP is left out).
- Model-parallel group, once: the gradient norm, one fp32 scalar (over every rank with the
  distributed optimizer or FSDP, whose data-parallel shards add to it; over one instance's ranks,
  ``intra_dist_opt``, with several instances, which hold the same shards); without those, the
  experts' first over the EP ranks at one TP rank (``expert_norm``: the EP group, or with
  whole experts, ETP 1, ``EP / TP`` of its ranks).

Bytes follow `mp.estimate.measure`: an all-reduce moves its tensor; an all-gather its
gathered output; a reduce-scatter its full input. Every row is checked against mp's code (TP,
DP with and without the distributed optimizer, pipeline with 1F1B and interleaving, tied
embeddings, multi-token prediction, the norm); the distributed optimizer's padding of each
bucket to a multiple of DP elements is left out.
"""

from __future__ import annotations

from mp.estimate.collective import FP64, Collective, group_size
from mp.estimate.expert_comm import expert_collectives
from mp.estimate.model_comm import (
    context_parallel_collectives,
    shard_grad_bytes,
    stage_layers,
    tensor_parallel_collectives,
)
from mp.estimate.newton_schulz import tp_mode_collectives
from mp.estimate.params import rank_params
from mp.estimate.setup import Setup
from mp.estimate.storage import (
    FP32,
    activation_bytes,
    residual_bytes,
    sequence_rows,
)
from mp.model.aux_losses import tracked_names


def collectives(setup: Setup, pp_rank: int = 0, logging: bool = False) -> list[Collective]:
    """Every collective one rank of stage ``pp_rank`` calls in one iteration (module doc).
    ``logging`` adds what `mp.training.training.train_step` does to report the loss: on the
    last stage, the all-reduce over DP of its numerator and denominator (two float64 values,
    `mp.training.evaluation.average_losses`; its ``broadcast_object_list`` to the other stages
    is not modelled)."""
    cfg = setup.model
    out: list[Collective] = []
    if setup.tp > 1:
        out += tensor_parallel_collectives(setup, pp_rank) + tp_mode_collectives(setup, pp_rank)
    if setup.cp > 1:
        out += context_parallel_collectives(setup, pp_rank)
    moe_layers, moe_forwards = stage_layers(setup, pp_rank)[True]
    if cfg.recomputes("moe"):  # the layers' dispatch and combine again
        moe_forwards += moe_layers
    if moe_layers:
        out += expert_collectives(setup, moe_layers, moe_forwards)
    out += _data_parallel(setup, pp_rank)
    if setup.pp > 1:
        out += _pipeline(setup, pp_rank)
    instances = setup.distributed_optimizer_instances
    if setup.distributed_optimizer or setup.fully_sharded:  # the shards add up too
        if setup.world_size > instances:
            out.append(Collective("gradient norm", "all_reduce",
                                  "world" if instances == 1 else "intra_dist_opt", FP32))
    else:
        if group_size(setup, "expert_norm") > 1 and rank_params(cfg, pp_rank).experts:
            out.append(Collective("gradient norm (experts)", "all_reduce", "expert_norm", FP32))
        if setup.tp * setup.pp > 1:
            out.append(Collective("gradient norm", "all_reduce", "mp", FP32))
    if logging:
        out += _logging(setup, pp_rank)
    return [c for c in out if c.bytes > 0]


def _data_parallel(setup: Setup, pp_rank: int) -> list[Collective]:
    """The gradient reduction over DP (x CP) and, with the distributed optimizer, the
    parameter all-gather: dense parameters' and experts' (module doc); FSDP's gathers and
    reduce-scatters."""
    cfg, out = setup.model, []
    if setup.fully_sharded:
        return _fully_sharded(setup, pp_rank)
    params = rank_params(cfg, pp_rank)
    dense_group = "dp_cp" if setup.cp > 1 else "dp"
    synced = _embedding_group_elements(setup, pp_rank)
    several = setup.distributed_optimizer_instances > 1
    for what, group, elements, size, intra, shard_size in (
            ("", dense_group, params.total - params.experts, setup.gradient_group_size,
             "intra_dp_cp", setup.optimizer_shard_size),
            ("expert ", "edp" if setup.ep > 1 else dense_group, params.experts,
             setup.expert_data_parallel_size, "intra_edp" if setup.ep > 1 else "intra_dp_cp",
             setup.expert_optimizer_shard_size)):
        if size == 1:
            continue
        shard_group = intra if several else group
        grads = setup.grad_bytes * elements
        if not setup.distributed_optimizer or setup.optimizer == "muon":
            out.append(Collective(f"{what}gradients", "all_reduce", group, grads))
            if setup.distributed_optimizer:  # layer-wise: the owners broadcast their updates
                out.append(Collective(f"updated {what}parameters (layer-wise optimizer)",
                                      "broadcast", group, activation_bytes(cfg) * elements))
            continue
        sharded = grads - setup.grad_bytes * (synced if not what else 0)
        if shard_size > 1:
            out += [Collective(f"{what}gradients (distributed optimizer)", "reduce_scatter",
                               shard_group, sharded),
                    Collective(f"updated {what}parameters (distributed optimizer)",
                               "all_gather", shard_group, activation_bytes(cfg) * elements)]
        if several:  # the reduced shard, across the instances
            out.append(Collective(f"{what}gradient shards (distributed optimizer instances)",
                                  "all_reduce", "inter_dist_opt", sharded / shard_size))
        if not what:  # the embedding pair's own bucket is all-reduced
            out.append(Collective("word-embedding gradients (distributed optimizer)",
                                  "all_reduce", group, grads - sharded))
    return out


def _fully_sharded(setup: Setup, pp_rank: int) -> list[Collective]:
    """FSDP over DP x CP (module doc): every micro-batch gathers each unit's weights in the
    model's dtype for its forward, and again for its backward under ``reshard_after_forward``
    (without it a unit stays gathered from its forward to its backward), and reduce-scatters
    its gradients; the same under 1F1B and interleaving (the wrapper's explicit backward
    prefetch targets only the units the running backward needs)."""
    if setup.gradient_group_size == 1:
        return []
    elements = rank_params(setup.model, pp_rank).total
    group, m = ("dp_cp" if setup.cp > 1 else "dp"), setup.num_microbatches
    gathers = m * (2 if setup.reshard_after_forward else 1)
    return [Collective("parameters (FSDP)", "all_gather", group,
                       gathers * activation_bytes(setup.model) * elements),
            Collective("gradients (FSDP)", "reduce_scatter", group,
                       m * setup.grad_bytes * elements)]


def _logging(setup: Setup, pp_rank: int) -> list[Collective]:
    out = []
    if pp_rank == setup.pp - 1 and setup.data_parallel_size > 1:
        out.append(Collective("reported loss (logging)", "all_reduce", "dp", 2 * FP64))
    tracked = 2 * FP64 * len(tracked_names(setup.model))  # (sum, count) of each
    for group, size in (("pp", setup.pp), ("dp", setup.data_parallel_size)):
        if size > 1:
            out.append(Collective("router and MTP losses (logging)", "all_reduce", group,
                                  tracked))
    return out


def _pipeline(setup: Setup, pp_rank: int) -> list[Collective]:
    cfg, m, v = setup.model, setup.num_microbatches, setup.vpp
    tensor = (residual_bytes(cfg) * sequence_rows(cfg, setup.micro_batch_size)
              * cfg.hidden_size)
    first, last = pp_rank == 0, pp_rank == setup.pp - 1
    # each of the m v chunk passes sends its output on, except the model's last chunk, and
    # its input gradient back, except the model's first chunk
    sends = 2 * m * v - (m if last else 0) - (m if first else 0)
    out = [Collective("stage activations and gradients", "send", "pp", sends * tensor),
           Collective("stage activations and gradients", "recv", "pp", sends * tensor)]
    synced = _embedding_group_elements(setup, pp_rank)
    if synced:
        out.append(Collective("word-embedding gradients (first and last stage)", "all_reduce",
                              "embedding", shard_grad_bytes(setup, synced)))
    return out


def _embedding_group_elements(setup: Setup, pp_rank: int) -> int:
    """Elements of the word embedding that the first and last stage keep equal by summing
    their gradients over the embedding group (`mp.model.stages`), on this stage: the
    matrix's shard ``V h / t`` on both when PP > 1 with tied embeddings or multi-token
    prediction (the last stage's copy), else none."""
    cfg = setup.model
    paired = not cfg.untie_embeddings_and_output_weights or cfg.mtp_num_layers is not None
    if setup.pp == 1 or not paired or 0 < pp_rank < setup.pp - 1:
        return 0
    return cfg.padded_vocab_size // setup.tp * cfg.hidden_size
