"""Which device this rank computes on."""

import os

import torch


def get_device() -> torch.device:
    """``MP_DEVICE`` when set (``cpu``, ``cuda``, ``cuda:1``), else the current CUDA device when
    there is one, else the CPU. Code never hard-codes ``"cuda"``; it asks here."""
    name = os.environ.get("MP_DEVICE")
    if name:
        device = torch.device(name)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
