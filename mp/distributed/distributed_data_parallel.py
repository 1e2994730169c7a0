"""Data parallelism: fp32 (or bf16) gradient buckets, all-reduced over the data-parallel group.

Megatron-Core's ``DistributedDataParallel`` idea, plainly:

- Every trainable parameter gets ``param.main_grad``, an fp32 view into one contiguous buffer.
  After autograd accumulates a parameter's gradient, a post-accumulate-grad hook adds it to
  ``main_grad`` and frees ``param.grad``, so gradients sum in fp32 across micro-batches
  whatever the parameter dtype (bf16 and fp16 included). ``grad_dtype=torch.bfloat16``
  (Megatron's ``--grad-reduce-in-bf16``, for a bf16 model) makes the buffer bf16 instead:
  gradients then accumulate and are reduced in bf16, half the bytes on the wire; the
  optimizer casts them to fp32 before its step.
- The buffer is cut into buckets of about ``bucket_size`` elements, in reverse parameter order
  (roughly the order backward produces gradients). A bucket is all-reduced as one tensor.
- ``overlap_grad_reduce``: during the backward of the micro-batch that synchronises, a
  bucket's all-reduce starts asynchronously as soon as its last gradient is in, and overlaps
  the rest of backward. Buckets are launched strictly in order (a ready bucket waits for the
  ones before it), so every rank issues the same collectives in the same order whatever order
  its hooks fire in. ``finish_grad_sync()`` launches what is left (buckets of unused
  parameters, or everything when not overlapping) and waits.
- ``no_sync()``: micro-batches run inside it only accumulate; nothing is communicated until
  the last micro-batch's backward.
- Averaging: each bucket is multiplied by ``1 / DP`` before a SUM all-reduce, so ``main_grad``
  holds the data-parallel mean (the loss of each rank being a mean over its own samples).
  With ``calculate_per_token_loss`` the buckets are summed as they are (each rank's loss is a
  sum over its tokens) and `mp.distributed.finalize_model_grads` divides by the global token
  count through `scale_gradients`.

With one data-parallel rank nothing is communicated and no readiness is tracked; only the
accumulation into ``main_grad`` remains (which mixed precision needs anyway).

``use_distributed_optimizer`` (Megatron's distributed optimizer, `mp.optim.DistributedOptimizer`):

- each bucket is padded to a multiple of DP and split into DP equal shards (the bucket
  layout: `mp.distributed.param_and_grad_buffer`); data-parallel rank ``r`` owns shard ``r``
  of every bucket (`Bucket.owned`), and its optimizer updates
  exactly the parameter elements that fall there;
- a bucket is reduce-scattered instead of all-reduced: afterwards only the owned shard of
  ``main_grad`` holds the data-parallel mean (the rest is this rank's own partial sum). A
  bucket holding a tied embedding copy (``embedding_group_sync``, summed across pipeline stages
  afterwards) is all-reduced, and sits in a bucket of its own, since the two stages' shards
  of it differ;
- with ``num_distributed_optimizer_instances`` N > 1 (Megatron-Core's flag) the buckets
  are sharded over this rank's instance only (``DP x CP / N`` consecutive ranks,
  `mp.parallel_state`), reduce-scattered there, and the reduced shard is all-reduced across
  the N instances (`mp.distributed.param_and_grad_buffer`); experts likewise over their
  EDP / N ranks. With ``overlap_grad_reduce`` a bucket's cross-instance all-reduce starts
  when the next bucket launches (after its own reduce-scatter is done), so it too overlaps
  the rest of backward;
- the parameters become views into one contiguous buffer laid out like the gradients, so
  that after the optimizer wrote its shard, one all-gather per bucket (`start_param_sync`)
  over the shard group gives every rank the updated parameters. With
  ``overlap_param_gather`` the all-gathers run asynchronously and a forward pre-hook on each
  module waits only for the buckets of its own parameters, so the next forward overlaps them.

Mixture-of-experts layers (`mp.model.moe`): expert parameters (``param.allreduce = False``,
Megatron's marker) differ across the expert-parallel ranks, so they live in a second
`GradBuffer` of their own, reduced over the expert-data-parallel group (the ranks holding the
same experts). Both are scaled by ``1 / (DP x CP)``: an expert's gradient already sums the
losses of every EP rank whose tokens it took (the token exchange's backward brings them), so
summing over the EDP ranks sums over every rank, as the dense reduction does. Each buffer
launches its buckets in its own order.

The hooks reach the wrapper through weak references: a parameter's gradient hook that held
the wrapper would make a cycle (wrapper -> module -> parameter -> hook -> wrapper) through
autograd's C++ side, which Python's collector cannot see, and keep the whole model alive.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.distributed.param_and_grad_buffer import Bucket, GradBuffer, plan_buckets

DEFAULT_BUCKET_SIZE = 40_000_000  # elements (Megatron-Core's default)


def _weakly(method):
    """``method`` called through a weak reference to its object (the module doc); does
    nothing once the object is gone."""
    ref = weakref.WeakMethod(method)

    def call(*args):
        bound = ref()
        return None if bound is None else bound(*args)
    return call


class DistributedDataParallel(nn.Module):
    """Wrap ``module`` for data parallelism (see the module doc).

    Args:
        module: the model (chunk); its parameters must all live on one device.
        data_parallel_group: default ``parallel_state.get_data_parallel_group(
            with_context_parallel=True)``: the DP ranks, and the CP ranks, which hold the
            same weights and gradients for their parts of the sequences.
        expert_data_parallel_group: where expert parameters are reduced; default
            ``parallel_state.get_expert_data_parallel_group()`` (read only when the module
            has expert parameters).
        overlap_grad_reduce: start each bucket's reduction during backward.
        bucket_size: elements per bucket (a parameter is never split; a bucket closes once it
            holds at least this many); None puts everything in one bucket.
        use_distributed_optimizer: shard buckets over DP, reduce-scatter gradients and keep
            the parameters in one buffer for the all-gather (module doc); the parameters must
            then share one dtype.
        overlap_param_gather: with the distributed optimizer, run the parameter all-gathers
            asynchronously and wait for them module by module in the next forward.
        calculate_per_token_loss: sum the gradients over data parallel instead of averaging
            them (module doc).
        grad_dtype: the dtype of ``main_grad`` and of the reduction: fp32, or bf16 (module
            doc).
        num_distributed_optimizer_instances: N copies of the distributed optimizer's state,
            each sharded over DP x CP / N ranks (module doc); > 1 needs
            ``use_distributed_optimizer`` and ``parallel_state`` initialized with the same N
            (its groups are used; explicit groups are refused).
    """

    def __init__(self, module: nn.Module, *, data_parallel_group=None,
                 expert_data_parallel_group=None, overlap_grad_reduce: bool = True,
                 bucket_size: int | None = DEFAULT_BUCKET_SIZE,
                 use_distributed_optimizer: bool = False, overlap_param_gather: bool = False,
                 calculate_per_token_loss: bool = False,
                 grad_dtype: torch.dtype = torch.float32,
                 num_distributed_optimizer_instances: int = 1):
        super().__init__()
        if bucket_size is not None and bucket_size < 1:
            raise ValueError(f"bucket_size={bucket_size} must be a positive number of elements "
                             "or None (one bucket)")
        self.num_distributed_optimizer_instances = num_distributed_optimizer_instances
        _check_instances(num_distributed_optimizer_instances, use_distributed_optimizer,
                         data_parallel_group, expert_data_parallel_group)
        self.module = module
        self.data_parallel_group = (
            parallel_state.get_data_parallel_group(with_context_parallel=True)
            if data_parallel_group is None else data_parallel_group)
        self.data_parallel_size = dist.get_world_size(self.data_parallel_group)
        self.overlap_grad_reduce = overlap_grad_reduce
        self.use_distributed_optimizer = use_distributed_optimizer
        self.overlap_param_gather = overlap_param_gather and use_distributed_optimizer
        self.gradient_scaling_factor = 1.0 if calculate_per_token_loss else \
            1.0 / self.data_parallel_size
        params = [p for p in module.parameters() if p.requires_grad][::-1]
        if not params:
            raise ValueError("DistributedDataParallel: the module has no trainable parameters")
        devices = {p.device for p in params}
        if len(devices) > 1:
            raise ValueError(f"DistributedDataParallel: parameters on several devices {devices}")
        if use_distributed_optimizer:
            dtypes = {p.dtype for p in params}
            if len(dtypes) > 1:
                raise ValueError(f"the distributed optimizer needs parameters of one dtype; "
                                 f"this module has {sorted(map(str, dtypes))}")
        # each parameter's [start, end) in its own buffer
        self.param_range: dict[nn.Parameter, tuple[int, int]] = {}
        self.buffers: list[GradBuffer] = []
        dense = [p for p in params if getattr(p, "allreduce", True)]
        experts = [p for p in params if not getattr(p, "allreduce", True)]
        for members, expert in ((dense, False), (experts, True)):
            if members:
                buffer = self._make_buffer(expert, expert_data_parallel_group)
                self._build_buffer(buffer, members, bucket_size, grad_dtype)
        self._bucket_of = {p: b for b in self.buckets for p in b.params}
        self._sync_enabled = True
        grad_ready = _weakly(self._grad_ready)
        for param in params:
            param.register_post_accumulate_grad_hook(grad_ready)
        if self.overlap_param_gather:
            wait = _weakly(self._wait_for_own_params)
            for sub in module.modules():
                if any(True for _ in sub.parameters(recurse=False)):
                    sub.register_forward_pre_hook(wait)

    @property
    def buckets(self) -> list[Bucket]:
        """Every buffer's buckets (the data-parallel one's first)."""
        return [bucket for buffer in self.buffers for bucket in buffer.buckets]

    @property
    def grad_buffer(self) -> torch.Tensor:
        """The gradients reduced over the data-parallel group (all but the experts')."""
        return self.buffers[0].grads

    def _make_buffer(self, expert: bool, expert_data_parallel_group) -> GradBuffer:
        """An empty buffer over the data-parallel group or (``expert``) the expert one, with
        several distributed-optimizer instances sharded over this rank's instance of it."""
        if self.num_distributed_optimizer_instances > 1:
            group = (parallel_state.get_expert_data_parallel_group() if expert
                     else self.data_parallel_group)
            shard_group = (
                parallel_state.get_expert_data_parallel_group(partial_expert_data_parallel=True)
                if expert else parallel_state.get_data_parallel_group(
                    with_context_parallel=True, partial_data_parallel=True))
            inter = parallel_state.get_inter_distributed_optimizer_instance_group()
            return GradBuffer(group, shard_group, inter)
        group = self.data_parallel_group if not expert else (
            parallel_state.get_expert_data_parallel_group()
            if expert_data_parallel_group is None else expert_data_parallel_group)
        return GradBuffer(group, group)

    def _build_buffer(self, buffer: GradBuffer, params: list[nn.Parameter],
                      bucket_size: int | None, grad_dtype: torch.dtype) -> None:
        """Fill ``buffer`` with ``params``: their buckets, ``main_grad`` views into its
        gradients and, with the distributed optimizer, the parameters moved into it."""
        self.param_range.update(plan_buckets(buffer, params, bucket_size,
                                             self.use_distributed_optimizer))
        size = buffer.buckets[-1].end
        buffer.grads = torch.zeros(size, dtype=grad_dtype, device=params[0].device)
        for param in params:
            start, end = self.param_range[param]
            param.main_grad = buffer.grads[start:end].view_as(param)
        for bucket in buffer.buckets:
            bucket.data = buffer.grads[bucket.start:bucket.end]
        if self.use_distributed_optimizer:
            self._gather_params_into_buffer(buffer, params)
        self.buffers.append(buffer)

    @torch.no_grad()
    def _gather_params_into_buffer(self, buffer: GradBuffer,
                                   params: list[nn.Parameter]) -> None:
        """Move ``params`` into ``buffer.params``, laid out like its gradients."""
        buffer.params = torch.zeros(buffer.grads.numel(), dtype=params[0].dtype,
                                    device=params[0].device)
        for param in params:
            start, end = self.param_range[param]
            buffer.params[start:end].copy_(param.detach().view(-1))
            param.data = buffer.params[start:end].view_as(param)
        for bucket in buffer.buckets:
            bucket.param_data = buffer.params[bucket.start:bucket.end]

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # --- backward hooks -----------------------------------------------------------------

    @torch.no_grad()
    def _grad_ready(self, param: nn.Parameter) -> None:
        param.main_grad.add_(param.grad)
        param.grad = None
        if not (self._sync_enabled and self.overlap_grad_reduce):
            return
        bucket = self._bucket_of[param]
        buffer = bucket.buffer
        if buffer.size > 1:
            if bucket.launched:
                raise RuntimeError(
                    f"a parameter of shape {tuple(param.shape)} got a second gradient after its "
                    f"bucket's all-reduce started (it is used twice in one backward across "
                    f"graphs?); build DistributedDataParallel with overlap_grad_reduce=False")
            bucket.ready.add(param)
            while (buffer.next_to_launch < len(buffer.buckets)
                   and len(buffer.buckets[buffer.next_to_launch].ready)
                   == len(buffer.buckets[buffer.next_to_launch].params)):
                self._launch(buffer.buckets[buffer.next_to_launch])

    def _launch(self, bucket: Bucket) -> None:
        if self.gradient_scaling_factor != 1.0:
            bucket.data.mul_(self.gradient_scaling_factor)
        bucket.buffer.start_grad_sync(bucket)

    def shard(self, bucket: Bucket) -> tuple[int, int]:
        """This rank's ``[start, end)`` of ``bucket`` in its buffer's coordinates."""
        return bucket.owned()

    # --- the public protocol (Megatron-Core's names) ------------------------------------

    @contextlib.contextmanager
    def no_sync(self):
        """Backward passes inside only accumulate into ``main_grad``; no communication."""
        self._sync_enabled = False
        try:
            yield
        finally:
            self._sync_enabled = True

    def finish_grad_sync(self) -> None:
        """Launch the buckets not yet in flight, wait for all: ``main_grad`` then holds the
        data-parallel mean (sum, with ``calculate_per_token_loss``). Call once after the last
        micro-batch's backward."""
        for buffer in self.buffers:
            if buffer.size > 1:
                for bucket in buffer.buckets[buffer.next_to_launch:]:
                    self._launch(bucket)
                buffer.finish_grad_sync()
            elif self.gradient_scaling_factor != 1.0:  # experts no other rank holds
                buffer.grads.mul_(self.gradient_scaling_factor)
        self._reset_buckets()

    def start_param_sync(self) -> None:
        """All-gather every bucket's parameters from the shards their owners updated
        (distributed optimizer); asynchronous with ``overlap_param_gather``, else done on
        return."""
        for buffer in self.buffers:
            buffer.start_param_sync(self.overlap_param_gather)

    def finish_param_sync(self) -> None:
        """Wait for every parameter all-gather still in flight."""
        for bucket in self.buckets:
            self._wait_for_params(bucket)

    @staticmethod
    def _wait_for_params(bucket: Bucket) -> None:
        if bucket.param_handle is not None:
            bucket.param_handle.wait()
            bucket.param_handle = None

    def _wait_for_own_params(self, module: nn.Module, args) -> None:
        for param in module.parameters(recurse=False):
            bucket = self._bucket_of.get(param)
            if bucket is not None:
                self._wait_for_params(bucket)

    @torch.no_grad()
    def scale_gradients(self, scaling: float) -> None:
        """Multiply every ``main_grad`` by ``scaling`` (after `finish_grad_sync`)."""
        for buffer in self.buffers:
            buffer.grads.mul_(scaling)

    def zero_grad_buffer(self) -> None:
        """Zero every ``main_grad`` (one fill per buffer); call before each iteration."""
        for buffer in self.buffers:
            buffer.grads.zero_()
        for param in self._bucket_of:
            param.grad = None
        self._reset_buckets()

    def _reset_buckets(self) -> None:
        for buffer in self.buffers:
            buffer.reset()

    def state_dict(self, *args, **kwargs):
        """The wrapped module's (no ``module.`` prefix: checkpoints do not depend on DP)."""
        return self.module.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.module.load_state_dict(state_dict, strict=strict, assign=assign)


def finish_param_sync(chunks: list[nn.Module]) -> None:
    """Wait for the parameter all-gathers still in flight in ``chunks`` (the distributed
    optimizer's, overlapped with the next forward): every rank then holds the updated
    weights."""
    for chunk in chunks:
        if isinstance(chunk, DistributedDataParallel):
            chunk.finish_param_sync()


def _check_instances(instances: int, use_distributed_optimizer: bool, data_parallel_group,
                     expert_data_parallel_group) -> None:
    """`DistributedDataParallel`'s rules for ``num_distributed_optimizer_instances``."""
    if not isinstance(instances, int) or isinstance(instances, bool) or instances < 1:
        raise ValueError(f"num_distributed_optimizer_instances={instances!r} must be a positive "
                         "integer")
    if instances == 1:
        return
    if not use_distributed_optimizer:
        raise ValueError(f"num_distributed_optimizer_instances={instances} needs "
                         "use_distributed_optimizer=True (the instances shard its state)")
    if data_parallel_group is not None or expert_data_parallel_group is not None:
        raise ValueError(f"num_distributed_optimizer_instances={instances} takes its groups "
                         "from parallel_state; do not pass data_parallel_group or "
                         "expert_data_parallel_group")
    initialized = parallel_state.get_num_distributed_optimizer_instances()
    if initialized != instances:
        raise ValueError(f"num_distributed_optimizer_instances={instances} but parallel_state "
                         f"was initialized with num_distributed_optimizer_instances="
                         f"{initialized}")
