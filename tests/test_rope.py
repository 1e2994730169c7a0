"""Rotary embeddings with Megatron's ``rotary_percent``: `mp.model.rope` against a float64
reference written here (pairs ``(i, i + r/2)`` of the first ``r = rotary_dim`` channels turned
by ``position x base^(-2i / r)``, the other channels untouched), and the tables a GPT hands its
layers, with and without a key/value cache."""

import pytest
import torch
from checks import assert_rel_close, seeded
from harness import run_distributed

from mp import parallel_state as ps
from mp.model import GPTModel, TransformerConfig
from mp.model.inference import InferenceParams
from mp.model.rope import apply_rotary, rotary_freqs

S, BASE = 11, 10000.0


def _config(kv_channels: int, rotary_percent: float) -> TransformerConfig:
    return TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=2,
                             kv_channels=kv_channels, vocab_size=64, seq_length=S,
                             position_embedding_type="rope", rotary_base=BASE,
                             rotary_percent=rotary_percent, hidden_dropout=0.0,
                             attention_dropout=0.0)


def reference_angles(positions: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """``[len(positions), rotary_dim / 2]`` float64: position ``p`` times ``base^(-2i / r)``."""
    i = torch.arange(rotary_dim // 2, dtype=torch.float64)
    return positions.double()[:, None] * BASE ** (-2 * i / rotary_dim)


def reference_rotary(x: torch.Tensor, rotary_dim: int) -> torch.Tensor:
    """``x [s, b, heads, d]`` in float64 with channel pairs ``(i, i + r/2)``, ``i < r/2``, as
    complex numbers multiplied by ``exp(i angle)``; channels ``r..d`` as they were."""
    x = x.double()
    half = rotary_dim // 2
    angles = reference_angles(torch.arange(x.size(0)), rotary_dim)
    turn = torch.polar(torch.ones_like(angles), angles)
    z = torch.complex(x[..., :half], x[..., half:rotary_dim]) * turn[:, None, None, :]
    return torch.cat((z.real, z.imag, x[..., rotary_dim:]), dim=-1)


@pytest.mark.parametrize("kv_channels,rotary_percent,rotary_dim", [
    (16, 1.0, 16), (16, 0.5, 8), (20, 0.3, 6), (24, 0.25, 6)])
def test_partial_rotation_matches_float64(kv_channels, rotary_percent, rotary_dim):
    """Megatron's ``int(kv_channels x rotary_percent)`` channels rotate, frequencies over
    them; the rest pass through bit for bit."""
    cfg = _config(kv_channels, rotary_percent)
    assert cfg.rotary_dim == rotary_dim
    x = seeded((S, 2, 3, kv_channels), 1)
    got = apply_rotary(x, rotary_freqs(S, cfg.rotary_dim, BASE, x.device))
    assert_rel_close(got, reference_rotary(x, rotary_dim), what="rotated tensor")
    assert torch.equal(got[..., rotary_dim:], x[..., rotary_dim:])


def _tables_a_gpt_uses(kv_channels: int, rotary_percent: float) -> list[torch.Tensor]:
    """The ``rotary_freqs`` argument of the decoder: for the whole sequence, then for the
    last four tokens after seven cached ones."""
    ps.initialize_model_parallel(1)
    model = GPTModel(_config(kv_channels, rotary_percent))
    seen = []
    model.decoder.register_forward_pre_hook(lambda _, args: seen.append(args[2]))
    ids = torch.randint(0, 64, (1, S), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
        cache = InferenceParams(S)
        model(ids[:, :7], inference_params=cache)
        cache.sequence_len_offset = 7
        model(ids[:, 7:], inference_params=cache)
    return [seen[0], seen[2]]


@pytest.mark.parametrize("kv_channels,rotary_percent", [(24, 1.0), (24, 0.5)])
def test_a_gpt_hands_its_layers_the_rotary_dim_tables(kv_channels, rotary_percent):
    whole, cached = run_distributed(1, _tables_a_gpt_uses, kv_channels, rotary_percent)[0]
    rotary_dim = int(kv_channels * rotary_percent)
    for freqs, positions in ((whole, torch.arange(S)), (cached, torch.arange(7, S))):
        angles = reference_angles(positions, rotary_dim).repeat(1, 2)[:, None, None, :]
        assert_rel_close(freqs, angles, what=f"angles at positions {positions.tolist()}")


def test_position_interpolation_divides_the_positions():
    """Megatron's ``--rotary-seq-len-interpolation-factor 4``: position ``p`` turns as ``p / 4``
    would; the model refuses it without RoPE or with a factor that is not positive."""
    angles = rotary_freqs(S, 8, BASE, "cpu", interpolation_factor=4.0)[:, 0, 0, :4]
    expected = reference_angles(torch.arange(S) / 4, 8)
    assert_rel_close(angles.double(), expected, rtol=1e-6, what="interpolated angles")
    cfg = _config(16, 1.0)
    for value, extra in ((0.0, {}), (2.0, {"position_embedding_type": "learned_absolute"})):
        with pytest.raises(ValueError, match=f"rotary_seq_len_interpolation_factor={value} "
                                             "must be > 0 and needs position_embedding_type="):
            TransformerConfig(**{**cfg.__dict__, "rotary_seq_len_interpolation_factor": value,
                                 **extra})
