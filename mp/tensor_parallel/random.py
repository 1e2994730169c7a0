"""Random-number streams for tensor parallelism, and activation checkpointing that replays them.

Dropout has to agree with a serial model in two ways. Outside tensor-parallel regions the
activations are replicated over TP ranks, so the masks must be identical on every TP rank: the
default generator is seeded with the same ``seed`` everywhere. Inside a TP-sharded region
(attention probabilities, split over heads) each rank holds different data and needs a
different stream: the tracker holds a second generator state, seeded with
``seed + 2718 + tp_rank``, that code selects with ``get_cuda_rng_tracker().fork()``.

The tracker swaps states of "the device generator": the CUDA generator on a GPU, the CPU
generator on the CPU (so the same code, and the same tests, run on both). Megatron's name
``get_cuda_rng_tracker`` is kept for ported code.

``checkpoint`` (Chen et al. 2016; Megatron's ``CheckpointFunction``) runs a function without
keeping its activations and recomputes it in backward. It saves the CPU, device and tracker
states before the forward and restores them for the recompute, so recomputed dropout masks
are bit-identical to the original ones.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.comm import all_gather_single
from mp.device import get_device

_MODEL_PARALLEL_RNG_TRACKER_NAME = "model-parallel-rng"
_TENSOR_PARALLEL_SEED_OFFSET = 2718


def _device_type() -> str:
    return get_device().type


def _get_device_rng_state() -> torch.Tensor:
    if _device_type() == "cuda":
        return torch.cuda.get_rng_state()
    return torch.get_rng_state()


def _set_device_rng_state(state: torch.Tensor) -> None:
    if _device_type() == "cuda":
        torch.cuda.set_rng_state(state)
    else:
        torch.set_rng_state(state)


def _manual_seed_device(seed: int) -> None:
    if _device_type() == "cuda":
        torch.cuda.manual_seed(seed)
    else:
        torch.manual_seed(seed)


class CudaRNGStatesTracker:
    """Named generator states that can be swapped in around a block of code.

    ``add(name, seed)`` creates a state; ``with fork(name):`` runs the block on that state and
    keeps where the block left it, so consecutive forks continue one stream.
    """

    def __init__(self):
        self.states_: dict[str, torch.Tensor] = {}
        self.seeds_: set[int] = set()

    def reset(self) -> None:
        self.states_ = {}
        self.seeds_ = set()

    def get_states(self) -> dict[str, torch.Tensor]:
        """A copy of every named state (for checkpoints and recompute)."""
        return {name: state.clone() for name, state in self.states_.items()}

    def set_states(self, states: dict[str, torch.Tensor]) -> None:
        self.states_ = {name: state.clone() for name, state in states.items()}

    def add(self, name: str, seed: int) -> None:
        if seed in self.seeds_:
            raise ValueError(f"seed {seed} already exists in the RNG tracker")
        if name in self.states_:
            raise ValueError(f"RNG state {name!r} already exists in the tracker")
        self.seeds_.add(seed)
        original = _get_device_rng_state()
        _manual_seed_device(seed)
        self.states_[name] = _get_device_rng_state()
        _set_device_rng_state(original)

    @contextlib.contextmanager
    def fork(self, name: str = _MODEL_PARALLEL_RNG_TRACKER_NAME):
        if name not in self.states_:
            raise KeyError(f"RNG state {name!r} is not in the tracker: call "
                           "model_parallel_cuda_manual_seed (or tracker.add) first")
        original = _get_device_rng_state()
        _set_device_rng_state(self.states_[name])
        try:
            yield
        finally:
            self.states_[name] = _get_device_rng_state()
            _set_device_rng_state(original)


_CUDA_RNG_STATE_TRACKER = CudaRNGStatesTracker()


def get_cuda_rng_tracker() -> CudaRNGStatesTracker:
    return _CUDA_RNG_STATE_TRACKER


def model_parallel_cuda_manual_seed(seed: int, tp_rank: int | None = None) -> None:
    """Seed the device generator with ``seed`` (same on every TP rank) and the tracker's
    model-parallel stream with ``seed + 2718 + tp_rank`` (different on every TP rank).

    Like Megatron, this does not add the pipeline offset: the training script seeds with
    ``seed + 100 * pp_rank`` so that pipeline stages differ.
    """
    if tp_rank is None:
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
    _manual_seed_device(seed)
    tracker = get_cuda_rng_tracker()
    tracker.reset()
    tracker.add(_MODEL_PARALLEL_RNG_TRACKER_NAME, seed + _TENSOR_PARALLEL_SEED_OFFSET + tp_rank)


class _RNGSnapshot:
    """The CPU, device and tracker states at one moment."""

    def __init__(self):
        self.cpu = torch.get_rng_state()
        self.device = torch.cuda.get_rng_state() if _device_type() == "cuda" else None
        self.tracker = get_cuda_rng_tracker().get_states()

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.device is not None:
            torch.cuda.set_rng_state(self.device)
        get_cuda_rng_tracker().set_states(self.tracker)


class CheckpointFunction(torch.autograd.Function):
    """Forward without saving activations; backward recomputes with the forward's RNG states.

    With ``distribute_saved_activations`` the first argument (the layer input, replicated over
    TP ranks) is kept as a ``1/TP`` slice per rank and all-gathered for the recompute.
    """

    @staticmethod
    def forward(ctx, run_function, distribute_saved_activations, group, *args):
        ctx.run_function = run_function
        ctx.distribute = distribute_saved_activations
        ctx.group = group
        ctx.rng = _RNGSnapshot()
        ctx.needs_grad = [torch.is_tensor(a) and a.requires_grad for a in args]
        with torch.no_grad():
            outputs = run_function(*args)
        saved = list(args)
        if distribute_saved_activations:
            ctx.first_shape = args[0].shape
            saved[0] = _slice_for_rank(args[0].detach(), group)
        save_arguments(ctx, saved)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        args = saved_arguments(ctx)
        if ctx.distribute:
            args[0] = _gather_slices(args[0], ctx.first_shape, ctx.group)
        inputs = [a.detach().requires_grad_(needs) if torch.is_tensor(a) else a
                  for a, needs in zip(args, ctx.needs_grad)]
        after_forward = _RNGSnapshot()
        ctx.rng.restore()
        with torch.enable_grad():
            outputs = ctx.run_function(*inputs)
        after_forward.restore()
        if torch.is_tensor(outputs):
            outputs = (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grads) if torch.is_tensor(o) and o.requires_grad]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        input_grads = tuple(a.grad if torch.is_tensor(a) else None for a in inputs)
        return (None, None, None) + input_grads


def save_arguments(ctx, args) -> None:
    """Keep a function's arguments on an autograd ``ctx`` for its recompute: the tensors
    through ``save_for_backward``, the rest as they are (`saved_arguments` gives them back)."""
    ctx.tensor_indices = [i for i, a in enumerate(args) if torch.is_tensor(a)]
    ctx.non_tensors = [None if torch.is_tensor(a) else a for a in args]
    ctx.save_for_backward(*(args[i] for i in ctx.tensor_indices))


def saved_arguments(ctx) -> list:
    """The arguments `save_arguments` kept, in order."""
    args = list(ctx.non_tensors)
    for i, t in zip(ctx.tensor_indices, ctx.saved_tensors):
        args[i] = t
    return args


def _slice_for_rank(x: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    world = dist.get_world_size(group)
    if x.numel() % world != 0:
        raise ValueError(f"distribute_saved_activations needs the input's {x.numel()} elements "
                         f"to divide over {world} tensor-parallel ranks")
    return x.reshape(-1).chunk(world)[dist.get_rank(group)].clone()


def _gather_slices(part: torch.Tensor, shape: torch.Size, group: dist.ProcessGroup):
    full = torch.empty(part.numel() * dist.get_world_size(group), dtype=part.dtype,
                       device=part.device)
    all_gather_single(full, part, group=group)
    return full.view(shape)


def checkpoint(function, distribute_saved_activations: bool, *args, group=None):
    """Run ``function(*args)`` and recompute it in backward (Megatron's signature).

    ``group`` (default: the TP group) is only used with ``distribute_saved_activations``.
    """
    if distribute_saved_activations and group is None:
        group = parallel_state.get_tensor_model_parallel_group()
    return CheckpointFunction.apply(function, distribute_saved_activations, group, *args)
