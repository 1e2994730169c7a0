"""Hierarchical context parallelism (``--cp-comm-type a2a+p2p`` with
``--hierarchical-context-parallel-sizes A P``): all-to-all over the heads inside groups of A
consecutive CP ranks, the ring across the P groups.

- The groups follow Megatron-Core's ``create_hierarchical_groups`` (megatron/core/
  parallel_state.py) at CP 4 = [2, 2], alone and with TP 2 or DP 2 around it, and connect
  exactly those ranks.
- The core at CP 4 ([2, 2], and the degenerate [1, 4] and [4, 1]) against the float64
  softmax over the whole sequence (`test_context_parallel_sinks`): outputs and the gradients
  of q, k, v and the sinks' logits, with grouped queries, windows and document masks.
- A GPT at CP 4 and TP 2 x CP 2 equals one process on the same weights (per-token losses and
  every gradient, `test_context_parallel`'s check).
- The config's rules, the Megatron flag, and the estimate's exchanges over each level.
"""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from test_context_parallel import _check_against_one_process
from test_context_parallel_sinks import HEADS, _check_core

from mp import parallel_state as ps
from mp.config import parse_args
from mp.estimate import Setup, collectives
from mp.model import TransformerConfig

TINY = "configs/gpt-tiny.yaml"


def test_groups_follow_megatrons_rule():
    """A CP group ``[r0 .. r3]`` at ``[2, 2]``: a2a ``[r0, r1]``, ``[r2, r3]``; p2p ``[r0,
    r2]``, ``[r1, r3]`` (Megatron-Core's ``create_hierarchical_groups``); no groups unless
    asked."""
    alone = ps.rank_layout(4, context_parallel_size=4, hierarchical_context_parallel_sizes=[2, 2])
    assert alone.hierarchical_context == ([[0, 1], [2, 3]], [[0, 2], [1, 3]])
    tp2 = ps.rank_layout(8, 2, context_parallel_size=4, hierarchical_context_parallel_sizes=[2, 2])
    assert tp2.context == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert tp2.hierarchical_context == ([[0, 2], [1, 3], [4, 6], [5, 7]],
                                        [[0, 4], [1, 5], [2, 6], [3, 7]])
    dp2 = ps.rank_layout(8, context_parallel_size=4, hierarchical_context_parallel_sizes=[2, 2])
    assert dp2.context == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert dp2.hierarchical_context == ([[0, 1], [2, 3], [4, 5], [6, 7]],
                                        [[0, 2], [1, 3], [4, 6], [5, 7]])
    assert ps.rank_layout(8, context_parallel_size=4).hierarchical_context == ()
    with pytest.raises(ValueError, match=r"hierarchical_context_parallel_sizes=\[2, 1\] "
                                         "multiply to 2, not context_parallel_size=4"):
        ps.rank_layout(4, context_parallel_size=4, hierarchical_context_parallel_sizes=[2, 1])


def _live_groups() -> list[list[int]]:
    """Each hierarchical group's rank sum (all-reduced over it) and size, for this rank."""
    with pytest.raises(RuntimeError, match="without hierarchical_context_parallel_sizes"):
        ps.initialize_model_parallel(context_parallel_size=4)
        ps.get_hierarchical_context_parallel_groups()
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(context_parallel_size=4,
                                 hierarchical_context_parallel_sizes=[2, 2])
    found = []
    for group in ps.get_hierarchical_context_parallel_groups():
        t = torch.tensor([dist.get_rank()])
        dist.all_reduce(t, group=group)
        found.append([t.item(), dist.get_world_size(group)])
    return found


def test_the_getter_gives_the_a2a_group_then_the_p2p_group():
    # rank r: a2a group {r - r % 2, .. + 1}, p2p group {r % 2, r % 2 + 2}
    assert run_distributed(4, _live_groups) == [[[1, 2], [2, 2]], [[1, 2], [4, 2]],
                                                [[5, 2], [2, 2]], [[5, 2], [4, 2]]]


A2A_P2P = {  # name -> (cp_comm_type, backend, softmax_type, groups, window, documents)
    "learnable_sdpa": ("a2a+p2p", "sdpa", "learnable", HEADS, None, False),
    "learnable_unfused_gqa_window": ("a2a+p2p", "unfused", "learnable", 2, 5, False),
    "off_by_one_gqa_documents_window": ("a2a+p2p", "sdpa", "off-by-one", 2, 3, True),
}


@pytest.mark.parametrize("sizes", [[2, 2], [1, 4], [4, 1]], ids=["2x2", "1x4", "4x1"])
def test_core_equals_the_float64_softmax(sizes):
    """Windows of 3 and 5 earlier keys cross the 2-token chunks; at [4, 1] the key/value
    groups (2) do not divide by A = 4, so the cases keep theirs whole."""
    cases = A2A_P2P if sizes[0] < 4 else {name: (*case[:3], HEADS, *case[4:])
                                         for name, case in A2A_P2P.items()}
    run_distributed(4, _check_core, cases, 4, sizes)


SINKS_ROPE_GQA = {"softmax_type": "learnable", "position_embedding_type": "rope",
                  "num_attention_heads": 8, "num_query_groups": 2}


@pytest.mark.parametrize("tp,sizes,overrides,documents", [
    (1, [2, 2], {}, False),
    (1, [2, 2], {"attention_backend": "unfused", "window_size": [3, 0]}, True),
    (1, [2, 2], {**SINKS_ROPE_GQA, "window_size": [5, 0], "window_attn_skip_freq": [1, 0]},
     False),
    (1, [1, 4], {"softmax_type": "off-by-one"}, True),
    (1, [4, 1], {}, False),
    (2, [2, 1], {**SINKS_ROPE_GQA, "num_query_groups": 4, "sequence_parallel": True}, False),
], ids=["cp4_2x2", "cp4_2x2_unfused_window_documents", "cp4_2x2_sinks_rope_gqa_window",
        "cp4_1x4_off_by_one_documents", "cp4_4x1", "tp2_cp2_2x1_sinks_rope_gqa_sp"])
def test_gpt_equals_one_process(tp, sizes, overrides, documents):
    cp = sizes[0] * sizes[1]
    overrides = {**overrides, "cp_comm_type": "a2a+p2p",
                 "hierarchical_context_parallel_sizes": sizes}
    run_distributed(tp * cp, _check_against_one_process, tp, cp, overrides, documents)


def _config(**overrides) -> TransformerConfig:
    kw = dict(num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=16,
              attention_dropout=0.0, context_parallel_size=4, cp_comm_type="a2a+p2p",
              hierarchical_context_parallel_sizes=[2, 2])
    return TransformerConfig(**{**kw, **overrides})


@pytest.mark.parametrize("overrides,match", [
    ({"hierarchical_context_parallel_sizes": [2, 1]},
     r"hierarchical_context_parallel_sizes=\[2, 1\] multiply to 2, not context_parallel_size=4"),
    ({"hierarchical_context_parallel_sizes": [4, 1], "num_query_groups": 2},
     r"num_query_groups=2 is not divisible by tensor_model_parallel_size x "
     r"hierarchical_context_parallel_sizes\[0\] \(cp_comm_type='a2a\+p2p'\)=4"),
    ({"tensor_model_parallel_size": 4},
     r"num_attention_heads=4 is not divisible by tensor_model_parallel_size x "
     r"hierarchical_context_parallel_sizes\[0\] \(cp_comm_type='a2a\+p2p'\)=8"),
    ({"cp_comm_type": "p2p"}, r"hierarchical_context_parallel_sizes=\[2, 2\] needs "
                              r"cp_comm_type='a2a\+p2p', not 'p2p'"),
    ({"hierarchical_context_parallel_sizes": None},
     r"cp_comm_type='a2a\+p2p' needs hierarchical_context_parallel_sizes \[A, P\] with A x P "
     r"= context_parallel_size=4"),
    ({"hierarchical_context_parallel_sizes": [2, 2, 1]},
     r"hierarchical_context_parallel_sizes=\[2, 2, 1\] must be two sizes \[A, P\]"),
    ({"hierarchical_context_parallel_sizes": [0, 4]},
     r"hierarchical_context_parallel_sizes=\[0, 4\] must be a list of positive integers"),
    ({"attention_dropout": 0.1}, r"cp_comm_type='a2a\+p2p' needs attention_dropout=0, not 0.1"),
], ids=["product", "groups_by_a", "heads_by_tp_a", "other_comm_type", "missing", "three",
        "zero", "dropout"])
def test_config_refuses(overrides, match):
    with pytest.raises(ValueError, match=match):
        _config(**overrides)


def test_megatron_flags_and_the_estimate():
    cfg = parse_args(["--config", TINY, "--tensor-model-parallel-size", "1",
                      "--context-parallel-size", "4", "--cp-comm-type", "a2a+p2p",
                      "--hierarchical-context-parallel-sizes", "2", "2"], world_size=4)
    assert cfg.model.cp_comm_type == "a2a+p2p"
    assert cfg.model.hierarchical_context_parallel_sizes == [2, 2]
    setup = Setup(_config(), data_parallel_size=1, micro_batch_size=1, num_microbatches=1)
    # the all-to-alls over the a2a group, the ring over the p2p group
    # (tests/test_estimate_hierarchical_cp.py checks the bytes)
    assert {(c.kind, c.group) for c in collectives(setup, 0) if c.group.startswith("cp_")} == {
        ("all_to_all", "cp_a2a"), ("send", "cp_p2p"), ("recv", "cp_p2p")}
