"""Small helpers shared by the tensor-parallel layers."""

from __future__ import annotations

import torch


def divide(numerator: int, denominator: int, what: str = "numerator",
           by: str = "tensor_model_parallel_size") -> int:
    """``numerator // denominator``; a ValueError naming both values when it does not divide,
    e.g. ``output_size=10 is not divisible by tensor_model_parallel_size=4``."""
    if denominator <= 0 or numerator % denominator != 0:
        raise ValueError(f"{what}={numerator} is not divisible by {by}={denominator}")
    return numerator // denominator


def split_tensor_along_last_dim(tensor: torch.Tensor, num_partitions: int,
                                contiguous_split_chunks: bool = False) -> tuple[torch.Tensor, ...]:
    """Split ``[..., n]`` into ``num_partitions`` views ``[..., n / num_partitions]``."""
    last = divide(tensor.size(-1), num_partitions, "last dimension size", "num_partitions")
    chunks = torch.split(tensor, last, dim=-1)
    if contiguous_split_chunks:
        return tuple(chunk.contiguous() for chunk in chunks)
    return chunks


class VocabUtility:
    """The contiguous vocabulary range ``[first, last)`` that a tensor-parallel rank owns."""

    @staticmethod
    def vocab_range_from_per_partition_vocab_size(per_partition_vocab_size: int, rank: int,
                                                  world_size: int) -> tuple[int, int]:
        first = rank * per_partition_vocab_size
        return first, first + per_partition_vocab_size

    @staticmethod
    def vocab_range_from_global_vocab_size(global_vocab_size: int, rank: int,
                                           world_size: int) -> tuple[int, int]:
        per_partition = divide(global_vocab_size, world_size, "vocabulary size")
        return VocabUtility.vocab_range_from_per_partition_vocab_size(per_partition, rank,
                                                                      world_size)
