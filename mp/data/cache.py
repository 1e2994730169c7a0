"""Files built once and shared by every rank: atomic writes and "one rank builds, others wait".

Index caches (`GPTDataset`'s document, sample and shuffle indices) and the embedded corpus are
built by the first rank of the group while the others wait, then loaded by everyone. Each file
is written under a temporary name and renamed into place, so a reader never sees a half-written
file and two builders racing on a shared disk do no harm. After the wait a rank that still
finds nothing (the cache directory is node-local and it is on another node) builds it itself:
the result is deterministic, so every node ends up with the same files.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch.distributed as dist


@contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success rename it to ``path``, on error
    delete it."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_array(path: str, values: np.ndarray) -> None:
    """``numpy.save`` to ``path`` (which must end in ``.npy``), atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, values, allow_pickle=False)


def build_once(
    is_built: Callable[[], bool],
    build: Callable[[], None],
    what: str,
    group: dist.ProcessGroup | None = None,
) -> bool:
    """Make sure ``is_built()`` holds on every rank, calling ``build()`` as few times as the
    file system allows. Returns whether this rank built.

    Without ``torch.distributed`` initialized this is ``if not is_built(): build()``. Otherwise
    it is collective over ``group`` (default: the world): rank 0 of the group builds if needed
    while the others wait; a failure on rank 0 is raised on every rank (naming ``what``) instead
    of leaving them waiting.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return _build_if_missing(is_built, build)
    first = dist.get_rank(group) == 0
    outcome = [None]
    built = False
    if first:
        try:
            built = _build_if_missing(is_built, build)
        except BaseException as error:  # even an interrupt: the others must not wait forever
            outcome[0] = f"{type(error).__name__}: {error}"
            _share(outcome, group)
            raise
    _share(outcome, group)
    if outcome[0] is not None:
        raise RuntimeError(f"rank 0 failed to build {what}: {outcome[0]}")
    return built or _build_if_missing(is_built, build)


def _build_if_missing(is_built: Callable[[], bool], build: Callable[[], None]) -> bool:
    if is_built():
        return False
    build()
    return True


def _share(outcome: list, group: dist.ProcessGroup | None) -> None:
    """Broadcast rank 0's outcome (None or an error message); doubles as the barrier."""
    src = 0 if group is None else dist.get_global_rank(group, 0)
    dist.broadcast_object_list(outcome, src=src, group=group)
