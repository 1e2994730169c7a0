"""The rules of a `mp.model.config.TransformerConfig`'s parallel layout: context parallelism
(its exchanges' divisibility), sequence parallelism, virtual pipeline stages and the
interleaved schedule's micro-batch groups. Checked before any process group exists, with
messages that name the value and the rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mp.model.config_rules import divisible, one_of, positive_int
from mp.model.context_parallel import CP_COMM_TYPES
from mp.model.pipeline_split import parse_layout

if TYPE_CHECKING:
    from mp.model.config import TransformerConfig


def check_parallel_layout(config: TransformerConfig) -> None:
    """CP (two chunks per rank, each split over TP; ``p2p`` without attention dropout;
    ``a2a`` dividing the heads), SP dividing the sequence, virtual stages (taken from
    ``pipeline_model_parallel_layout`` when it has more chunks than stages; they need PP > 1)
    and ``microbatch_group_size_per_vp_stage`` (at least PP under virtual stages)."""
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    cp = config.context_parallel_size
    one_of("cp_comm_type", config.cp_comm_type, CP_COMM_TYPES)
    if cp > 1:  # two chunks per CP rank (load balancing), each rank's part split over TP
        divisible("seq_length", config.seq_length, "2 x context_parallel_size", 2 * cp)
    if cp > 1 and config.cp_comm_type == "p2p" and config.attention_dropout > 0:
        raise ValueError(f"cp_comm_type='p2p' needs attention_dropout=0, not "
                         f"{config.attention_dropout}: mp's ring attention has no dropout "
                         "(all_gather and a2a have it)")
    if cp > 1 and config.cp_comm_type == "a2a":  # each CP rank takes 1 / cp of the heads
        for name in ("num_attention_heads", "num_query_groups"):
            divisible(name, getattr(config, name), "tensor_model_parallel_size x "
                      "context_parallel_size (cp_comm_type='a2a')", tp * cp)
    if config.sequence_parallel:
        divisible("seq_length", config.seq_length, "tensor_model_parallel_size x "
                  "context_parallel_size (sequence_parallel=True)" if cp > 1 else
                  "tensor_model_parallel_size (sequence_parallel=True)", tp * cp)
    if config.pipeline_model_parallel_layout is not None \
            and config.virtual_pipeline_model_parallel_size is None:
        chunks = len(parse_layout(config.pipeline_model_parallel_layout))
        if chunks > pp and chunks % pp == 0:
            config.virtual_pipeline_model_parallel_size = chunks // pp
    vpp = config.virtual_pipeline_model_parallel_size
    if vpp is not None:
        positive_int("virtual_pipeline_model_parallel_size", vpp)
        if pp < 2:
            raise ValueError(f"virtual_pipeline_model_parallel_size={vpp} needs "
                             f"pipeline_model_parallel_size > 1, got {pp}")
    group = config.microbatch_group_size_per_vp_stage
    if group is not None:
        positive_int("microbatch_group_size_per_vp_stage", group)
        if vpp is not None and group < pp:
            raise ValueError(f"microbatch_group_size_per_vp_stage={group} must be at least "
                             f"pipeline_model_parallel_size={pp} (Megatron's rule)")


def interleaved_microbatches_rule(num_microbatches: int, pp: int, group: int) -> str | None:
    """Megatron's rules for m = ``num_microbatches`` in an interleaved iteration whose chunks run
    groups of N = ``group`` consecutive micro-batches (`forward_backward_pipelining_with_
    interleaving`): N <= m, and the last group (m mod N micro-batches) is empty or at least
    ``pp`` long, else the pipeline stalls on it. With N = PP (the default) that is "m is a
    multiple of PP". Returns what m must be, as a phrase ("to be ..."), or None."""
    if group == pp:
        return None if num_microbatches % pp == 0 else \
            f"to be a multiple of pipeline_model_parallel_size={pp}"
    if num_microbatches < group:
        return f"to be at least microbatch_group_size_per_vp_stage={group}"
    last = num_microbatches % group
    if 0 < last < pp:
        return (f"to leave a last group (m mod microbatch_group_size_per_vp_stage={group} = "
                f"{last}) of 0 or at least pipeline_model_parallel_size={pp} micro-batches")
    return None
