"""What mixture-of-experts layers (`mp.model.moe`) call beyond a dense layer's: the tokens'
and outputs' exchanges over EP (and, under sequence parallelism with experts split over TP,
over TP), the routers' sums of their statistics, and the expert bias's token counts
(`expert_collectives`). The experts' gradients, reduced over their expert-data-parallel group,
are `mp.estimate.comm`'s.
"""

from __future__ import annotations

from mp.estimate.collective import FP64, Collective
from mp.estimate.setup import Setup
from mp.estimate.storage import FP32, INT64, activation_bytes, local_tokens, sequence_rows
from mp.model.aux_losses import router_loss_names


def router_statistics_bytes(cfg, micro_batch: int) -> tuple[int, int]:
    """What a router sums in a forward, (for the load-balancing loss, for the z-loss): each
    expert's token count (int64) and probability sum (of each sequence, for the
    sequence-level loss), and one sum, in the logits' dtype."""
    logits = FP64 if cfg.moe_router_dtype == "fp64" else FP32
    names = router_loss_names(cfg)
    balancing = {"load_balancing_loss": 1, "global_load_balancing_loss": 1,
                 "seq_load_balancing_loss": micro_batch}
    per_expert = sum(balancing.get(name, 0) for name in names)
    return per_expert * (INT64 + logits) * cfg.num_moe_experts, ("z_loss" in names) * logits


def expert_collectives(setup: Setup, layers: int, forwards: int) -> list[Collective]:
    """The own calls (`mp.model.moe.dispatcher`) of ``layers`` mixture-of-experts layers on
    one rank, run ``forwards`` times in all in an iteration's pass over a micro-batch (full
    recompute runs some twice), summed over the iteration. Each forward
    trades the per-expert token counts (int64) over EP, then the ``n' k`` routed rows of the
    rank's ``n'`` tokens (`sequence_rows`: its own ``1 / t`` under SP, else every token of
    its sequences), then the experts' outputs back; backward trades the gradients of both.
    Under SP the TP ranks then gather each other's counts (an all-gather) and rows (an
    all-to-all of each rank's rows to every TP rank), and send each rank the partial outputs
    of its rows (an all-to-all, summed), and the reverse in backward; not with whole experts
    (ETP 1), whose EP group holds the TP ranks too. A rank sends its own
    ``n' k`` rows over EP and gets as many outputs back, but how many rows it receives, and
    so how much it sends on, depends on the routing: this counts the mean, ``n' k`` over EP
    and ``N k`` over TP (exact summed over the ranks, which together receive what they send).
    The routers sum their statistics over CP and, under SP, TP once a micro-batch (in the
    forward that keeps a graph, not again in a recompute; the global load-balancing loss's
    over DP x CP instead of CP), and with an expert bias their token counts over DP x CP (and
    TP) once an iteration."""
    cfg, m = setup.model, setup.num_microbatches
    split = cfg.sequence_parallel and setup.tp > 1
    row = activation_bytes(cfg) * cfg.moe_router_topk * cfg.hidden_size
    counts = INT64 * cfg.num_moe_experts
    out = []
    if setup.ep > 1:
        rows = row * sequence_rows(cfg, setup.micro_batch_size)
        out.append(Collective("tokens to experts and back (counts, rows)", "all_to_all", "ep",
                              m * (forwards * (counts + 2 * rows) + layers * 2 * rows)))
    if split and setup.etp > 1:  # whole experts (ETP 1) take their rows over EP alone
        rows = row * local_tokens(cfg, setup.micro_batch_size)
        out += [Collective("experts' token counts", "all_gather", "tp",
                           m * forwards * setup.tp * counts),
                Collective("experts' rows and partial outputs", "all_to_all", "tp",
                           m * (forwards + layers) * 2 * rows)]
    dp_cp = "dp_cp" if setup.cp > 1 else "dp"
    balancing, z = router_statistics_bytes(cfg, setup.micro_batch_size)
    if cfg.moe_router_load_balancing_type == "global_aux_loss":  # every DP rank's tokens
        summed = ((dp_cp, setup.gradient_group_size, balancing), ("cp", setup.cp, z))
    else:  # over the ranks holding the rest of the sequences
        summed = (("cp", setup.cp, balancing + z),)
    out += [Collective("router statistics", "all_reduce", group, m * layers * size_bytes)
            for group, size, size_bytes in (("tp", setup.tp if split else 1, balancing + z),
                                            *summed)
            if size > 1 and size_bytes]
    if cfg.moe_router_enable_expert_bias:  # over every rank that routes other tokens
        out += [Collective("routed token counts (expert bias)", "all_reduce", group,
                           layers * FP32 * cfg.num_moe_experts)
                for group, size in (("tp", setup.tp if split else 1),
                                    (dp_cp, setup.gradient_group_size))
                if size > 1]
    return out
