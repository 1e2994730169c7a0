"""Data-parallel micro-batches that start at any consumed-sample count (exact resume).

Megatron's two orders (``--dataloader-type``):

- ``single`` (`MegatronPretrainingSampler`, the default): samples in dataset order (the dataset
  is already shuffled) in global batches of ``micro_batch_size * data_parallel_size``;
  data-parallel rank ``r`` gets the ``r``-th slice of ``micro_batch_size`` of each, once.
- ``cyclic`` (`MegatronPretrainingRandomSampler`): epoch after epoch, without end, each in a
  new random order: torch's ``randperm`` seeded with the epoch number (Megatron's, so the
  order is Megatron's), over each rank's own contiguous bucket of the dataset (data sharding)
  or, with ``data_sharding=False``, over the whole of it, rank ``r`` taking every
  ``data_parallel_size``-th index from ``r``. An epoch is the dataset's whole global batches'
  worth of samples; the rest is left out of it.

Either way, starting at ``consumed_samples = k`` yields exactly what starting at 0 and
dropping the first ``k`` samples would. The rank and size are explicit arguments, as in
Megatron, so no process group is needed to build or test them; the training loop passes
``parallel_state.get_data_parallel_rank()`` and ``..._world_size()``.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def _check_sizes(total_samples: int, micro_batch_size: int, data_parallel_rank: int,
                 data_parallel_size: int) -> None:
    if total_samples <= 0:
        raise ValueError(f"total_samples={total_samples} must be > 0")
    if micro_batch_size <= 0 or data_parallel_size <= 0:
        raise ValueError(f"micro_batch_size={micro_batch_size} and data_parallel_size="
                         f"{data_parallel_size} must be > 0")
    if not 0 <= data_parallel_rank < data_parallel_size:
        raise ValueError(f"data_parallel_rank={data_parallel_rank} must lie in "
                         f"0..{data_parallel_size - 1}")


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
        _check_sizes(total_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        if not 0 <= consumed_samples <= total_samples:
            raise ValueError(
                f"consumed_samples={consumed_samples} must lie in 0..total_samples="
                f"{total_samples}"
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


class MegatronPretrainingRandomSampler:
    """A batch sampler without end: this rank's micro-batches, epoch after epoch in a new
    random order (the module doc), from ``consumed_samples`` on."""

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int,
        data_parallel_size: int,
        data_sharding: bool = True,
    ) -> None:
        _check_sizes(total_samples, micro_batch_size, data_parallel_rank, data_parallel_size)
        global_batch = micro_batch_size * data_parallel_size
        if total_samples < global_batch:
            raise ValueError(f"total_samples={total_samples} is less than one global batch of "
                             f"micro_batch_size x data_parallel_size = {global_batch}: an "
                             "epoch of the cyclic order would be empty")
        if consumed_samples < 0 or consumed_samples % global_batch:
            raise ValueError(f"consumed_samples={consumed_samples} is not a whole number of "
                             f"micro_batch_size x data_parallel_size = {global_batch} batches")
        self.total_samples = total_samples
        self.epoch_samples = total_samples - total_samples % global_batch
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.data_sharding = data_sharding

    def _epoch_indices(self, epoch: int, start: int) -> list[int]:
        """This rank's indices of ``epoch`` from the epoch's ``start``-th sample on."""
        generator = torch.Generator().manual_seed(epoch)
        if self.data_sharding:
            bucket = self.epoch_samples // self.data_parallel_size
            order = torch.randperm(bucket, generator=generator)
            first = self.data_parallel_rank * bucket
            return (order[start // self.data_parallel_size:] + first).tolist()
        # Megatron permutes the dataset's whole micro-batches and uses the epoch's first part
        order = torch.randperm(self.total_samples - self.total_samples % self.micro_batch_size,
                               generator=generator)[:self.epoch_samples]
        return order[start + self.data_parallel_rank::self.data_parallel_size].tolist()

    def __iter__(self) -> Iterator[list[int]]:
        epoch, start = divmod(self.consumed_samples, self.epoch_samples)
        while True:
            indices = self._epoch_indices(epoch, start)
            for i in range(0, len(indices), self.micro_batch_size):
                yield indices[i:i + self.micro_batch_size]
            epoch, start = epoch + 1, 0


DATALOADER_TYPES = ("single", "cyclic")


def build_pretraining_data_loader(
    dataset: torch.utils.data.Dataset | None,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: int,
    data_parallel_size: int,
    num_workers: int = 0,
    drop_last: bool = True,
    dataloader_type: str = "single",
    data_sharding: bool = True,
) -> torch.utils.data.DataLoader | None:
    """A ``DataLoader`` over this rank's micro-batches, in ``dataloader_type``'s order
    (`DATALOADER_TYPES`; the module doc); each batch is the dataset's item dict with tensors
    stacked to ``[micro_batch_size, ...]``. None for a None dataset (a split that was not
    built)."""
    if dataset is None:
        return None
    if dataloader_type == "single":
        sampler = MegatronPretrainingSampler(len(dataset), consumed_samples, micro_batch_size,
                                             data_parallel_rank, data_parallel_size, drop_last)
    elif dataloader_type == "cyclic":
        sampler = MegatronPretrainingRandomSampler(len(dataset), consumed_samples,
                                                   micro_batch_size, data_parallel_rank,
                                                   data_parallel_size, data_sharding)
    else:
        raise ValueError(f"dataloader_type={dataloader_type!r} must be one of "
                         f"{', '.join(map(repr, DATALOADER_TYPES))}")
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )
