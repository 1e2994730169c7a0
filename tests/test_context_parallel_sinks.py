"""Attention sinks (``softmax_type`` off-by-one and learnable) under context parallelism's
``p2p`` (ring attention: the sink joins the merged log-sum-exp) and ``a2a`` (each CP rank
attends with its share of the heads' sink logits): the core at CP 2 against the float64
softmax written out query by query over the whole sequence (outputs, the gradients of q, k,
v and of the learned logits, summed over CP as the DP x CP reduction does), with windows,
grouped queries and document masks; and a GPT at CP 2 and TP 2 x CP 2 against one process
on the same weights."""

import pytest
import torch
import torch.distributed as dist
from checks import assert_rel_close, seeded
from harness import run_distributed
from test_context_parallel import _check_against_one_process
from test_sliding_window import _reference

from mp import parallel_state as ps
from mp.model import TransformerConfig
from mp.model.attention import CoreAttention
from mp.model.attention_masks import mask_for_layers
from mp.model.context_parallel import local_positions

S, B, HEADS, D = 16, 2, 4, 8  # HEADS and D as test_sliding_window's reference takes them

CORE_CASES = {  # name -> (cp_comm_type, backend, softmax_type, groups, window, documents)
    "p2p_learnable": ("p2p", "sdpa", "learnable", HEADS, None, False),
    "p2p_learnable_gqa_window": ("p2p", "sdpa", "learnable", 2, 5, False),
    "p2p_off_by_one_documents_window": ("p2p", "sdpa", "off-by-one", HEADS, 3, True),
    "a2a_learnable_sdpa": ("a2a", "sdpa", "learnable", HEADS, None, False),
    "a2a_learnable_unfused_gqa_window": ("a2a", "unfused", "learnable", 2, 5, False),
    "a2a_off_by_one_sdpa_gqa_documents": ("a2a", "sdpa", "off-by-one", 2, None, True),
}


def _documents() -> torch.Tensor:
    """``[1, 1, s, s]``, True = masked: causal, and a document that ends after token 6."""
    positions, keys = torch.arange(S)[:, None], torch.arange(S)
    return ((keys > positions) | ((positions > 6) & (keys <= 6)))[None, None]


def _check_core(cases: dict = CORE_CASES, cp: int = 2, sizes: list[int] | None = None):
    """``cases`` at CP ``cp`` (``sizes``: a2a+p2p's)."""
    ps.initialize_model_parallel(1, context_parallel_size=cp,
                                 hierarchical_context_parallel_sizes=sizes)
    group = ps.get_context_parallel_group()
    positions = local_positions(S, cp, ps.get_context_parallel_rank())
    for name, (comm, backend, kind, groups, window, documents) in cases.items():
        cfg = TransformerConfig(num_layers=1, hidden_size=HEADS * D, num_attention_heads=HEADS,
                                num_query_groups=groups, vocab_size=64, seq_length=S,
                                attention_dropout=0.0, attention_backend=backend,
                                softmax_type=kind, context_parallel_size=cp, cp_comm_type=comm,
                                hierarchical_context_parallel_sizes=sizes)
        core = CoreAttention(cfg, window)
        sinks = torch.zeros(HEADS, dtype=torch.float64)
        if kind == "learnable":  # logits that matter beside scores of O(1)
            with torch.no_grad():
                core.softmax_offset.copy_(seeded((HEADS,), 5, scale=1.5))
            sinks = core.softmax_offset.detach().double().requires_grad_()
        g = torch.Generator().manual_seed(len(name))
        full = [torch.randn(S, B, n, D, generator=g, dtype=torch.float64)
                for n in (HEADS, groups, groups)]
        local = [t[positions].float().requires_grad_() for t in full]
        mask = _documents() if documents else None
        given = None if mask is None else mask_for_layers(
            mask[:, :, positions].expand(B, 1, -1, -1), cfg, torch.float32)
        out = core(*local, given)
        probe = torch.randn(S, B, HEADS * D, generator=g, dtype=torch.float64)
        (out * probe[positions]).sum().backward()

        full = [t.requires_grad_() for t in full]
        expected = _reference(*full, window, None if mask is None else mask[0, 0], sinks)
        assert_rel_close(out, expected[positions], what=f"{name}: output")
        (expected * probe).sum().backward()
        for label, mine, theirs in zip("qkv", local, full):
            assert_rel_close(mine.grad, theirs.grad[positions], what=f"{name}: grad of {label}")
        if kind == "learnable":  # each CP rank holds its part: its rows (p2p), heads (a2a)
            grad = core.softmax_offset.grad.clone()
            dist.all_reduce(grad, group=group)
            assert_rel_close(grad, sinks.grad, what=f"{name}: grad of the sink logits")


def test_sinks_under_p2p_and_a2a_equal_the_float64_softmax():
    run_distributed(2, _check_core)


SINKS = {"softmax_type": "learnable"}  # logits drawn from N(0, init_method_std)


@pytest.mark.parametrize("tp,overrides", [
    (1, {**SINKS, "cp_comm_type": "p2p", "position_embedding_type": "rope",
         "num_attention_heads": 8, "num_query_groups": 2, "window_size": [5, 0],
         "window_attn_skip_freq": [1, 0]}),
    (1, {"softmax_type": "off-by-one", "cp_comm_type": "a2a", "attention_backend": "unfused"}),
    (2, {**SINKS, "cp_comm_type": "a2a", "num_attention_heads": 8, "sequence_parallel": True}),
    (2, {**SINKS, "cp_comm_type": "p2p", "position_embedding_type": "rope"}),
], ids=["p2p_learnable_rope_gqa_window", "a2a_off_by_one_unfused", "tp2_a2a_learnable_sp",
        "tp2_p2p_learnable_rope"])
def test_gpt_with_sinks_and_context_parallelism_equals_one_process(tp, overrides):
    """Per-token losses and every gradient (the sinks' logits' included) at CP 2."""
    run_distributed(2 * tp, _check_against_one_process, tp, 2, overrides, False)
