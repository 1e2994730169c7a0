"""Megatron-LM's ``--microbatch-group-size-per-virtual-pipeline-stage N``: the interleaved
schedule runs groups of N consecutive micro-batches through each model chunk before the next
chunk. The order of passes against Megatron's schedule table written here from its definition,
GPT trained with N > PP against one process, the estimator's warm-up, and the config rules."""

import dataclasses
import re

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from test_config import TINY, error_of, shipped
from test_pipeline import _check_pipeline_training, _toy_step, _ToyChunk, expected_order

from mp import parallel_state as ps
from mp.estimate import Setup, microbatches_in_flight, stage_memory
from mp.model import TransformerConfig
from mp.pipeline_parallel.pipelined import schedule_table
from mp.pipeline_parallel.schedules import get_forward_backward_func

# --- Megatron's order, from its definition ----------------------------------------------------


def megatron_order(p: int, r: int, m: int, v: int, n: int) -> list:
    """Stage ``r``'s passes in Megatron-Core's ``forward_backward_pipelining_with_interleaving``
    with ``microbatch_group_size_per_vp_stage = n``: ``get_schedule_table`` takes the
    micro-batches ``n`` at a time (the last group shorter) and, per group, every micro-batch of
    chunk 0, then of chunk 1, ...; a backward runs the chunk ``v - 1 - c`` of the same entry.
    Warm-up (``get_pp_rank_microbatches``): ``2 (p - r - 1) + (v - 1) n`` forwards, at most all
    (all of them when ``m = p``, Megatron's rule before groups, kept by mp)."""
    groups = [list(range(m))[i:i + n] for i in range(0, m, n)]
    table = [(c, mb) for group in groups for c in range(v) for mb in group]
    fwd = [("F", c, mb) for c, mb in table]
    bwd = [("B", v - 1 - c, mb) for c, mb in table]
    warmup = m * v if m == p else min(2 * (p - r - 1) + (v - 1) * n, m * v)
    order = fwd[:warmup]
    for f, b in zip(fwd[warmup:], bwd):
        order += [f, b]
    return order + bwd[m * v - warmup:]


def test_schedule_table_is_megatrons_example():
    """Megatron's own comment: PP2, N3, M5, VP2 gives micro-batches 0 1 2 0 1 2 3 4 3 4 on
    chunks 0 0 0 1 1 1 0 0 1 1."""
    assert schedule_table(5, 2, 3) == list(zip([0, 1, 2, 0, 1, 2, 3, 4, 3, 4],
                                               [0, 0, 0, 1, 1, 1, 0, 0, 1, 1]))


@pytest.mark.parametrize("p,m,v", [(2, 4, 2), (4, 8, 2), (4, 4, 3), (2, 6, 3)])
def test_group_of_pp_is_the_papers_order(p, m, v):
    """N = PP (the default) is the order mp always ran (test_pipeline's closed form)."""
    for r in range(p):
        assert megatron_order(p, r, m, v, p) == expected_order(p, r, m, v)


def _run_order(v: int, m: int, n: int, overlap: bool) -> list:
    ps.initialize_model_parallel(1, dist.get_world_size(), v)
    log = []
    chunks = [_ToyChunk(c, log, overlap) for c in range(v)]
    for chunk in chunks:
        chunk.config = dataclasses.replace(chunk.config, microbatch_group_size_per_vp_stage=n)
    iterators = [iter([torch.ones(4, 2, 8)] * m) for _ in range(v)]
    get_forward_backward_func()(forward_step_func=_toy_step, data_iterator=iterators,
                                model=chunks, num_microbatches=m, seq_length=4,
                                micro_batch_size=2, finalize_model_grads_func=None)
    return log


@pytest.mark.parametrize("p,v,m,n,overlap", [
    (2, 2, 8, 3, True), (2, 2, 8, 3, False), (2, 2, 8, 4, False),
    (2, 3, 5, 3, True),   # 5 micro-batches: not a multiple of PP, last group 2 = PP
    (4, 2, 10, 5, False), (4, 2, 10, 5, True),
])
def test_schedule_order_is_megatrons(p, v, m, n, overlap):
    """Each rank's passes are Megatron's, and the chunk forwards it holds at its peak (its saved
    activations, counted from the log) are the estimator's in-flight micro-batches times v."""
    logs = run_distributed(p, _run_order, v, m, n, overlap)
    for r, log in enumerate(logs):
        assert log == megatron_order(p, r, m, v, n), f"stage {r}"
        live = peak = 0  # chunk forwards whose backward has not run: the saved activations
        for kind, _, _ in log:
            live += 1 if kind == "F" else -1
            peak = max(peak, live)
        assert peak / v == microbatches_in_flight(p, r, m, v, n), f"stage {r} in flight"


# --- GPT: groups longer than PP against one process -----------------------------------------


@pytest.mark.parametrize("n,overlap", [(3, True), (4, False)])
def test_gpt_training_with_groups_matches_single_process(n, overlap):
    """PP2 x VPP2, 8 micro-batches in groups of N: losses and weights as one process's."""
    run_distributed(2, _check_pipeline_training, 1, 2, 2, 8, False, overlap, None,
                    {"microbatch_group_size_per_vp_stage": n}, timeout=300)


# --- the rules ----------------------------------------------------------------------------


def _check_schedule_refuses(m: int, n: int, message: str):
    ps.initialize_model_parallel(1, 2, 2)
    chunks = [_ToyChunk(c, []) for c in range(2)]
    for chunk in chunks:
        chunk.config = dataclasses.replace(chunk.config, microbatch_group_size_per_vp_stage=n)
    with pytest.raises(ValueError, match=message):
        get_forward_backward_func()(forward_step_func=_toy_step, data_iterator=[iter([])] * 2,
                                    model=chunks, num_microbatches=m, seq_length=4,
                                    micro_batch_size=2)


def test_schedule_refuses_a_short_last_group():
    run_distributed(2, _check_schedule_refuses, 7, 3, re.escape(
        "the interleaved schedule needs num_microbatches=7 to leave a last group (m mod "
        "microbatch_group_size_per_vp_stage=3 = 1) of 0 or at least "
        "pipeline_model_parallel_size=2 micro-batches"))


def _model(**fields) -> TransformerConfig:
    return TransformerConfig(num_layers=8, hidden_size=32, num_attention_heads=4,
                             vocab_size=96, seq_length=16, pipeline_model_parallel_size=4,
                             virtual_pipeline_model_parallel_size=2, **fields)


def test_config_rules():
    """Megatron's: PP <= N (at the config), N <= m and a last group of 0 or >= PP (at the job,
    before any process group, and in the estimator); N = PP keeps the multiple-of-PP rule."""
    with pytest.raises(ValueError, match=re.escape(
            "microbatch_group_size_per_vp_stage=3 must be at least "
            "pipeline_model_parallel_size=4")):
        _model(microbatch_group_size_per_vp_stage=3)
    with pytest.raises(ValueError, match="microbatch_group_size_per_vp_stage"):
        _model(microbatch_group_size_per_vp_stage=0)
    cfg = _model(microbatch_group_size_per_vp_stage=6)
    assert cfg.microbatch_group_size == 6 and _model().microbatch_group_size == 4
    assert cfg.interleaved_microbatches_rule(5) == \
        "to be at least microbatch_group_size_per_vp_stage=6"
    assert cfg.interleaved_microbatches_rule(12) is None
    assert cfg.interleaved_microbatches_rule(10) is None  # a last group of 4 = PP
    assert "(m mod microbatch_group_size_per_vp_stage=6 = 3)" in \
        cfg.interleaved_microbatches_rule(9)
    assert _model().interleaved_microbatches_rule(6) == \
        "to be a multiple of pipeline_model_parallel_size=4"
    with pytest.raises(ValueError, match=re.escape(
            "the interleaved schedule needs num_microbatches=9 to leave a last group")):
        Setup(cfg, num_microbatches=9)
    # the estimator's warm-up grows by (v - 1)(N - PP) chunk forwards: stage 0 holds
    # 2 (4 - 1) + (2 - 1) 6 + 1 = 13 chunk forwards, 6.5 micro-batches' worth (5.5 with N = 4)
    grouped = stage_memory(Setup(cfg, num_microbatches=12), 0)
    plain = stage_memory(Setup(_model(), num_microbatches=12), 0)
    assert (grouped.in_flight, plain.in_flight) == (6.5, 5.5)
    assert grouped.activations > plain.activations


def test_megatron_flag_and_job_rules():
    """The flag sets ``model.microbatch_group_size_per_vp_stage``; a global batch whose
    micro-batches break the rule is refused when the job is loaded."""
    flags = ["--tensor-model-parallel-size", "1", "--pipeline-model-parallel-size", "2",
             "--num-layers", "8", "--num-virtual-stages-per-pipeline-rank", "2",
             "--microbatch-group-size-per-virtual-pipeline-stage", "3"]
    cfg = shipped("gpt-tiny", *flags, "--global-batch-size", "32", world_size=2)
    assert cfg.model.microbatch_group_size_per_vp_stage == 3
    assert "needs the number of micro-batches (7 = global batch 28" in error_of(
        *flags, "--global-batch-size", "28", world_size=2, path=TINY)
    assert "must be at least pipeline_model_parallel_size=2" in error_of(
        *flags[:-1], "1", "--global-batch-size", "32", world_size=2)
