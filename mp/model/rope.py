"""Rotary position embeddings (Su et al. 2021), the "rotate half" form of GPT-NeoX/Megatron,
with Llama 3.1's frequency scaling as an option."""

from __future__ import annotations

import math

import torch

# Llama 3.1's scaling constants (Megatron-LM fixes them too; only the factor varies)
_LOW_FREQ_FACTOR, _HIGH_FREQ_FACTOR, _ORIGINAL_CONTEXT = 1.0, 4.0, 8192


def scale_frequencies(inv_freq: torch.Tensor, factor: float) -> torch.Tensor:
    """Llama 3.1's RoPE scaling of ``inv_freq``: frequencies whose wavelength is shorter than
    ``8192 / 4`` tokens stay, those longer than ``8192`` are divided by ``factor``, and those
    between move smoothly from one to the other (linearly in ``8192 / wavelength``)."""
    wavelength = 2 * math.pi / inv_freq
    mix = ((_ORIGINAL_CONTEXT / wavelength - _LOW_FREQ_FACTOR)
           / (_HIGH_FREQ_FACTOR - _LOW_FREQ_FACTOR)).clamp(0.0, 1.0)
    return (1 - mix) * inv_freq / factor + mix * inv_freq


def rotary_freqs(seq_length: int, head_dim: int, base: float, device,
                 scaling_factor: float | None = None) -> torch.Tensor:
    """Angles ``[s, 1, 1, head_dim]``: position ``p`` times ``base^(-2i / head_dim)`` (scaled
    by `scale_frequencies` when ``scaling_factor`` is given), repeated for the two halves
    that ``apply_rotary`` rotates against each other."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                        / head_dim)
    if scaling_factor is not None:
        inv_freq = scale_frequencies(inv_freq, scaling_factor)
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [s, b, heads, head_dim]`` by ``freqs [s, 1, 1, head_dim]`` (math in fp32)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * freqs.cos() + rotated * freqs.sin()).to(x.dtype)
