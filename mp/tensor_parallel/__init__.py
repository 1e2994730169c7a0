"""Tensor and sequence parallelism (Megatron-Core names)."""

from mp.tensor_parallel.checkpoint_without_output import CheckpointWithoutOutput
from mp.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from mp.tensor_parallel.layers import (
    ColumnParallelLinear,
    DuplicatedLinear,
    LinearWithAsyncGradReduce,
    RowParallelLinear,
    VocabParallelEmbedding,
    param_is_not_tensor_parallel_duplicate,
    set_tensor_model_parallel_attributes,
)
from mp.tensor_parallel.mappings import (
    all_to_all,
    all_to_all_by_sizes,
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from mp.tensor_parallel.random import (
    CudaRNGStatesTracker,
    checkpoint,
    get_cuda_rng_tracker,
    model_parallel_cuda_manual_seed,
)
from mp.tensor_parallel.utils import VocabUtility, divide, split_tensor_along_last_dim

__all__ = [
    "CheckpointWithoutOutput", "ColumnParallelLinear", "CudaRNGStatesTracker", "DuplicatedLinear",
    "LinearWithAsyncGradReduce",
    "RowParallelLinear", "VocabParallelEmbedding", "VocabUtility", "all_to_all",
    "all_to_all_by_sizes", "checkpoint", "copy_to_tensor_model_parallel_region", "divide",
    "gather_from_sequence_parallel_region",
    "gather_from_tensor_model_parallel_region", "get_cuda_rng_tracker",
    "model_parallel_cuda_manual_seed", "param_is_not_tensor_parallel_duplicate",
    "reduce_from_tensor_model_parallel_region", "reduce_scatter_to_sequence_parallel_region",
    "scatter_to_sequence_parallel_region", "scatter_to_tensor_model_parallel_region",
    "set_tensor_model_parallel_attributes", "split_tensor_along_last_dim",
    "vocab_parallel_cross_entropy",
]
