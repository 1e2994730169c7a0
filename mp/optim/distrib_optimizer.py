"""Megatron's distributed optimizer: fp32 masters and AdamW moments sharded over data parallel.

`mp.distributed.DistributedDataParallel` built with ``use_distributed_optimizer=True`` lays
every chunk's parameters and fp32 gradients out in two buffers of the same shape, cut into
buckets that are each split into DP equal shards. Data-parallel rank ``r`` owns shard ``r`` of
every bucket. One iteration:

1. backward: each bucket's gradients are reduce-scattered, so the owned shard of
   ``main_grad`` holds the data-parallel mean (``(d - 1) / d`` of the gradient bytes leave
   each rank: the first half of a ring all-reduce);
2. `step`: AdamW updates, on each rank, only the parameter elements in its shards (a
   `ParamShard` per parameter that meets a shard: a 1-D slice of it), with their fp32
   masters and moments; the global gradient norm sums the shards' squares over every rank
   (data-parallel shards are disjoint; model-parallel ranks add as without sharding; experts'
   shards are over the expert-data-parallel ranks, `mp.distributed`, and differ across the
   expert-parallel ones, so every element still counts once);
3. the updated shards are written into the parameter buffer and all-gathered
   (`DistributedDataParallel.start_param_sync`), asynchronously when the chunks overlap the
   all-gather with the next forward.

Bytes of optimizer state per parameter, with ``d`` data-parallel ranks (Megatron's table; the
fp32 gradient buffer stays whole): bf16 or fp16 parameters ``2 + 4 + 12 / d`` (master and two
moments sharded), fp32 ``4 + 4 + 8 / d`` (the parameter is its own master); with bf16 or fp16
moments (`mp.optim.PrecisionAwareAdamW`) ``2 + 4 + 8 / d`` for bf16. A checkpoint holds
the same global tensors as without sharding (`mp.checkpointing`): it loads with or without
the distributed optimizer, at any data-parallel size.

Several instances (Megatron-Core's ``num_distributed_optimizer_instances`` N, the chunks'
setting): the shards are cut over one instance's ``d / N`` ranks (`mp.parallel_state`) and
every instance holds the same copy of them, so ``d`` becomes ``d / N`` above. Gradients are
reduce-scattered inside the instance, then each shard is all-reduced across the instances;
parameters are all-gathered inside the instance. The gradient norm sums the shards of one
instance's ranks only (``get_intra_distributed_optimizer_instance_group``: all of its
model-parallel and data-parallel ranks), so every element counts once. A checkpoint's
replicated shards are identical chunks of the same global tensors, which the writer stores
once (`mp.checkpointing.storage`), and load at any N.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.distributed import DistributedDataParallel
from mp.optim.optimizer import MixedPrecisionOptimizer, StepResult


class DistributedOptimizer(MixedPrecisionOptimizer):
    """`MixedPrecisionOptimizer` over this data-parallel rank's shards of ``model_chunks``.

    Args:
        param_groups: the chunks' parameters in ``torch.optim`` groups (`get_param_groups`).
        model_chunks: this rank's `DistributedDataParallel` chunks, built with
            ``use_distributed_optimizer=True``; they own the buffers and collectives.
        grad_norm_group: the ranks whose shards make up the whole model: default every rank
            (data parallel x model parallel), or with several instances every rank of this
            rank's instance.
        **kwargs: `MixedPrecisionOptimizer`'s (lr, betas, eps, clip_grad, grad_scaler, ...).
    """

    def __init__(self, param_groups: list[dict], model_chunks: Sequence[nn.Module], *,
                 grad_norm_group=None, **kwargs):
        self.model_chunks = list(model_chunks)
        self._shard_range: dict[nn.Parameter, tuple[int, int]] = {}
        for chunk in self.model_chunks:
            if not getattr(chunk, "use_distributed_optimizer", False):
                raise ValueError("DistributedOptimizer needs model chunks wrapped in "
                                 "DistributedDataParallel(..., use_distributed_optimizer=True)")
            self._shard_range.update(_owned_ranges(chunk))
        known = {p for chunk in self.model_chunks for p in chunk.param_range}
        for group in param_groups:
            for param in group["params"]:
                if param not in known:
                    raise ValueError(f"a parameter of shape {tuple(param.shape)} is not in the "
                                     "model chunks given to DistributedOptimizer")
        instances = {chunk.num_distributed_optimizer_instances for chunk in self.model_chunks}
        if len(instances) > 1:
            raise ValueError(f"the model chunks have different num_distributed_optimizer_"
                             f"instances {sorted(instances)}; build them all with one")
        group = grad_norm_group
        if group is None:
            group = (dist.group.WORLD if instances == {1}
                     else parallel_state.get_intra_distributed_optimizer_instance_group())
        super().__init__(param_groups, model_parallel_group=group, **kwargs)

    _experts_need_their_group = False  # the norm sums over every rank already

    def _ranges(self, param: nn.Parameter) -> list[tuple[int, int]]:
        owned = self._shard_range.get(param)
        return [] if owned is None else [owned]

    def step(self) -> StepResult:
        for chunk in self.model_chunks:  # the shards are about to be rewritten
            chunk.finish_param_sync()
        return super().step()

    def copy_main_params_to_model(self) -> None:
        """Write the masters into this rank's shards of the parameters, then all-gather the
        parameters over data parallel (asynchronous when the chunks overlap it)."""
        super().copy_main_params_to_model()
        for chunk in self.model_chunks:
            chunk.start_param_sync()


def _owned_ranges(chunk: DistributedDataParallel) -> dict[nn.Parameter, tuple[int, int]]:
    """``{param: (start, end)}``: the elements of each parameter in this rank's shards."""
    owned = {}
    for bucket in chunk.buckets:
        shard_start, shard_end = chunk.shard(bucket)
        for param in bucket.params:
            start, end = chunk.param_range[param]
            low, high = max(start, shard_start), min(end, shard_end)
            if low < high:
                owned[param] = (low - start, high - start)
    return owned
