"""Rotary position embeddings (Su et al. 2021), the "rotate half" form of GPT-NeoX/Megatron,
with Llama 3.1's frequency scaling and Megatron's partial rotation (``rotary_percent``: only
the first ``rotary_dim`` channels of each head rotate, frequencies over those) as options."""

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


def rotary_freqs(seq_length: int, dim: int, base: float, device,
                 scaling_factor: float | None = None,
                 interpolation_factor: float | None = None) -> torch.Tensor:
    """Angles ``[s, 1, 1, dim]`` for the ``dim`` rotated channels of a head (``rotary_dim``:
    all of them unless ``rotary_percent < 1``): position ``p`` (``p / interpolation_factor``
    when given: linear position interpolation) times ``base^(-2i / dim)`` (scaled by
    `scale_frequencies` when ``scaling_factor`` is given), repeated for the two halves that
    ``apply_rotary`` rotates against each other."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    if scaling_factor is not None:
        inv_freq = scale_frequencies(inv_freq, scaling_factor)
    positions = torch.arange(seq_length, dtype=torch.float32, device=device)
    if interpolation_factor is not None:
        positions = positions / interpolation_factor
    angles = torch.outer(positions, inv_freq)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate the first ``r`` channels of ``x [s, b, heads, head_dim]`` by ``freqs
    [s, 1, 1, r]`` (math in fp32); the other ``head_dim - r`` pass through unchanged
    (Megatron's ``rotary_percent``)."""
    rotary_dim = freqs.size(-1)
    if rotary_dim < x.size(-1):
        return torch.cat((apply_rotary(x[..., :rotary_dim], freqs), x[..., rotary_dim:]), dim=-1)
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * freqs.cos() + rotated * freqs.sin()).to(x.dtype)
