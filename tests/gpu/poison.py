"""Poisoned outputs for kernel tests: an element the kernel forgets to write reads as NaN.

The extension allocates its outputs itself, through torch's caching allocator. ``poison``
empties the allocator's cache, allocates blocks of the sizes the next call will ask for (in its
order), fills them with NaN and frees them: the call's allocations then get exactly those blocks
(best fit among the only free ones). ``assert_poisoned`` proves an output did, so a test can
never pass on memory that merely happened to hold the right values.
"""

from __future__ import annotations

import torch


def poison(*specs: tuple[tuple[int, ...], torch.dtype]) -> list[tuple[int, int]]:
    """NaN-filled, freed CUDA blocks of these (shape, dtype); returns their address ranges."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    blocks = [torch.full(shape, float("nan"), dtype=dtype, device="cuda") for shape, dtype in specs]
    ranges = [(b.data_ptr(), b.data_ptr() + b.numel() * b.element_size()) for b in blocks]
    torch.cuda.synchronize()
    del blocks
    return ranges


def assert_poisoned(t: torch.Tensor, ranges: list[tuple[int, int]], what: str) -> None:
    """``t`` lies in one of the poisoned blocks, so an unwritten element of it is NaN."""
    lo, hi = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
    assert any(a <= lo and hi <= b for a, b in ranges), \
        f"{what} was not allocated in poisoned memory: unwritten elements would go unseen"
