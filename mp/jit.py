"""``jit_fuser``: element-wise code compiled into fused kernels with ``torch.compile``.

Megatron-LM fuses chains of element-wise operations (bias-dropout-add, the cross-entropy's
softmax statistics and gradient) by compiling small pure functions; eager PyTorch runs each
operation as its own kernel and writes every intermediate to memory. ``jit_fuser(fn)`` returns
a function that behaves like ``fn`` and, on CUDA tensors, runs the ``torch.compile`` build of it
(Triton kernels from inductor, ``fullgraph`` so nothing silently falls back piecewise).

On the CPU the function runs eagerly: compiling costs seconds per shape there and buys little
on two cores. ``MP_JIT_FUSION_CPU=1`` compiles on the CPU as well (inductor's C++ backend);
the tests use it to check the compiled code against the eager one. If compiling fails (no
Triton, no C++ compiler, an unsupported GPU), a one-line notice is logged and every fused
function runs eagerly from then on. Only compiler failures are caught: an error raised by the
compiled code when it runs (out of memory, say) propagates as it would eagerly. Called while
an enclosing ``torch.compile`` traces (``model.compile_layers``), ``fn`` is traced into that
graph and nothing is compiled separately.
"""

from __future__ import annotations

import functools
import logging
import os
from typing import Callable, TypeVar

import torch

logger = logging.getLogger(__name__)

Fn = TypeVar("Fn", bound=Callable)

_broken: list[str] = []  # the first compiler failure's message, once one happened


def compiles_on(device: torch.device) -> bool:
    """Whether fused functions take their compiled build for tensors on ``device``."""
    if _broken:
        return False
    return device.type == "cuda" or os.environ.get("MP_JIT_FUSION_CPU") == "1"


def jit_fuser(fn: Fn) -> Fn:
    """``fn`` (a pure function of tensors and Python scalars, its first argument a tensor),
    compiled for the devices `compiles_on` accepts and eager elsewhere. Nothing is imported
    or compiled until a call needs it (importing the compiler costs seconds)."""
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if torch.compiler.is_compiling():  # traced into an enclosing torch.compile's graph
            return fn(*args)
        if compiles_on(args[0].device):
            if compiled is None:
                compiled = torch.compile(fn, fullgraph=True)  # imports torch._dynamo
            try:
                return compiled(*args)
            except torch._dynamo.exc.TorchDynamoException as err:
                _broken.append(str(err).splitlines()[0] if str(err) else type(err).__name__)
                logger.warning("mp.jit: torch.compile failed (%s); fused functions run "
                               "eagerly", _broken[0])
        return fn(*args)

    return run  # type: ignore[return-value]
