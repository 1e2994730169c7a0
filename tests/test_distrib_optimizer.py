"""The distributed optimizer against the plain one, and its memory against Megatron's formula.

Training the same GPT from the same weights on the same batches, with fp32 masters and AdamW
moments sharded over the data-parallel ranks or not, must give the same losses and weights
(to 1e-6: only the order of floating-point sums may differ), with and without overlapping
the parameter all-gather, with gradient clipping active, at TP2 x DP2, DP4 and PP2 x DP2 (tied
embeddings split across stages, whose gradient is all-reduced rather than reduce-scattered)
and TP2 x DP2 with sequence parallelism in bf16 (the norms' partial gradients are summed over
TP after the reduce-scatter).
The optimizer state one rank holds is counted tensor by tensor and checked against the bytes
per parameter of Megatron's distributed-optimizer table.
"""

import pytest
import torch
import torch.distributed as dist
from checks import assert_rel_close
from gpt_runs import assemble, gpt_config, masters, pieces, setup, train_step
from harness import run_distributed
from torch import nn

from mp import parallel_state as ps
from mp.distributed import DistributedDataParallel
from mp.estimate import Setup, rank_params, state_bytes
from mp.optim import DistributedOptimizer, get_param_groups

STEPS = 5


def _train(tp: int, pp: int, distributed_optimizer: bool, precision: str, overlap: bool,
           clip_grad: float) -> dict:
    models, optimizer, scheduler = setup(
        tp, pp, seed=1, precision=precision, distributed_optimizer=distributed_optimizer,
        overlap_param_gather=overlap, bucket_size=3001, clip_grad=clip_grad,
        sequence_parallel=precision == "bf16")
    losses, norms = zip(*(train_step(models, optimizer, scheduler, step)
                          for step in range(STEPS)))
    return {"losses": losses, "norms": norms, "weights": pieces(models),
            "masters": masters(models, optimizer)}


# bf16 runs without clipping: the gradient norm sums the same squares in another order
# (shards over every rank instead of whole tensors over TP x PP), which moves it by ~1e-7;
# clipping would carry that into the masters and bf16 rounding of the weights would amplify it.
@pytest.mark.parametrize("tp,pp,precision,overlap,clip", [
    (2, 1, "fp32", True, 0.5), (1, 1, "fp32", False, 0.5), (1, 2, "fp32", True, 0.5),
    (2, 1, "bf16", True, 0.0)],
    ids=["TP2xDP2", "DP4-no-overlap", "PP2xDP2-tied", "TP2xDP2-SP-bf16"])
def test_matches_the_plain_optimizer(tp, pp, precision, overlap, clip):
    plain = run_distributed(4, _train, tp, pp, False, precision, overlap, clip)
    sharded = run_distributed(4, _train, tp, pp, True, precision, overlap, clip)
    expected, got = plain[0], sharded[0]
    assert clip == 0 or max(expected["norms"]) > clip, "clipping never acted"
    for step, (want, have) in enumerate(zip(expected["losses"], got["losses"])):
        assert abs(have - want) <= 1e-6 * abs(want), f"step {step}: loss {have} vs {want}"
    for key in ("norms",):
        assert_rel_close(torch.tensor(got[key]), torch.tensor(expected[key]), rtol=1e-6,
                         what="gradient norms")
    for kind in ("weights", "masters"):
        want, have = (assemble([r[kind] for r in runs]) for runs in (plain, sharded))
        assert want.keys() == have.keys()
        for name in want:
            assert_rel_close(have[name].float(), want[name].float(), rtol=1e-6,
                             what=f"{kind} {name}")


def _state_bytes(precision: str, cp: int = 1) -> dict:
    """Optimizer bytes this rank holds, counted tensor by tensor after one step, and the
    elements of the model it updates (its shards are over DP x CP)."""
    models, optimizer, scheduler = setup(1, 1, seed=1, precision=precision, cp=cp,
                                         distributed_optimizer=True, bucket_size=2999)
    train_step(models, optimizer, scheduler, 0)
    held = 0
    for shard in optimizer.shards:
        state = optimizer.optimizer.state[shard.main]
        held += sum(t.numel() * t.element_size() for t in state.values())  # moments, step
        if not shard.main_is_param:
            held += shard.main.numel() * shard.main.element_size()
    owned = sum(s.end - s.start for s in optimizer.shards)
    local = sum(p.numel() for m in models for p in m.module.parameters())
    weights = sum(p.numel() * p.element_size() for m in models for p in m.module.parameters())
    grads = sum(m.grad_buffer.numel() * 4 for m in models)
    return {"held": held, "owned": owned, "shards": len(optimizer.shards), "local": local,
            "weights": weights, "grads": grads, "dp": ps.get_data_parallel_world_size(),
            "padding": sum(m.grad_buffer.numel() for m in models) - local}


@pytest.mark.parametrize("world,cp", [(1, 1), (2, 1), (4, 1), (4, 2)],
                         ids=["DP1", "DP2", "DP4", "DP2xCP2"])
@pytest.mark.parametrize("precision,per_element", [("bf16", 12), ("fp32", 8)])
def test_optimizer_bytes_per_parameter_follow_megatrons_table(world, cp, precision,
                                                              per_element):
    """bf16: 2 + 4 + 12/d bytes per parameter; fp32: 4 + 4 + 8/d (plus AdamW's 4-byte step
    counter per shard, and at most d - 1 elements of padding per bucket), ``d`` = DP x CP."""
    ranks = run_distributed(world, _state_bytes, precision, cp)
    local = ranks[0]["local"]
    assert sum(r["owned"] for r in ranks) == local  # every element updated exactly once
    for r in ranks:
        assert r["held"] == per_element * r["owned"] + 4 * r["shards"]
        assert r["weights"] == local * (2 if precision == "bf16" else 4)
        assert r["grads"] == (local + r["padding"]) * 4
        assert abs(r["owned"] - local / world) <= r["padding"]
    config = gpt_config(1, 1, precision, context_parallel_size=cp)
    estimate = state_bytes(Setup(model=config, data_parallel_size=world // cp,
                                 distributed_optimizer=True), rank_params(config, 0))
    assert estimate.weights + estimate.grads == ranks[0]["weights"] + 4 * local
    for r in ranks:  # the estimate leaves out padding and step counters
        assert abs(r["held"] - estimate.optimizer) <= per_element * r["padding"] \
            + 4 * r["shards"]


def _refusals() -> list[str]:
    ps.initialize_model_parallel(1, 1)
    messages = []
    plain = DistributedDataParallel(nn.Linear(4, 4))
    try:
        DistributedOptimizer(get_param_groups([plain], 0.0), [plain], lr=1e-3)
    except ValueError as error:
        messages.append(str(error))
    mixed = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).to(torch.bfloat16))
    try:
        DistributedDataParallel(mixed, use_distributed_optimizer=True)
    except ValueError as error:
        messages.append(str(error))
    dist.barrier()
    return messages


def test_refusals_name_the_problem():
    messages = run_distributed(2, _refusals)[0]
    assert len(messages) == 2
    assert "use_distributed_optimizer=True" in messages[0]
    assert "one dtype" in messages[1] and "torch.bfloat16" in messages[1]
