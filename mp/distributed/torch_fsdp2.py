"""Fully sharded data parallelism (ZeRO-3) through PyTorch's FSDP2: Megatron's
``--use-torch-fsdp2`` (``training.use_torch_fsdp2``).

`TorchFullyShardedDataParallel` replaces `DistributedDataParallel` around a GPT chunk and
calls ``torch.distributed.fsdp.fully_shard`` on it, as Megatron-Core's wrapper of the same name
does:

- units: every transformer layer, the embedding and the output layer are each one unit; the
  chunk itself is the root, which holds what is left (the final norm, multi-token prediction).
  With tied embeddings the chunk reads the word-embedding matrix itself to hand it to the
  output layer (the embedding's, or a last stage's copy in the output layer): the embedding
  and the output layer of a last stage then stay in the root, whose parameters are gathered
  for its whole forward and backward (Megatron refuses tied embeddings instead).
- sharding: over a 1-D mesh of the data-parallel group with context parallelism (DP x CP ranks
  hold the same weights). Each parameter becomes a ``DTensor`` sharded along dim 0 the way
  ``torch.chunk`` cuts it: rank ``r`` holds rows ``[r c, (r + 1) c)`` of the tensor it would
  hold without FSDP (its TP shard), ``c = ceil(rows / size)``, the last ranks fewer or none
  (`dp_shard_range`). Tensor-parallel layers keep their own collectives: FSDP shards each TP
  rank's local tensor, and the ranks of a DP group hold equal shapes. Untrained parameters
  (``requires_grad=False``: a router's expert bias, which mp moves in place after each
  iteration by the token counts summed over DP x CP) stay out of FSDP (``ignored_params``):
  whole and equal on every rank, as without FSDP. Experts (EP 1) are sharded like the rest.
- communication: a unit's parameters are all-gathered before its forward and freed after it
  (``reshard_after_forward``, passed explicitly as Megatron does, so the root's too),
  gathered again before its backward, and its gradients are reduce-scattered right after
  (averaged over DP x CP, summed with ``calculate_per_token_loss``). Like Megatron's wrapper,
  whose ``no_sync`` does nothing, every micro-batch reduce-scatters; the sharded gradients
  accumulate in ``.grad``. Under full recompute the rerun of a unit's forward takes its
  backward's gather: the unit stays gathered from the rerun to its backward.
- backward prefetch, set explicitly: each unit's backward starts the all-gather of the unit
  before it (the root's, of the last unit; the first unit names itself, already gathered, as
  an empty list means FSDP2's default). The default walks back through the units the forwards
  recorded since the last backward ended, newest first. Under 1F1B the first stage's first
  backward follows two forwards: its units take micro-batch 2's records, and the record before
  the first unit's is micro-batch 1's last unit, whose gather this backward never uses; FSDP2
  takes every backward for the iteration's last (``set_is_last_backward``), drops that gather
  and its records when the backward ends, and gathers the unit again in the next backward.
- precision: parameters are sharded in fp32 and are the optimizer's masters. A bf16 model
  computes in bf16: its weights are all-gathered cast to bf16 and its gradients are reduced in
  fp32 (``reduce_dtype``; bf16 with ``grad_reduce_in_bf16``). fp16 is refused, as in
  Megatron: the loss scaler only acts on fp16 parameters, and FSDP's are fp32.
- parameter attributes: FSDP2 replaces each parameter by a new one, so mp's markers
  (``tensor_model_parallel``, ``sequence_parallel``, ``shared``, ``embedding_group_sync``,
  ``allreduce``, ...) are copied onto the sharded parameters (Megatron does the same).

After backward, `mp.distributed.finalize_model_grads` works on the local shards
(`local_tensor`): sequence-parallel gradients summed over TP, the tied embedding's over the
embedding group; the ranks of either group share a DP rank, so their shards line up. The
optimizer (`mp.optim.MixedPrecisionOptimizer`) updates each parameter's local rows in place
and sums the gradient norm over every rank. A checkpoint stores each rank's rows at their
place in the global tensor (`mp.checkpointing.state`): whole tensors, which load with or
without FSDP at any layout.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from mp import parallel_state


def local_tensor(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """This rank's part of an FSDP ``DTensor`` (a parameter or its gradient), sharing its
    storage; any other tensor (or None) as it is."""
    if not isinstance(tensor, DTensor):
        return tensor
    with torch.no_grad():  # the local tensor itself, not an autograd view of it
        return tensor.to_local()


def dp_shard_range(param: DTensor) -> tuple[int, int]:
    """``[start, end)``, row-major in the unsharded (TP-local) tensor, of the rows this rank
    holds of the FSDP parameter ``param`` (the module doc's ``torch.chunk`` rule)."""
    rows = param.shape[0]
    mesh = param.device_mesh
    per_rank = math.ceil(rows / mesh.size())
    first = min(mesh.get_coordinate()[0] * per_rank, rows)
    last = min(first + per_rank, rows)
    row = param.numel() // rows if rows else 0
    if local_tensor(param).shape[0] != last - first:
        raise RuntimeError(f"an FSDP parameter of shape {tuple(param.shape)} holds "
                           f"{local_tensor(param).shape[0]} rows here, not rows [{first}, "
                           f"{last}) as torch.chunk splits them")
    return first * row, last * row


def fsdp_units(chunk: nn.Module) -> list[nn.Module]:
    """The modules of a GPT chunk that become FSDP units, in forward order (module doc)."""
    units = list(chunk.decoder.layers)
    output = getattr(chunk, "output_layer", None)
    embedding = getattr(chunk, "embedding", None)
    read_by_root = output is not None and chunk.share_embeddings  # `GPTModel._logits`
    if embedding is not None and not read_by_root:
        units.insert(0, embedding)
    if output is not None and not read_by_root:
        units.append(output)
    return units


def _markers(module: nn.Module) -> dict[str, dict]:
    """Each parameter's Python attributes (mp's markers), by name."""
    return {name: dict(vars(param)) for name, param in module.named_parameters()}


class TorchFullyShardedDataParallel(nn.Module):
    """Shard ``module`` (a GPT chunk) with FSDP2; see the module doc.

    Args:
        module: the chunk, its parameters fp32 or bf16 (fp16 is refused); bf16 ones are
            turned into fp32 shards that compute in bf16.
        data_parallel_group: the sharding group; default ``parallel_state.
            get_data_parallel_group(with_context_parallel=True)``.
        reshard_after_forward: free each unit's gathered weights after its forward and
            gather them again for backward (Megatron's default); False keeps them from
            forward to backward (``--torch-fsdp2-no-reshard-after-forward``).
        calculate_per_token_loss: sum the gradients over DP x CP instead of averaging them
            (`mp.distributed.finalize_model_grads` divides by the token count).
        grad_dtype: the dtype gradients are reduced in: fp32, or bf16 for a bf16 model.
    """

    fully_sharded = True  # the optimizer sums its norm over every rank (`get_megatron_optimizer`)

    def __init__(self, module: nn.Module, *, data_parallel_group=None,
                 reshard_after_forward: bool = True, calculate_per_token_loss: bool = False,
                 grad_dtype: torch.dtype = torch.float32):
        super().__init__()
        dtypes = {p.dtype for p in module.parameters()}
        if torch.float16 in dtypes:
            raise ValueError("TorchFullyShardedDataParallel: fp16 parameters are not supported "
                             "(Megatron's --use-torch-fsdp2 refuses --fp16 too); use bf16")
        compute = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float32
        if grad_dtype not in (torch.float32, compute):
            raise ValueError(f"grad_dtype={grad_dtype} needs a {grad_dtype} model; this one "
                             f"computes in {compute}")
        self.module = module
        self.data_parallel_group = (
            parallel_state.get_data_parallel_group(with_context_parallel=True)
            if data_parallel_group is None else data_parallel_group)
        device = next(module.parameters()).device
        mesh = DeviceMesh.from_group(self.data_parallel_group, device.type)
        markers = _markers(module)
        untrained = {p for p in module.parameters() if not p.requires_grad}
        with torch.no_grad():
            for param in module.parameters():
                if param not in untrained:
                    param.data = param.data.float()
        options = dict(mesh=mesh, reshard_after_forward=reshard_after_forward,
                       mp_policy=MixedPrecisionPolicy(param_dtype=compute,
                                                      reduce_dtype=grad_dtype),
                       ignored_params=untrained)
        units = fsdp_units(module)
        for unit in units:
            fully_shard(unit, **options)
        fully_shard(module, **options)
        # each unit's backward prefetches the unit before it (the root's, the last unit), the
        # first one itself (already gathered: an empty list means FSDP2's default, module doc)
        backward = [module, *reversed(units)]
        for unit, following in zip(backward, backward[1:] + backward[-1:]):
            unit.set_modules_to_backward_prefetch([following])
        for name, param in module.named_parameters():
            for key, value in markers[name].items():
                setattr(param, key, value)
        if calculate_per_token_loss:  # a plain SUM in every unit (gloo has no premul sum)
            for unit in (*fsdp_units(module), module):
                unit.set_gradient_divide_factor(1.0)
                unit.set_force_sum_reduction_for_comms(True)

    def forward(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    # --- the data-parallel wrappers' protocol (Megatron-Core's names) --------------------

    @contextlib.contextmanager
    def no_sync(self):
        """Nothing to switch off: every micro-batch reduce-scatters (module doc)."""
        yield

    def finish_grad_sync(self) -> None:
        """Nothing left in flight: FSDP2 waits for its reduce-scatters at the end of each
        backward."""

    @torch.no_grad()
    def scale_gradients(self, scaling: float) -> None:
        """Multiply this rank's gradient shards by ``scaling`` (after backward)."""
        grads = [local_tensor(p.grad) for p in self.module.parameters() if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scaling)

    def zero_grad_buffer(self) -> None:
        """Drop the sharded gradients; call before each iteration."""
        for param in self.module.parameters():
            param.grad = None

    def state_dict(self, *args, **kwargs):
        """The wrapped module's (``DTensor`` values, no ``module.`` prefix)."""
        return self.module.state_dict(*args, **kwargs)

