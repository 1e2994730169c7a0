"""Data-parallel micro-batches: ranks see disjoint slices whose union is the global batch, and
starting at consumed sample k gives what skipping k samples gives; in Megatron's cyclic order,
each epoch a new permutation (Megatron's: ``randperm`` seeded with the epoch), within each
rank's shard or over the whole dataset, without end."""

import itertools

import pytest
import torch

from mp.data.samplers import (
    MegatronPretrainingRandomSampler,
    MegatronPretrainingSampler,
    build_pretraining_data_loader,
)


def _steps(total, consumed, mbs, dp, drop_last=True):
    """Per step, each rank's micro-batch."""
    per_rank = [
        list(MegatronPretrainingSampler(total, consumed, mbs, r, dp, drop_last)) for r in range(dp)
    ]
    assert len({len(batches) for batches in per_rank}) <= 2
    return [
        [batches[s] for batches in per_rank if s < len(batches)]
        for s in range(max(len(b) for b in per_rank))
    ]


@pytest.mark.parametrize("dp, mbs", [(1, 1), (2, 3), (4, 2), (3, 5)])
def test_ranks_are_disjoint_and_cover_the_global_batch(dp, mbs):
    total, global_batch = 103, dp * mbs
    steps = _steps(total, 0, mbs, dp)
    assert len(steps) == total // global_batch
    for step, batches in enumerate(steps):
        assert all(len(b) == mbs for b in batches)
        flat = [i for b in batches for i in b]
        assert len(set(flat)) == len(flat)  # disjoint
        assert sorted(flat) == list(range(step * global_batch, (step + 1) * global_batch))
    for r in range(dp):
        sampler = MegatronPretrainingSampler(total, 0, mbs, r, dp)
        assert len(sampler) == len(list(sampler))


@pytest.mark.parametrize("consumed", [0, 1, 6, 12, 37])
def test_starting_at_consumed_equals_skipping(consumed):
    dp, mbs, total = 2, 3, 60
    from_start = [i for step in _steps(total, 0, mbs, dp, drop_last=False) for b in step for i in b]
    resumed = [
        i for step in _steps(total, consumed, mbs, dp, drop_last=False) for b in step for i in b
    ]
    assert resumed == from_start[consumed:]
    if consumed % (dp * mbs) == 0:  # on a global-batch boundary each rank resumes its own stream
        skipped_steps = consumed // (dp * mbs)
        assert _steps(total, consumed, mbs, dp) == _steps(total, 0, mbs, dp)[skipped_steps:]


def test_last_partial_batch_kept_only_without_drop_last():
    assert list(MegatronPretrainingSampler(10, 0, 2, 1, 2)) == [[2, 3], [6, 7]]
    assert list(MegatronPretrainingSampler(10, 0, 2, 0, 2, drop_last=False)) == [
        [0, 1],
        [4, 5],
        [8, 9],
    ]
    last_rank = MegatronPretrainingSampler(10, 0, 2, 1, 2, drop_last=False)
    assert list(last_rank) == [[2, 3], [6, 7]] and len(last_rank) == 2


class _Squares(torch.utils.data.Dataset):
    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"tokens": torch.tensor([i, i * i])}


def test_data_loader_resumes_at_consumed_samples():
    full = build_pretraining_data_loader(_Squares(), 0, 2, 1, 2)
    resumed = build_pretraining_data_loader(_Squares(), 8, 2, 1, 2)
    full_batches = [b["tokens"] for b in full]
    assert full_batches[0].tolist() == [[2, 4], [3, 9]]
    assert len(resumed) == len(full_batches) - 2
    for got, expected in zip(resumed, full_batches[2:]):
        assert torch.equal(got["tokens"], expected)
    assert build_pretraining_data_loader(None, 0, 2, 0, 1) is None
    done = build_pretraining_data_loader(_Squares(), len(_Squares()), 2, 1, 2)
    assert (len(done), list(done)) == (0, [])  # every sample consumed: a finished run


@pytest.mark.parametrize(
    "args, message",
    [
        ((10, 11, 1, 0, 1), "consumed_samples=11 must lie in 0..total_samples=10"),
        ((10, 0, 0, 0, 1), "micro_batch_size=0"),
        ((10, 0, 1, 2, 2), "data_parallel_rank=2 must lie in 0..1"),
        ((0, 0, 1, 0, 1), "total_samples=0"),
    ],
)
def test_invalid_sampler_arguments(args, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        MegatronPretrainingSampler(*args)


def _cyclic_steps(total, consumed, mbs, dp, steps, sharding=True):
    """The first ``steps`` steps of the cyclic order: per step, each rank's micro-batch."""
    streams = [itertools.islice(MegatronPretrainingRandomSampler(total, consumed, mbs, r, dp,
                                                                 sharding), steps)
               for r in range(dp)]
    return [list(step) for step in zip(*streams)]


@pytest.mark.parametrize("sharding", [True, False], ids=["sharded", "unsharded"])
@pytest.mark.parametrize("dp, mbs, total", [(1, 1, 7), (2, 3, 40), (4, 2, 37), (3, 5, 100)])
def test_cyclic_epochs_are_new_permutations_of_whole_global_batches(dp, mbs, total, sharding):
    global_batch = dp * mbs
    per_epoch = total // global_batch
    steps = _cyclic_steps(total, 0, mbs, dp, 3 * per_epoch, sharding)
    epochs = [steps[e * per_epoch:(e + 1) * per_epoch] for e in range(3)]
    bucket = per_epoch * mbs  # each rank's shard
    orders = []
    for epoch in epochs:
        assert all(len(b) == mbs for step in epoch for b in step)
        flat = [i for step in epoch for b in step for i in b]
        assert len(set(flat)) == len(flat) == per_epoch * global_batch
        assert all(0 <= i < total for i in flat)
        if sharding:  # every index of the whole global batches, each rank in its own shard
            assert sorted(flat) == list(range(per_epoch * global_batch))
            for r in range(dp):
                assert all(r * bucket <= i < (r + 1) * bucket for step in epoch for i in step[r])
        orders.append(flat)
    assert orders[0] != orders[1] != orders[2]


def test_cyclic_order_is_megatrons():
    """Megatron's MegatronPretrainingRandomSampler: with data sharding, rank r permutes its
    shard ``[r B, (r + 1) B)`` by ``randperm(B)`` seeded with the epoch; without, the ranks
    deal out ``randperm`` of the dataset's whole micro-batches, r taking every dp-th."""
    total, mbs, dp = 22, 2, 2  # an epoch: 5 global batches of 4, so 20 samples
    for epoch in range(2):
        seeded = torch.Generator().manual_seed(epoch)
        shard = torch.randperm(10, generator=seeded)
        seeded = torch.Generator().manual_seed(epoch)
        whole = torch.randperm(22, generator=seeded)[:20]
        for r in range(dp):
            sharded = MegatronPretrainingRandomSampler(total, 20 * epoch, mbs, r, dp)
            got = [i for b in itertools.islice(sharded, 5) for i in b]
            assert got == (shard + 10 * r).tolist()
            dealt = MegatronPretrainingRandomSampler(total, 20 * epoch, mbs, r, dp, False)
            got = [i for b in itertools.islice(dealt, 5) for i in b]
            assert got == whole[r::dp].tolist()


@pytest.mark.parametrize("sharding", [True, False], ids=["sharded", "unsharded"])
@pytest.mark.parametrize("consumed", [0, 6, 36, 42, 90])
def test_cyclic_resumes_at_consumed_samples(consumed, sharding):
    """Mid-epoch and across epochs (an epoch here is 36 samples)."""
    dp, mbs, total = 2, 3, 40
    from_start = _cyclic_steps(total, 0, mbs, dp, 30, sharding)
    skipped = consumed // (dp * mbs)
    assert _cyclic_steps(total, consumed, mbs, dp, 30 - skipped, sharding) == \
        from_start[skipped:]


def test_cyclic_data_loader_runs_on_past_the_dataset():
    loader = build_pretraining_data_loader(_Squares(), 0, 2, 1, 2, dataloader_type="cyclic")
    sampler = MegatronPretrainingRandomSampler(40, 0, 2, 1, 2)
    for batch, indices in zip(itertools.islice(loader, 25), sampler):  # 10 a rank an epoch
        assert batch["tokens"][:, 0].tolist() == indices
    with pytest.raises(ValueError, match="dataloader_type='random' must be one of 'single', "
                                         "'cyclic'"):
        build_pretraining_data_loader(_Squares(), 0, 2, 1, 2, dataloader_type="random")


@pytest.mark.parametrize("args, message", [
    ((10, 2, 2, 0, 2), "consumed_samples=2 is not a whole number of micro_batch_size x "
                       "data_parallel_size = 4 batches"),
    ((3, 0, 2, 0, 2), "total_samples=3 is less than one global batch of micro_batch_size x "
                      "data_parallel_size = 4"),
    ((10, 0, 1, 2, 2), "data_parallel_rank=2 must lie in 0..1"),
])
def test_invalid_cyclic_sampler_arguments(args, message):
    with pytest.raises(ValueError, match=message.replace(".", r"\.")):
        MegatronPretrainingRandomSampler(*args)
