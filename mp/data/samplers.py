"""Data-parallel micro-batches that start at any consumed-sample count (exact resume).

Samples are taken in dataset order (the dataset is already shuffled) in global batches of
``micro_batch_size * data_parallel_size``; data-parallel rank ``r`` gets the ``r``-th slice of
``micro_batch_size`` of each. Starting at ``consumed_samples = k`` yields exactly what starting
at 0 and dropping the first ``k`` samples would. The rank and size are explicit arguments, as in
Megatron's ``MegatronPretrainingSampler``, so no process group is needed to build or test them;
the training loop passes ``parallel_state.get_data_parallel_rank()`` and ``..._world_size()``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


class MegatronPretrainingSampler:
    """A batch sampler: yields this rank's micro-batches as lists of ``micro_batch_size``
    dataset indices, from ``consumed_samples`` up to ``total_samples``. All of them consumed
    (a finished run started again) yields nothing, where Megatron's sampler fails.

    With ``drop_last`` (the default) a last, incomplete global batch is dropped; without it,
    each rank gets its share of that batch and ranks past its end get nothing. Unlike
    Megatron's, ``len()`` is the number of micro-batches this rank gets, so that
    ``len(DataLoader)`` is right.
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise ValueError(f"total_samples={total_samples} must be > 0")
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} must lie in 0..total_samples="
                f"{total_samples}"
            )
        if micro_batch_size <= 0 or data_parallel_size <= 0:
            raise ValueError(
                f"micro_batch_size={micro_batch_size} and data_parallel_size={data_parallel_size} "
                "must be > 0"
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise ValueError(
                f"data_parallel_rank={data_parallel_rank} must lie in 0..{data_parallel_size - 1}"
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.global_batch = micro_batch_size * data_parallel_size
        self.drop_last = drop_last

    def _batch_starts(self) -> range:
        stop = (
            self.total_samples
            if not self.drop_last
            else (
                self.total_samples
                - (self.total_samples - self.consumed_samples) % self.global_batch
            )
        )
        return range(self.consumed_samples, stop, self.global_batch)

    def __len__(self) -> int:
        starts = self._batch_starts()
        if not starts:
            return 0
        last_is_empty = (
            starts[-1] + self.data_parallel_rank * self.micro_batch_size >= self.total_samples
        )
        return len(starts) - last_is_empty

    def __iter__(self) -> Iterator[list[int]]:
        for start in self._batch_starts():
            begin = start + self.data_parallel_rank * self.micro_batch_size
            end = min(begin + self.micro_batch_size, self.total_samples)
            if begin < end:
                yield list(range(begin, end))


def build_pretraining_data_loader(
    dataset: torch.utils.data.Dataset | None,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
    drop_last: bool = True,
) -> torch.utils.data.DataLoader | None:
    """A ``DataLoader`` over this rank's micro-batches (`MegatronPretrainingSampler`); each batch
    is the dataset's item dict with tensors stacked to ``[micro_batch_size, ...]``. None for a
    None dataset (a split that was not built)."""
    if dataset is None:
        return None
    sampler = MegatronPretrainingSampler(
        len(dataset),
        consumed_samples,
        micro_batch_size,
        data_parallel_rank,
        data_parallel_size,
        drop_last,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
