"""Recompute a function's output instead of keeping it: Megatron-Core's
``CheckpointWithoutOutput``.

`mp.tensor_parallel.checkpoint` keeps a function's inputs and recomputes its insides; its
output is still kept by whatever consumes it. Here the output is dropped too. A norm's output,
an activation's or multi-latent attention's up-projected queries, keys and values are saved
by the layer that reads them (a linear layer keeps its input), and they are cheap to rebuild
from the function's inputs, which are kept anyway (the layer input, the up projection, the
latents). So::

    ckpt = CheckpointWithoutOutput()
    y = ckpt.checkpoint(norm, x)           # y computed without a graph; x kept
    out = consumer(y)                       # consumer saves y for its backward
    ckpt.discard_output_and_register_recompute(out)   # y's storage freed

and when backward reaches ``out`` (before any of the consumer's own backward), a hook reruns
``norm(x)`` with a graph, copies the result back into ``y``'s storage (so the consumer's saved
``y`` reads it) and keeps that graph for the backward through ``norm``. The function runs
twice, as with `checkpoint`; no tensor of its is kept between forward and backward but its
inputs.

The function must be deterministic and draw no random numbers (norms, activations and
projections; dropout belongs in `checkpoint`, which replays the generators). Every tensor it
returns must be new (not a view of an input: freeing it would free the input).
"""

from __future__ import annotations

import torch

from mp.tensor_parallel.random import save_arguments, saved_arguments


class CheckpointWithoutOutput:
    """One function call whose outputs are recomputed in backward (module doc). Use each
    instance once: `checkpoint`, then `discard_output_and_register_recompute`."""

    def __init__(self):
        self._ctx = None
        self._outputs: tuple[torch.Tensor, ...] | None = None

    def checkpoint(self, run_function, *args):
        """``run_function(*args)``, its tensors' inputs kept for the recompute."""
        outputs = _CheckpointWithoutOutputFunction.apply(run_function, self, *args)
        self._outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        inputs = {_address(a) for a in args if torch.is_tensor(a)}
        for output in self._outputs:
            if _address(output) in inputs - {None}:
                raise ValueError("CheckpointWithoutOutput: the function returned a view of an "
                                 "input; discarding it would free the input")
        return outputs

    def discard_output_and_register_recompute(self, hook_tensor: torch.Tensor) -> None:
        """Free the outputs' storage; recompute it when the gradient of ``hook_tensor`` (a
        tensor computed from every use of the outputs) arrives. Does nothing when
        ``hook_tensor`` takes no gradient (evaluation, no_grad): the outputs stay."""
        if not hook_tensor.requires_grad:
            return
        for output in self._outputs:
            output.untyped_storage().resize_(0)
        hook_tensor.register_hook(self._recompute)

    def _recompute(self, grad: torch.Tensor) -> None:
        ctx = self._ctx
        inputs, outputs = _rerun(ctx)
        for kept, again in zip(self._outputs, outputs):
            storage = kept.untyped_storage()
            storage.resize_(again.untyped_storage().nbytes())
            storage.copy_(again.untyped_storage())
        ctx.recomputed = inputs, outputs
        self._ctx = self._outputs = None  # the graph holds ctx until its backward


def _address(tensor: torch.Tensor) -> int | None:
    """Where ``tensor``'s storage starts; None for an empty one (no memory to share: an
    expert given no tokens)."""
    storage = tensor.untyped_storage()
    return storage.data_ptr() if storage.nbytes() else None


def _rerun(ctx) -> tuple[list, tuple]:
    """The forward's inputs, detached (those that took a gradient take one again), and the
    function's outputs recomputed from them with a graph."""
    args = [a.detach().requires_grad_(needs) if torch.is_tensor(a) else a
            for a, needs in zip(saved_arguments(ctx), ctx.needs_grad)]
    with torch.enable_grad():
        outputs = ctx.run_function(*args)
    return args, outputs if isinstance(outputs, tuple) else (outputs,)


class _CheckpointWithoutOutputFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, run_function, owner, *args):
        ctx.run_function = run_function
        ctx.needs_grad = [torch.is_tensor(a) and a.requires_grad for a in args]
        save_arguments(ctx, args)
        owner._ctx = ctx
        with torch.no_grad():
            return run_function(*args)

    @staticmethod
    def backward(ctx, *grads):
        # recomputed by the hook, or here when the outputs were never discarded
        recomputed = getattr(ctx, "recomputed", None)
        inputs, outputs = recomputed if recomputed is not None else _rerun(ctx)
        ctx.recomputed = None
        pairs = [(o, g) for o, g in zip(outputs, grads)
                 if torch.is_tensor(o) and o.requires_grad and g is not None]
        torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        return (None, None) + tuple(a.grad if torch.is_tensor(a) else None for a in inputs)
