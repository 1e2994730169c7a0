"""The estimate of hierarchical context parallelism (``cp_comm_type="a2a+p2p"``, ``[A, P]``)
against what the code does.

- Collectives: every ``torch.distributed`` call of one `train_step` (two micro-batches,
  forward and backward, gradient reduction, optimizer step) counted per kind and group
  (`CollectiveMeter`) equals the estimate exactly: the all-to-alls over each a2a group
  (``cp_a2a``), the ring's sends and receives over each p2p group (``cp_p2p``), at CP 4
  ``[2, 2]`` (plain; full recompute with grouped queries; selective ``core_attn``) and TP 2
  x CP 2 ``[2, 1]`` (sequence parallelism: ``a2a`` over the whole CP group). With a document
  mask the one call more is its rows' all-gather over the a2a group, ``b s / P`` bools a
  micro-batch, which the estimate does not count (docs/estimate.md, Limits).
- Activations: the bytes one layer (a two-layer chunk under full recompute) saves for
  backward on every rank of CP 4 ``[2, 2]``, counted with saved-tensor hooks, equal the CPU
  estimate to the byte, with and without sinks (`test_estimate_activations`' cases).
"""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed
from test_estimate_activations import BLOCK_CASES, LAYER_CASES, B, _saved_bytes
from test_estimate_activations import _config as _layer_config
from test_estimate_comm import MBS, _group_ranks
from test_estimate_comm import _config as _comm_config

from mp import parallel_state as ps
from mp.distributed import DistributedDataParallel
from mp.estimate import (
    CPU,
    CollectiveMeter,
    Setup,
    collectives,
    estimate,
    gpu_spec,
    layer_terms,
)
from mp.estimate.collective import group_bandwidth, group_size, seconds
from mp.estimate.memory import chunk_saved_bytes
from mp.model.stages import build_gpt_chunks
from mp.model.transformer import TransformerBlock, TransformerLayer
from mp.optim import OptimizerParamScheduler, get_megatron_optimizer
from mp.tensor_parallel import model_parallel_cuda_manual_seed
from mp.training.gpt_step import forward_step as gpt_forward_step
from mp.training.training import train_step

WORLD, MICROBATCHES = 4, 2


def _micro_batches(cfg, documents: bool) -> list[dict]:
    """``MICROBATCHES`` batches of ``MBS`` sequences; with ``documents`` a document ends
    after token 5 of every sequence (a boolean mask, True: masked)."""
    s = cfg.seq_length
    gen = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(MICROBATCHES):
        ids = torch.randint(0, cfg.vocab_size, (MBS, s + 1), generator=gen)
        batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(MBS, s),
                 "position_ids": torch.arange(s).expand(MBS, -1)}
        if documents:
            document = (torch.arange(s) > 5).long()
            mask = torch.ones(s, s, dtype=torch.bool).triu(1) \
                | (document[:, None] != document[None, :])
            batch["attention_mask"] = mask.expand(MBS, 1, s, s)
        batches.append(batch)
    return batches


def _one_iteration(tp: int, sizes: list[int], overrides: dict, documents: bool
                   ) -> tuple[dict, dict]:
    """Measured and estimated bytes per (kind, group ranks) of one `train_step` on this rank
    of TP ``tp`` x CP ``A x P`` (DP the rest)."""
    cp = sizes[0] * sizes[1]
    ps.initialize_model_parallel(tp, context_parallel_size=cp,
                                 hierarchical_context_parallel_sizes=sizes)
    model_parallel_cuda_manual_seed(1)
    torch.manual_seed(0)
    cfg = _comm_config(tp, context_parallel_size=cp, cp_comm_type="a2a+p2p",
                       hierarchical_context_parallel_sizes=sizes, attention_dropout=0.0,
                       **overrides)
    models = [DistributedDataParallel(chunk, bucket_size=2000) for chunk in build_gpt_chunks(cfg)]
    opt = get_megatron_optimizer(models, lr=1e-3)
    scheduler = OptimizerParamScheduler(opt, max_lr=1e-3, lr_decay_steps=10)
    with CollectiveMeter() as meter:
        train_step(gpt_forward_step, [iter(_micro_batches(cfg, documents))], models, opt,
                   scheduler, num_microbatches=MICROBATCHES, seq_length=cfg.seq_length,
                   micro_batch_size=MBS)
    ranks = _group_ranks()
    if sizes[0] > 1 and sizes[1] > 1:
        a2a, p2p = ps.get_hierarchical_context_parallel_groups()
        ranks["cp_a2a"], ranks["cp_p2p"] = (tuple(dist.get_process_group_ranks(g))
                                            for g in (a2a, p2p))
    setup = Setup(cfg, data_parallel_size=WORLD // (tp * cp), micro_batch_size=MBS,
                  num_microbatches=MICROBATCHES)
    expected: dict = {}
    for c in collectives(setup, 0):
        key = (c.kind, ranks[c.group])
        expected[key] = expected.get(key, 0) + c.bytes
    return meter.totals(), expected


HIERARCHICAL = {  # name -> (tp, [A, P], overrides, document mask)
    "cp4_2x2": (1, [2, 2], {}, False),
    "cp4_2x2_full_recompute_grouped": (1, [2, 2], dict(
        num_query_groups=2, recompute_granularity="full", recompute_method="uniform"), False),
    "cp4_2x2_core_attn_recompute_documents": (1, [2, 2], dict(
        recompute_granularity="selective", recompute_modules=["core_attn"]), True),
    "tp2_cp2_2x1_sp": (2, [2, 1], dict(sequence_parallel=True), False),
}


@pytest.mark.parametrize("variant", list(HIERARCHICAL))
def test_collective_bytes_of_one_iteration(variant):
    tp, sizes, overrides, documents = HIERARCHICAL[variant]
    results = run_distributed(WORLD, _one_iteration, tp, sizes, overrides, documents)
    p = sizes[1]
    for rank, (measured, expected) in enumerate(results):
        a2a = (rank - rank % (2 * tp) + rank % tp, rank - rank % (2 * tp) + rank % tp + tp)
        assert any(kind == "all_to_all" and group == a2a for kind, group in measured), rank
        if documents:  # the mask's rows of the a2a group's tokens, bools, a micro-batch
            rows = MICROBATCHES * MBS * (16 // p) * 16
            assert measured.pop(("all_gather", a2a)) == rows, f"rank {rank}"
        assert measured == expected, f"rank {rank}"


SINK_CASES = [name for name in LAYER_CASES if "sinks" in name]
CASES = ["unfused", "sdpa_flash", "sdpa_selective", "gqa_unfused", "gqa_unfused_rope",
         "rmsnorm_swiglu_rope_gqa", *SINK_CASES]


def _layer_case(name: str) -> tuple[dict, int]:
    """(config overrides at CP 4 [2, 2], layers) of `test_estimate_activations`' case."""
    overrides, layers = (LAYER_CASES[name], 1) if name in LAYER_CASES else (BLOCK_CASES[name], 2)
    return {**overrides, "cp": 4, "cp_comm_type": "a2a+p2p", "attention_dropout": 0.0,
            "hierarchical_context_parallel_sizes": [2, 2]}, layers


def _measure_layers(names: list[str]) -> list[int]:
    ps.initialize_model_parallel(context_parallel_size=4,
                                 hierarchical_context_parallel_sizes=[2, 2])
    model_parallel_cuda_manual_seed(1234)
    results = []
    for name in names:
        overrides, layers = _layer_case(name)
        cfg = _layer_config(1, False, num_layers=layers, **overrides)
        module = TransformerLayer(cfg, 1) if layers == 1 \
            else TransformerBlock(cfg, post_process=False)
        results.append(_saved_bytes(module, cfg))
    return results


def test_saved_bytes_of_a_layer_match_the_estimate():
    """The exchanged q, k, v (``s / P`` tokens of ``a / A`` heads), the ring's output before
    its exchange back and its log-sum-exp; off-by-one's zero logits; the rank's share of
    every per-token tensor."""
    names = CASES + ["full_uniform_rope"]
    measured = run_distributed(WORLD, _measure_layers, names)
    failures = []
    for name, *got in zip(names, *measured):
        overrides, layers = _layer_case(name)
        cfg = _layer_config(1, False, num_layers=layers, **overrides)
        expected = sum(layer_terms(cfg, B, CPU).values()) if layers == 1 \
            else chunk_saved_bytes(cfg, B, CPU)
        if got != [expected] * WORLD:
            failures.append(f"{name}: measured {got} B, estimated {expected:.0f} B")
    assert not failures, "\n".join(failures)


def test_the_estimate_refuses_multi_latent_attention():
    cfg = _layer_config(1, False, cp=4, cp_comm_type="a2a+p2p", attention_dropout=0.0,
                        hierarchical_context_parallel_sizes=[2, 2], multi_latent_attention=True,
                        kv_lora_rank=16, qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=16,
                        position_embedding_type="rope")
    with pytest.raises(ValueError, match="multi_latent_attention with cp_comm_type='a2a"):
        layer_terms(cfg, B, CPU)


def test_each_level_crosses_its_own_link():
    """TP 4 x CP 8 [2, 4] on 8-GPU nodes: the a2a group (A x TP = 8 consecutive ranks) shares
    a node, the p2p group (every A x TP-th rank) spans four; the step time takes each
    exchange at its link's bandwidth."""
    cfg = _layer_config(4, True, cp=8, cp_comm_type="a2a+p2p", attention_dropout=0.0,
                        hierarchical_context_parallel_sizes=[2, 4], num_attention_heads=8,
                        seq_length=256)
    setup = Setup(cfg, data_parallel_size=1, micro_batch_size=1, num_microbatches=1)
    gpu = gpu_spec("h100")
    assert (group_size(setup, "cp_a2a"), group_size(setup, "cp_p2p")) == (2, 4)
    assert group_bandwidth(setup, "cp_a2a", gpu) == gpu.intra_node_gbps * 1e9
    assert group_bandwidth(setup, "cp_p2p", gpu) == gpu.inter_node_gbps * 1e9
    cp = [c for c in collectives(setup, 0) if c.group.startswith("cp")]
    assert estimate(setup, gpu).step.cp_comm == pytest.approx(
        sum(seconds(setup, c, gpu) for c in cp))
