"""A rank's random-number generators as a flat dict of tensors, and back.

What a rank draws from: Python's ``random``, NumPy's legacy global generator, torch's CPU
generator, the current CUDA device's generator (on GPU ranks), and every named state of the
tensor-parallel RNG tracker (`mp.tensor_parallel.get_cuda_rng_tracker`). Keys::

    python.state  int64 [625]      python.gauss  float64 [2] (has a cached value, the value)
    numpy.key     int64 [624]      numpy.extra   float64 [3] (position, has gauss, gauss)
    torch         uint8            cuda          uint8 (only when the device is CUDA)
    tracker.<name> uint8

These states belong to one rank of one layout: they are restored only when a checkpoint is
loaded at the layout that wrote it (see `mp.checkpointing.checkpoint`).
"""

from __future__ import annotations

import random

import numpy as np
import torch

from mp.device import get_device
from mp.tensor_parallel import get_cuda_rng_tracker

_TRACKER = "tracker."


def get_rng_state() -> dict[str, torch.Tensor]:
    """This rank's generator states (see the module doc)."""
    version, internal, gauss = random.getstate()
    if version != 3:
        raise ValueError(f"Python's random state has version {version}; checkpoints know 3")
    kind, key, pos, has_gauss, cached = np.random.get_state()
    if kind != "MT19937":
        raise ValueError(f"NumPy's global generator is {kind}; checkpoints know MT19937")
    states = {
        "python.state": torch.tensor(internal, dtype=torch.int64),
        "python.gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "numpy.key": torch.from_numpy(key.astype(np.int64)),
        "numpy.extra": torch.tensor([pos, has_gauss, cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
    }
    if get_device().type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state()
    for name, state in get_cuda_rng_tracker().get_states().items():
        states[_TRACKER + name] = state.cpu()
    return states


def set_rng_state(states: dict[str, torch.Tensor]) -> None:
    """Restore what `get_rng_state` captured (on a rank of the same layout)."""
    has_gauss, gauss = states["python.gauss"].tolist()
    random.setstate((3, tuple(states["python.state"].tolist()),
                     gauss if has_gauss else None))
    pos, np_has_gauss, np_gauss = states["numpy.extra"].tolist()
    np.random.set_state(("MT19937", states["numpy.key"].numpy().astype(np.uint32), int(pos),
                         int(np_has_gauss), np_gauss))
    torch.set_rng_state(states["torch"])
    if "cuda" in states:
        if get_device().type != "cuda":
            raise ValueError("the checkpoint holds a CUDA generator state but this rank "
                             "computes on the CPU")
        torch.cuda.set_rng_state(states["cuda"])
    tracker = {key[len(_TRACKER):]: value for key, value in states.items()
               if key.startswith(_TRACKER)}
    get_cuda_rng_tracker().set_states(tracker)

