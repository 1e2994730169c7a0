"""Find or build the compiled fused kernels (``csrc/``), once per process.

``load_fused_kernels()`` returns the extension module, or ``None`` after logging one line that
says why (no CUDA device, no compiler, a failed build); callers then run torch implementations.
It looks, in order, for

1. ``mp.fused._fused_kernels``, built ahead of time by
   ``MP_BUILD_CUDA_EXT=1 pip install --no-build-isolation .`` (see ``setup.py``);
2. a just-in-time build with ``torch.utils.cpp_extension.load``, cached under
   ``$TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``) in a directory named after
   the torch and CUDA versions and the GPU architectures, so that a shared home directory serves
   several clusters. The first build takes a minute or two; later processes only load it.

Several ranks starting at once build once. cpp_extension guards its build directory with a
``lock`` file created with ``O_EXCL``; processes that find it wait until it disappears, forever
if its builder was killed. So every process here first takes an ``fcntl.flock`` on
``mp_build.lock`` in that directory, which the OS releases when the holder exits or dies: the
holder is the only process inside cpp_extension for the directory, and a ``lock`` file it finds
is stale and is removed. The other ranks block on the flock, then find the build done.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
from pathlib import Path

import torch

EXTENSION_NAME = "mp_fused_kernels"
NVCC_FLAGS = ("-O3", "-lineinfo")

logger = logging.getLogger("mp.fused")


@functools.cache
def load_fused_kernels():
    """The compiled kernels' module, or ``None`` (after a one-line notice) when unavailable."""
    return _find_or_build()


def kernel_sources_dir() -> Path | None:
    """``csrc/``: shipped inside the package by ``setup.py``, or the checkout's top level."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "csrc", here.parents[1] / "csrc"):
        if (candidate / "fused_binding.cpp").is_file():
            return candidate
    return None


def _find_or_build():
    if not torch.cuda.is_available():
        _notice("no CUDA device")
        return None
    try:
        from mp.fused import _fused_kernels  # built ahead of time

        return _fused_kernels
    except ImportError:
        pass
    sources = kernel_sources_dir()
    if sources is None:
        _notice("kernel sources (csrc/) not found and no prebuilt module; install with "
                "MP_BUILD_CUDA_EXT=1")
        return None
    try:
        return _build(sources)
    except Exception as error:  # any build failure means: run the torch path
        logger.debug("building the fused kernels failed", exc_info=True)
        first_line = (str(error).strip().splitlines() or [""])[0]
        _notice(f"could not build them: {type(error).__name__}: {first_line[:160]}; the whole "
                "error is logged at DEBUG level on 'mp.fused'")
        return None


def _notice(reason: str) -> None:
    logger.warning("mp.fused: fused CUDA kernels unavailable (%s); using the torch "
                   "implementations", reason)


def build_directory() -> Path:
    """Where the just-in-time build lives for this torch, CUDA and set of GPU architectures."""
    from torch.utils import cpp_extension

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST")
    if archs:
        archs = archs.replace(" ", "_").replace(";", "_").replace("+", "")
    else:
        capabilities = {torch.cuda.get_device_capability(i)
                        for i in range(torch.cuda.device_count())}
        archs = "_".join(f"sm{major}{minor}" for major, minor in sorted(capabilities))
    return Path(root) / EXTENSION_NAME / f"torch{torch.__version__}-cu{torch.version.cuda}-{archs}"


def _build(sources: Path):
    from torch.utils import cpp_extension

    directory = build_directory()
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "mp_build.lock", "w") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # released by the OS if this process dies
        try:
            (directory / "lock").unlink(missing_ok=True)  # a killed builder's stale baton
            return cpp_extension.load(
                name=EXTENSION_NAME,
                sources=sorted(str(p) for p in sources.iterdir() if p.suffix in (".cpp", ".cu")),
                extra_include_paths=[str(sources)],
                extra_cflags=["-O3"],
                extra_cuda_cflags=list(NVCC_FLAGS),
                build_directory=str(directory),
                verbose=False,
            )
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
