"""The rules of a `mp.model.config.TransformerConfig`'s parallel layout: context parallelism
(its exchanges' divisibility), sequence parallelism, virtual pipeline stages and the
interleaved schedule's micro-batch groups. Checked before any process group exists, with
messages that name the value and the rule."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mp.model.config_rules import divisible, one_of, positive_int
from mp.model.context_parallel import CP_COMM_TYPES
from mp.model.pipeline_split import parse_layout
from mp.rank_layout import check_hierarchical_sizes

if TYPE_CHECKING:
    from mp.model.config import TransformerConfig


def check_parallel_layout(config: TransformerConfig) -> None:
    """CP (two chunks per rank, each split over TP; ``p2p`` without attention dropout;
    ``a2a`` dividing the heads; ``a2a+p2p`` both, its all-to-all's A dividing the heads, and
    its sizes, `check_hierarchical_cp`), SP dividing the sequence, virtual stages (taken from
    ``pipeline_model_parallel_layout`` when it has more chunks than stages; they need PP > 1)
    and ``microbatch_group_size_per_vp_stage`` (at least PP under virtual stages)."""
    tp, pp = config.tensor_model_parallel_size, config.pipeline_model_parallel_size
    cp = config.context_parallel_size
    comm = config.cp_comm_type
    one_of("cp_comm_type", comm, CP_COMM_TYPES)
    check_hierarchical_cp(config)
    if cp > 1:  # two chunks per CP rank (load balancing), each rank's part split over TP
        divisible("seq_length", config.seq_length, "2 x context_parallel_size", 2 * cp)
    if cp > 1 and comm in ("p2p", "a2a+p2p") and config.attention_dropout > 0:
        raise ValueError(f"cp_comm_type={comm!r} needs attention_dropout=0, not "
                         f"{config.attention_dropout}: mp's ring attention has no dropout "
                         "(all_gather and a2a have it)")
    if cp > 1 and comm == "a2a":  # each CP rank takes 1 / cp of the heads
        for name in ("num_attention_heads", "num_query_groups"):
            divisible(name, getattr(config, name), "tensor_model_parallel_size x "
                      "context_parallel_size (cp_comm_type='a2a')", tp * cp)
    if cp > 1 and comm == "a2a+p2p":  # each rank of an all-to-all group takes 1 / A of them
        a2a = config.hierarchical_context_parallel_sizes[0]
        for name in ("num_attention_heads", "num_query_groups"):
            divisible(name, getattr(config, name), "tensor_model_parallel_size x "
                      "hierarchical_context_parallel_sizes[0] (cp_comm_type='a2a+p2p')",
                      tp * a2a)
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


def check_hierarchical_cp(config: TransformerConfig) -> None:
    """``hierarchical_context_parallel_sizes`` (Megatron's ``--hierarchical-context-parallel-
    sizes A P``): required by ``cp_comm_type='a2a+p2p'`` under CP, two positive integers whose
    product is ``context_parallel_size`` (all-to-all in groups of A, the ring across P of them, as
    Transformer Engine's ``a2a+p2p`` takes two levels), and refused with the other exchanges,
    which would not use them."""
    sizes, comm = config.hierarchical_context_parallel_sizes, config.cp_comm_type
    if comm != "a2a+p2p":
        if sizes is not None:
            raise ValueError(f"hierarchical_context_parallel_sizes={sizes!r} needs "
                             f"cp_comm_type='a2a+p2p', not {comm!r}: only that exchange has "
                             "levels")
        return
    if sizes is None and config.context_parallel_size == 1:
        return  # no exchange to run
    if sizes is None:
        raise ValueError(f"cp_comm_type='a2a+p2p' needs hierarchical_context_parallel_sizes "
                         f"[A, P] with A x P = context_parallel_size="
                         f"{config.context_parallel_size} (Megatron's "
                         "--hierarchical-context-parallel-sizes A P)")
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 2:
        raise ValueError(f"hierarchical_context_parallel_sizes={sizes!r} must be two sizes "
                         "[A, P] under cp_comm_type='a2a+p2p': the all-to-all's and the ring's")
    check_hierarchical_sizes(sizes, config.context_parallel_size)


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
