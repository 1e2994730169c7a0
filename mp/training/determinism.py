"""Megatron's ``--deterministic-mode`` (``training.deterministic_mode``): the same run twice
gives the same bits.

`check_deterministic` applies Megatron's rules before any process group exists: on CUDA, NCCL's
all-reduce algorithm must be pinned (``NCCL_ALGO`` one of `NCCL_ALGOS`, Megatron's list: NVLS's
in-switch reductions do not add in a fixed order), and cuBLAS's workspace, when the environment
sets it, must be one of the two settings under which cuBLAS is deterministic. Megatron also
refuses its flash-attention and fused cross-entropy kernels; mp's attention and cross-entropy
are PyTorch's own operations, which the switch below makes deterministic or makes raise.

`deterministic_algorithms` then turns on ``torch.use_deterministic_algorithms(True)`` for the
job (an operation without a deterministic implementation raises instead of running) and sets
``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless the environment chose ``:16:8``, before the first
matrix product creates cuBLAS's handle; both are restored afterwards. mp's own integer
bookkeeping (``bincount`` of routed tokens without weights, ``cumsum`` of integer counts) is
deterministic on CUDA; docs/training.md lists what was checked on a GPU.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping

import torch

#: The ``NCCL_ALGO`` values Megatron accepts in deterministic mode.
NCCL_ALGOS = ("Tree", "Ring", "CollnetDirect", "CollnetChain", "^NVLS")
#: The ``CUBLAS_WORKSPACE_CONFIG`` settings under which cuBLAS is deterministic (the first is
#: the one set when the environment sets none).
CUBLAS_WORKSPACE_CONFIGS = (":4096:8", ":16:8")


def uses_cuda(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether the job will compute on CUDA (and reduce over NCCL), as `mp.initialize` decides."""
    return torch.cuda.is_available() and environ.get("MP_DEVICE", "cuda").startswith("cuda")


def check_deterministic(deterministic_mode: bool, environ: Mapping[str, str] = os.environ,
                        cuda: bool | None = None) -> None:
    """ValueError unless a ``deterministic_mode`` job on CUDA (``cuda``; None: `uses_cuda`)
    pins ``NCCL_ALGO`` to one of `NCCL_ALGOS` and leaves ``CUBLAS_WORKSPACE_CONFIG`` unset or
    at one of `CUBLAS_WORKSPACE_CONFIGS`. Nothing to check on the CPU (gloo)."""
    if not deterministic_mode or not (uses_cuda(environ) if cuda is None else cuda):
        return
    algo = environ.get("NCCL_ALGO")
    if algo not in NCCL_ALGOS:
        raise ValueError(f"training.deterministic_mode=true on CUDA needs NCCL_ALGO set to one "
                         f"of {', '.join(NCCL_ALGOS)} (the environment has "
                         f"{'none' if algo is None else repr(algo)}), as in Megatron: NCCL "
                         "otherwise picks its reduction order per call")
    cublas = environ.get("CUBLAS_WORKSPACE_CONFIG")
    if cublas is not None and cublas not in CUBLAS_WORKSPACE_CONFIGS:
        raise ValueError(f"training.deterministic_mode=true needs CUBLAS_WORKSPACE_CONFIG "
                         f"unset or one of {', '.join(CUBLAS_WORKSPACE_CONFIGS)}, not "
                         f"{cublas!r}: cuBLAS is deterministic only with those workspaces")


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """Within: ``torch.use_deterministic_algorithms(True)`` and cuBLAS's deterministic
    workspace when ``enabled`` (module doc); the previous settings come back after."""
    if not enabled:
        yield
        return
    was = (torch.are_deterministic_algorithms_enabled(),
           torch.is_deterministic_algorithms_warn_only_enabled())
    cublas = os.environ.get("CUBLAS_WORKSPACE_CONFIG")
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = cublas or CUBLAS_WORKSPACE_CONFIGS[0]
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was[0], warn_only=was[1])
        if cublas is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
