"""Rotary position embeddings (Su et al. 2021), the "rotate half" form of GPT-NeoX/Megatron
(channel ``i`` turns with channel ``i + r / 2``) or the interleaved one of GPT-J and Megatron's
``--rotary-interleaved`` (channel ``2i`` with ``2i + 1``), with Llama 3.1's frequency scaling,
YaRN's (Peng et al. 2023, as DeepSeek-V2 and V3 use it) and Megatron's partial rotation
(``rotary_percent``: only the first ``rotary_dim`` channels of each head rotate, frequencies
over those) as options."""

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


def yarn_frequencies(inv_freq: torch.Tensor, base: float, factor: float, original_context: int,
                     beta_fast: float, beta_slow: float, round_to_int: bool = True
                     ) -> torch.Tensor:
    """YaRN's ``inv_freq [dim / 2]``: pairs of channels that turn more than ``beta_fast``
    times over the ``original_context`` keep their frequency, those turning fewer than
    ``beta_slow`` times are divided by ``factor`` (interpolated), and those between move
    linearly from one to the other with the pair's index (the ramp's ends rounded outwards
    to whole pairs with ``round_to_int``, DeepSeek's; fractional without, gpt-oss's)."""
    dim = 2 * inv_freq.numel()

    def pair(turns: float) -> float:  # the (fractional) pair that turns this often
        return dim * math.log(original_context / (turns * 2 * math.pi)) / (2 * math.log(base))

    low, high = pair(beta_fast), pair(beta_slow)
    if round_to_int:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = (torch.arange(dim // 2, dtype=torch.float32, device=inv_freq.device) - low) \
        / max(high - low, 1e-3)
    interpolated = ramp.clamp(0.0, 1.0)
    return inv_freq / factor * interpolated + inv_freq * (1 - interpolated)


def rotary_freqs(seq_length: int, dim: int, base: float, device,
                 scaling_factor: float | None = None,
                 interpolation_factor: float | None = None,
                 yarn: dict | None = None) -> torch.Tensor:
    """Angles ``[s, 1, 1, dim]`` for the ``dim`` rotated channels of a head (``rotary_dim``:
    all of them unless ``rotary_percent < 1``): position ``p`` (``p / interpolation_factor``
    when given: linear position interpolation) times ``base^(-2i / dim)`` (scaled by
    `scale_frequencies` when ``scaling_factor`` is given, by `yarn_frequencies` with the
    ``yarn`` arguments), repeated for the two halves that ``apply_rotary`` rotates against
    each other."""
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
    if scaling_factor is not None:
        inv_freq = scale_frequencies(inv_freq, scaling_factor)
    if yarn is not None:
        inv_freq = yarn_frequencies(inv_freq, base, **yarn)
    positions = torch.arange(seq_length, dtype=torch.float32, device=device)
    if interpolation_factor is not None:
        positions = positions / interpolation_factor
    angles = torch.outer(positions, inv_freq)
    return torch.cat((angles, angles), dim=-1)[:, None, None, :]


def apply_rotary(x: torch.Tensor, freqs: torch.Tensor, magnitude: float = 1.0,
                 interleaved: bool = False) -> torch.Tensor:
    """Rotate the first ``r`` channels of ``x [s, b, heads, head_dim]`` by ``freqs
    [s, 1, 1, r]`` (`rotary_freqs`' halves; math in fp32), times ``magnitude`` (YaRN's; 1
    otherwise); the other ``head_dim - r`` pass through unchanged (Megatron's
    ``rotary_percent``). Pair ``j`` of the ``r / 2`` turns by angle ``freqs[..., j]``: channels
    ``j`` and ``j + r / 2``, or with ``interleaved`` ``2j`` and ``2j + 1``."""
    rotary_dim = freqs.size(-1)
    if rotary_dim < x.size(-1):
        return torch.cat((apply_rotary(x[..., :rotary_dim], freqs, magnitude, interleaved),
                          x[..., rotary_dim:]), dim=-1)
    if interleaved:  # [..., r / 2, 2] pairs, each pair's angle repeated for its two channels
        x1, x2 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
        rotated = torch.stack((-x2, x1), dim=-1).flatten(-2)
        freqs = freqs[..., :rotary_dim // 2].repeat_interleave(2, dim=-1)
    else:
        x1, x2 = x.float().chunk(2, dim=-1)
        rotated = torch.cat((-x2, x1), dim=-1)
    cos, sin = freqs.cos(), freqs.sin()
    if magnitude != 1.0:
        cos, sin = cos * magnitude, sin * magnitude
    return (x.float() * cos + rotated * sin).to(x.dtype)
