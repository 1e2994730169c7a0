"""Rotary position embeddings (Su et al. 2021), the "rotate half" form of GPT-NeoX/Megatron."""

from __future__ import annotations

import torch


def rotary_freqs(seq_length: int, head_dim: int, base: float, device) -> torch.Tensor:
    """Angles ``[s, 1, 1, head_dim]``: position ``p`` times ``base^(-2i / head_dim)``, repeated
    for the two halves that ``apply_rotary`` rotates against each other."""
    inv_freq = base ** (-torch.arange(0, head_dim, 2, dtype=torch.float32, device=device)
                        / head_dim)
    angles = torch.outer(torch.arange(seq_length, dtype=torch.float32, device=device), inv_freq)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x [s, b, heads, head_dim]`` by ``freqs [s, 1, 1, head_dim]`` (math in fp32)."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return (x.float() * freqs.cos() + rotated * freqs.sin()).to(x.dtype)
