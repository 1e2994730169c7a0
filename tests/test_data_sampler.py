"""Data-parallel micro-batches: ranks see disjoint slices whose union is the global batch, and
starting at consumed sample k gives what skipping k samples gives."""

import pytest
import torch

from mp.data.samplers import MegatronPretrainingSampler, build_pretraining_data_loader


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
