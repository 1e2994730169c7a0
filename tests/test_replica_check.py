"""`check_param_hashes_across_dp_replicas` (Megatron's
``--check-weight-hash-across-dp-replicas-interval``): trained replicas agree (with the
distributed optimizer's all-gathers still in flight, with experts that differ across
expert-parallel ranks); one element changed on one rank makes every rank raise, the ranks
of the drifted group naming the parameter and who holds which version; the pretraining job
runs the check at its interval."""

import pytest
import torch
import torch.distributed as dist
from gpt_runs import setup, train_step
from harness import run_distributed

from mp import parallel_state as ps
from mp.config import JobConfig
from mp.distributed.replica_check import (
    ReplicaMismatchError,
    check_param_hashes_across_dp_replicas,
    param_digests,
)
from mp.training import training as loop
from mp.training.pretrain import pretrain


def test_digests_are_sha256_of_the_bytes():
    import hashlib

    t = torch.arange(6, dtype=torch.float32).view(2, 3)
    digests = param_digests([t, t[:, 1:]])
    assert bytes(digests[0].tolist()) == hashlib.sha256(t.numpy().tobytes()).digest()
    assert bytes(digests[1].tolist()) == hashlib.sha256(t[:, 1:].numpy().tobytes()).digest()
    assert not torch.equal(digests[0], param_digests([t + 1e-7])[0])


def _drift(tp: int, ep: int, name_part: str, drifting_rank: int, overrides: dict):
    """Train two steps, check (must pass), change one element of the first parameter whose
    name holds ``name_part`` on ``drifting_rank``, check again: returns every rank's error."""
    models, optimizer, scheduler = setup(tp, 1, seed=5, distributed_optimizer=True, ep=ep,
                                         **overrides)
    for seed in (1, 2):
        train_step(models, optimizer, scheduler, seed)
    check_param_hashes_across_dp_replicas(models, 2)  # the last all-gathers are in flight
    name, param = next((n, p) for n, p in models[0].named_parameters() if name_part in n)
    if dist.get_rank() == drifting_rank:
        with torch.no_grad():
            param.view(-1)[0] += 1e-6
    with pytest.raises(ReplicaMismatchError) as error:
        check_param_hashes_across_dp_replicas(models, 3)
    return name, str(error.value)


def test_a_drifted_replica_stops_every_rank():
    """TP 2 x DP 2: rank 3 (DP peer of rank 1) drifts; ranks 1 and 3 name it, 0 and 2 say
    another group did."""
    results = run_distributed(4, _drift, 2, 1, "linear_fc2.weight", 3, {})
    name = results[0][0]
    for rank, (_, message) in enumerate(results):
        assert message.startswith("iteration 3: the data-parallel replicas hold different "
                                  f"weights (rank {rank}):")
        if rank in (1, 3):
            assert f"{name}: ranks [1] vs ranks [3]" in message
        else:
            assert "another data-parallel group's ranks name theirs" in message


def test_experts_are_compared_within_their_expert_data_parallel_group():
    """EP 2 over 4 ranks: ranks 0 and 1 hold different experts (no false alarm), rank 2
    holds rank 0's; a drift of rank 2's expert weight is named against rank 0."""
    moe = {"num_moe_experts": 4, "moe_router_topk": 2, "moe_aux_loss_coeff": 1e-2}
    results = run_distributed(4, _drift, 1, 2, "experts", 2, moe)
    name = results[0][0]
    assert f"{name}: ranks [0] vs ranks [2]" in results[0][1]
    assert f"{name}: ranks [0] vs ranks [2]" in results[2][1]
    assert "another data-parallel group's ranks name theirs" in results[1][1]


def _job(interval: int | None, drift_at: int):
    """The pretraining job, 4 iterations of a one-layer GPT on mock data at DP 2, checking
    every ``interval``; rank 1's first weight drifts in iteration ``drift_at``."""
    cfg = JobConfig.from_dict({
        "model": {"num_layers": 1, "hidden_size": 16, "num_attention_heads": 2,
                  "vocab_size": 64, "seq_length": 8, "make_vocab_size_divisible_by": 16,
                  "hidden_dropout": 0.0, "attention_dropout": 0.0},
        "training": {"micro_batch_size": 1, "global_batch_size": 2, "train_iters": 4,
                     "lr": 1e-3, "eval_iters": 0, "seed": 5,
                     "check_weight_hash_across_dp_replicas_interval": interval},
        "data": {"mock_data": True, "num_workers": 0},
        "logging": {"progress": False}})
    cfg.validate(2)
    ps.initialize_model_parallel(1)
    step = loop.train_step

    def drifting_step(forward, iterator, model, *args, **kwargs):
        out = step(forward, iterator, model, *args, **kwargs)
        state = drifting_step.iteration = getattr(drifting_step, "iteration", 0) + 1
        if state == drift_at and dist.get_rank() == 1:
            with torch.no_grad():
                next(model[0].parameters()).view(-1)[0] += 1.0
        return out

    loop.train_step = drifting_step
    try:
        pretrain(cfg)
    except ReplicaMismatchError as error:
        return str(error)
    finally:
        loop.train_step = step
    return None


@pytest.mark.parametrize("interval, drift_at, stopped_at", [
    (2, 3, 4), (1, 1, 1), (None, 1, None)])
def test_the_job_checks_at_its_interval(interval, drift_at, stopped_at):
    results = run_distributed(2, _job, interval, drift_at)
    for message in results:
        if stopped_at is None:
            assert message is None
        else:
            assert message.startswith(f"iteration {stopped_at}: the data-parallel replicas")
