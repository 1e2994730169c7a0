"""Communication: the bytes of every ``torch.distributed`` call in one training iteration
(micro-batches forward and backward, gradient reduction, optimizer step), counted per kind and
group by wrapping the collectives, equal the estimate exactly. TP 2 x DP 2 and TP 1 x DP 4 on
4 ranks; pipeline parallelism is formula only until mp has it."""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from mp import parallel_state as ps
from mp.distributed import DistributedDataParallel, finalize_model_grads
from mp.estimate import CollectiveMeter, Setup, collectives
from mp.model import GPTModel, TransformerConfig
from mp.optim import get_megatron_optimizer
from mp.tensor_parallel import model_parallel_cuda_manual_seed

WORLD, MICROBATCHES, MBS = 4, 2, 2

VARIANTS = {
    "plain": {},
    "sequence_parallel": dict(sequence_parallel=True),
    "sp_swiglu_rope_rms_untied": dict(sequence_parallel=True, activation="swiglu",
                                      position_embedding_type="rope", normalization="RMSNorm",
                                      untie_embeddings_and_output_weights=True),
    "full_recompute": dict(recompute_granularity="full", recompute_method="uniform"),
    "sp_block_recompute_distributed": dict(sequence_parallel=True, recompute_granularity="full",
                                           recompute_method="block", recompute_num_layers=1,
                                           distribute_saved_activations=True),
    "selective_bf16": dict(recompute_granularity="selective", precision="bf16"),
}


def _config(tp: int, **overrides) -> TransformerConfig:
    kw = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=200,
              seq_length=16, make_vocab_size_divisible_by=16, tensor_model_parallel_size=tp)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _group_ranks() -> dict[str, tuple[int, ...]]:
    return {"tp": tuple(ps.get_tensor_model_parallel_ranks()),
            "dp": tuple(ps.get_data_parallel_ranks()),
            "mp": tuple(dist.get_process_group_ranks(ps.get_model_parallel_group()))}


def _one_iteration(tp: int, overrides: dict) -> tuple[dict, dict]:
    """Measured and estimated bytes per (kind, group ranks) for one iteration on this rank."""
    ps.initialize_model_parallel(tp)
    model_parallel_cuda_manual_seed(1)
    torch.manual_seed(0)
    cfg = _config(tp, **overrides)
    model = DistributedDataParallel(GPTModel(cfg), bucket_size=2000)  # several buckets
    opt = get_megatron_optimizer([model], lr=1e-3)
    gen = torch.Generator().manual_seed(ps.get_data_parallel_rank())
    batches = [torch.randint(0, cfg.vocab_size, (MBS, cfg.seq_length), generator=gen)
               for _ in range(MICROBATCHES)]
    with CollectiveMeter() as meter:
        model.zero_grad_buffer()
        for i, ids in enumerate(batches):
            with model.no_sync() if i < MICROBATCHES - 1 else torch.enable_grad():
                (model(ids, labels=ids).float().mean() / MICROBATCHES).backward()
        finalize_model_grads([model])
        opt.step()
    setup = Setup(cfg, data_parallel_size=WORLD // tp, micro_batch_size=MBS,
                  num_microbatches=MICROBATCHES)
    ranks = _group_ranks()
    expected: dict = {}
    for c in collectives(setup):
        key = (c.kind, ranks[c.group])
        expected[key] = expected.get(key, 0) + c.bytes
    return meter.totals(), expected


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tp", [2, 1])
def test_collective_bytes_of_one_iteration(tp, variant):
    if tp == 1 and variant != "plain":
        pytest.skip("TP 1 has no tensor-parallel variants")
    for rank, (measured, expected) in enumerate(run_distributed(WORLD, _one_iteration, tp,
                                                                VARIANTS[variant])):
        assert measured == expected, f"rank {rank}"
