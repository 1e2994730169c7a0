"""Data-parallel gradient synchronisation and the end-of-backward gradient fix-ups."""

from mp.distributed.distributed_data_parallel import (
    DEFAULT_BUCKET_SIZE,
    DistributedDataParallel,
    finish_param_sync,
)
from mp.distributed.finalize_model_grads import (
    allreduce_embedding_grads,
    allreduce_sequence_parallel_grads,
    finalize_model_grads,
)

__all__ = ["DEFAULT_BUCKET_SIZE", "DistributedDataParallel", "allreduce_embedding_grads",
           "allreduce_sequence_parallel_grads", "finalize_model_grads", "finish_param_sync"]
