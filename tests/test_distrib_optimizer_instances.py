"""Several distributed-optimizer instances (Megatron-Core's
``--num-distributed-optimizer-instances``).

At DP 4 with N = 2 (and TP 2 x DP 2 x N 2, where an instance is one rank), training from the
same weights on the same batches gives the losses, gradient norms, weights and masters of the
N = 1 run (to 1e-6), with several buckets whose reductions overlap backward. One iteration's
collectives, wrapped, are the expected ones: reduce-scatters and all-gathers over the
instance's ranks only, the reduced shards all-reduced across the instances, the gradient norm
over one instance; their bytes equal `mp.estimate.collectives` exactly, and one rank's optimizer
state is `mp.estimate.state_bytes`' (sharded over DP / N). A checkpoint saved at N = 2 (its
replicated shards stored once) loads at N = 1 and at TP 2 x DP 2 and continues as the saving
run does. Bad counts fail with the rule before any process group exists.
"""

import pytest
import torch
import torch.distributed as dist
from checks import assert_rel_close
from gpt_runs import EPS, LR, assemble, gpt_config, masters, pieces, train_step
from harness import run_distributed
from test_config import TINY
from torch.distributed import distributed_c10d

from mp import parallel_state as ps
from mp.checkpointing import load_checkpoint, save_checkpoint
from mp.checkpointing.storage import read_metadata
from mp.config import ConfigError, TrainingConfig, load_config
from mp.distributed import DistributedDataParallel
from mp.estimate import CollectiveMeter, Setup, collectives, rank_params, state_bytes
from mp.model.stages import build_gpt_chunks
from mp.optim import OptimizerParamScheduler, get_megatron_optimizer
from mp.tensor_parallel import model_parallel_cuda_manual_seed

STEPS = 3


def _setup(tp: int, n: int, seed: int = 1, bucket_size: int | None = 3001):
    ps.initialize_model_parallel(tp, num_distributed_optimizer_instances=n)
    model_parallel_cuda_manual_seed(seed)
    models = [DistributedDataParallel(chunk, bucket_size=bucket_size,
                                      use_distributed_optimizer=True, overlap_param_gather=True,
                                      num_distributed_optimizer_instances=n)
              for chunk in build_gpt_chunks(gpt_config(tp, 1))]
    optimizer = get_megatron_optimizer(models, lr=LR, weight_decay=0.1, clip_grad=0.5,
                                       adam_eps=EPS, use_distributed_optimizer=True)
    scheduler = OptimizerParamScheduler(optimizer, max_lr=LR, min_lr=LR / 10,
                                        lr_warmup_steps=2, lr_decay_steps=20)
    return models, optimizer, scheduler


def _groups() -> dict[str, tuple[int, ...]]:
    inter = ps.get_inter_distributed_optimizer_instance_group()
    return {"intra_dp_cp": tuple(dist.get_process_group_ranks(ps.get_data_parallel_group(
                with_context_parallel=True, partial_data_parallel=True))),
            "inter_dist_opt": () if inter is None else tuple(dist.get_process_group_ranks(inter)),
            "intra_dist_opt": tuple(dist.get_process_group_ranks(
                ps.get_intra_distributed_optimizer_instance_group())),
            "dp": tuple(ps.get_data_parallel_ranks()),
            "tp": tuple(ps.get_tensor_model_parallel_ranks()),
            "mp": tuple(dist.get_process_group_ranks(ps.get_model_parallel_group())),
            "world": tuple(range(dist.get_world_size()))}


def _run(tp: int, n: int) -> dict:
    """``STEPS`` iterations; the first one's collectives wrapped."""
    models, optimizer, scheduler = _setup(tp, n)
    assert len(models[0].buckets) > 2  # several buckets, launched during backward
    with CollectiveMeter() as meter:
        first = train_step(models, optimizer, scheduler, 0)
    losses, norms = zip(first, *(train_step(models, optimizer, scheduler, step)
                                 for step in range(1, STEPS)))
    out = {"losses": losses, "norms": norms, "weights": pieces(models),
           "masters": masters(models, optimizer), "calls": meter.calls, "groups": _groups(),
           "grad_elements": models[0].grad_buffer.numel()}
    ps.destroy_model_parallel()
    return out


def _both(tp: int) -> tuple[dict, dict]:
    return _run(tp, 1), _run(tp, 2)


@pytest.mark.parametrize("tp", [1, 2], ids=["DP4xN2", "TP2xDP2xN2"])
def test_training_matches_one_instance(tp):
    ranks = run_distributed(4, _both, tp)
    one, two = ranks[0]
    assert max(one["norms"]) > 0.5, "clipping never acted"
    for step, (want, have) in enumerate(zip(one["losses"], two["losses"])):
        assert abs(have - want) <= 1e-6 * abs(want), f"step {step}: loss {have} vs {want}"
    assert_rel_close(torch.tensor(two["norms"]), torch.tensor(one["norms"]), rtol=1e-6,
                     what="gradient norms")
    for kind in ("weights", "masters"):
        want, have = (assemble([r[i][kind] for r in ranks]) for i in (0, 1))
        for name in want:
            assert_rel_close(have[name], want[name], rtol=1e-6, what=f"{kind} {name}")
    for rank, (_, run) in enumerate(ranks):
        groups, calls = run["groups"], run["calls"]
        dp = 4 // tp
        assert len(groups["intra_dp_cp"]) == dp // 2 and len(groups["inter_dist_opt"]) == 2
        assert groups["intra_dp_cp"] == tuple(groups["dp"][:dp // 2]) or \
            groups["intra_dp_cp"] == tuple(groups["dp"][dp // 2:])  # consecutive DP ranks
        assert groups["inter_dist_opt"] == tuple(groups["dp"][rank // tp % (dp // 2)::dp // 2])
        kinds = {(kind, ranks_) for kind, ranks_, _ in calls}
        sharded = {k for k in kinds if k[0] in ("reduce_scatter", "all_gather")}
        assert sharded == ({("reduce_scatter", groups["intra_dp_cp"]),
                            ("all_gather", groups["intra_dp_cp"])} if dp // 2 > 1 else set())
        reduced = {g: sum(b for kind, ranks_, b in calls
                          if (kind, ranks_) == ("all_reduce", groups[g]))
                   for g in ("inter_dist_opt", "world")}
        logged = 16  # the loss's all-reduce over DP: two float64 values
        shards = 4 * run["grad_elements"] // (dp // 2)  # fp32: the reduced shard
        assert reduced["inter_dist_opt"] == shards + logged * (dp == 2), f"rank {rank}"
        assert ("all_reduce", groups["intra_dist_opt"]) in kinds  # the norm, one instance
        assert reduced["world"] == logged * (dp == 4)  # no norm over the world


# --- the estimator's bytes, exactly ---------------------------------------------------------

def _estimated_iteration(tp: int, n: int) -> tuple[dict, dict, float, float]:
    models, optimizer, scheduler = _setup(tp, n, bucket_size=None)  # one unpadded bucket
    assert models[0].grad_buffer.numel() == sum(p.numel() for p in models[0].parameters())
    with CollectiveMeter() as meter:
        train_step(models, optimizer, scheduler, 0)
        models[0].finish_param_sync()
    config = models[0].module.config
    setup = Setup(config, data_parallel_size=4 // tp, micro_batch_size=2, num_microbatches=2,
                  distributed_optimizer=True, distributed_optimizer_instances=n)
    groups, expected = _groups(), {}
    for c in collectives(setup, 0, logging=True):
        key = (c.kind, groups[c.group])
        expected[key] = expected.get(key, 0) + c.bytes
    held = sum(t.numel() * t.element_size() for s in optimizer.shards
               for k, t in optimizer.optimizer.state[s.main].items() if k != "step")
    estimate = state_bytes(setup, rank_params(config, 0)).optimizer
    return meter.totals(), expected, held, estimate


@pytest.mark.parametrize("tp", [1, 2], ids=["DP4xN2", "TP2xDP2xN2"])
def test_collective_and_state_bytes_equal_the_estimate(tp):
    for rank, (measured, expected, held, estimate) in enumerate(
            run_distributed(4, _estimated_iteration, tp, 2)):
        assert measured == expected, f"rank {rank}"
        assert held == estimate, f"rank {rank}: optimizer state {held} vs {estimate}"


# --- checkpoints ------------------------------------------------------------------------------

def _save_and_continue(path: str) -> dict:
    models, optimizer, scheduler = _setup(1, 2)
    for step in range(2):
        train_step(models, optimizer, scheduler, step)
    save_checkpoint(path, 2, models, optimizer, scheduler)
    return _continue(models, optimizer, scheduler)


def _continue(models, optimizer, scheduler) -> dict:
    losses = [train_step(models, optimizer, scheduler, step)[0] for step in range(2, 4)]
    return {"losses": losses, "weights": pieces(models)}


def _load_and_continue(path: str, tp: int, n: int) -> dict:
    models, optimizer, scheduler = _setup(tp, n, seed=2)  # other weights before the load
    load_checkpoint(path, models, optimizer, scheduler)
    return _continue(models, optimizer, scheduler)


def test_checkpoint_saved_at_two_instances_loads_anywhere(tmp_path):
    path = str(tmp_path / "save")
    saved = run_distributed(4, _save_and_continue, path)
    metadata = read_metadata(tmp_path / "save" / "iter_0000002")
    for key, entry in metadata.state_dict_metadata.items():  # each element stored once
        if key.startswith("optimizer.") and hasattr(entry, "chunks"):
            stored = sum(torch.Size(c.sizes).numel() for c in entry.chunks)
            assert stored == entry.size.numel(), key
    for tp, n in ((1, 1), (2, 1)):
        loaded = run_distributed(4, _load_and_continue, path, tp, n)
        for step, (want, have) in enumerate(zip(saved[0]["losses"], loaded[0]["losses"])):
            assert abs(have - want) <= 1e-6 * abs(want), f"TP{tp} N{n} step {step}"
        want, have = (assemble([r["weights"] for r in runs]) for runs in (saved, loaded))
        for name in want:
            assert_rel_close(have[name], want[name], rtol=1e-6, what=name)


# --- refusals -------------------------------------------------------------------------------

def _refusals() -> list[str]:
    messages = []
    before = len(distributed_c10d._world.pg_map)
    for kwargs in (dict(num_distributed_optimizer_instances=3),  # 4 % 3
                   dict(num_distributed_optimizer_instances=0),
                   dict(expert_model_parallel_size=4, num_distributed_optimizer_instances=2)):
        try:
            ps.initialize_model_parallel(1, **kwargs)
        except ValueError as error:
            messages.append(str(error))
    assert len(distributed_c10d._world.pg_map) == before  # no group was made
    ps.initialize_model_parallel(1, num_distributed_optimizer_instances=2)
    for kwargs in (dict(num_distributed_optimizer_instances=2),  # no distributed optimizer
                   dict(use_distributed_optimizer=True, num_distributed_optimizer_instances=4)):
        try:
            DistributedDataParallel(torch.nn.Linear(4, 4), **kwargs)
        except ValueError as error:
            messages.append(str(error))
    return messages


def test_bad_counts_fail_before_any_group():
    messages = run_distributed(4, _refusals)[0]
    assert len(messages) == 5, messages
    assert "num_distributed_optimizer_instances=3 does not divide" in messages[0]
    assert "= 4" in messages[0]
    assert "num_distributed_optimizer_instances=0 must be a positive integer" in messages[1]
    assert "expert data-parallel size" in messages[2] and "= 1" in messages[2]
    assert "needs use_distributed_optimizer=True" in messages[3]
    assert "initialized with num_distributed_optimizer_instances=2" in messages[4]
    base = dict(micro_batch_size=1, global_batch_size=8, lr=1e-3, train_iters=10)
    for extra, words in (({}, "needs training.use_distributed_optimizer=true"),
                         ({"deepspeed": True}, "training.deepspeed=true with")):
        with pytest.raises(ConfigError, match=words):
            TrainingConfig(**base, num_distributed_optimizer_instances=2, **extra)
    config = TrainingConfig(**base, use_distributed_optimizer=True,
                            num_distributed_optimizer_instances=3)
    with pytest.raises(ConfigError, match=r"training\.num_distributed_optimizer_instances=3 "
                                          r"does not divide .* = 2 x 2 = 4"):
        config.check_optimizer_instances(2, 2)
    with pytest.raises(ValueError, match="does not divide"):
        Setup(gpt_config(1, 1), data_parallel_size=2, distributed_optimizer=True,
              distributed_optimizer_instances=4)
    with pytest.raises(ConfigError, match=r"instances=3 does not divide"):  # the job's config
        load_config(TINY, ["--use-distributed-optimizer",
                           "--num-distributed-optimizer-instances", "3"], world_size=4)
