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


def reference_rotary(x: torch.Tensor, rotary_dim: int, interleaved: bool = False
                     ) -> torch.Tensor:
    """``x [s, b, heads, d]`` in float64 with channel pairs ``(i, i + r/2)``, ``i < r/2``
    (``interleaved``: ``(2i, 2i + 1)``), as complex numbers multiplied by ``exp(i angle)``;
    channels ``r..d`` as they were."""
    x = x.double()
    half = rotary_dim // 2
    angles = reference_angles(torch.arange(x.size(0)), rotary_dim)
    turn = torch.polar(torch.ones_like(angles), angles)[:, None, None, :]
    if interleaved:
        z = torch.complex(x[..., 0:rotary_dim:2], x[..., 1:rotary_dim:2]) * turn
        rotated = torch.stack((z.real, z.imag), dim=-1).flatten(-2)
        return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
    z = torch.complex(x[..., :half], x[..., half:rotary_dim]) * turn
    return torch.cat((z.real, z.imag, x[..., rotary_dim:]), dim=-1)


@pytest.mark.parametrize("interleaved", [False, True], ids=["halves", "interleaved"])
@pytest.mark.parametrize("kv_channels,rotary_percent,rotary_dim", [
    (16, 1.0, 16), (16, 0.5, 8), (20, 0.3, 6), (24, 0.25, 6)])
def test_partial_rotation_matches_float64(kv_channels, rotary_percent, rotary_dim,
                                          interleaved):
    """Megatron's ``int(kv_channels x rotary_percent)`` channels rotate, frequencies over
    them, in pairs of halves or (``--rotary-interleaved``) of neighbours; the rest pass
    through bit for bit."""
    cfg = _config(kv_channels, rotary_percent)
    assert cfg.rotary_dim == rotary_dim
    x = seeded((S, 2, 3, kv_channels), 1)
    got = apply_rotary(x, rotary_freqs(S, cfg.rotary_dim, BASE, x.device),
                       interleaved=interleaved)
    assert_rel_close(got, reference_rotary(x, rotary_dim, interleaved), what="rotated tensor")
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


@pytest.mark.parametrize("dim,base,factor,original,beta_fast,beta_slow,mscale,mscale_all_dim", [
    (64, 10000.0, 40.0, 4096, 32.0, 1.0, 0.707, 0.707),  # DeepSeek-V2-Lite
    (64, 10000.0, 40.0, 4096, 32.0, 1.0, 1.0, 1.0),  # DeepSeek-V3
    (16, 500000.0, 8.0, 8192, 16.0, 2.0, 1.0, 0.5),
    (4, 100.0, 4.0, 64, 32.0, 1.0, 0.8, 0.0),  # a ramp that collapses; no softmax scaling
])
def test_yarn_matches_transformers(dim, base, factor, original, beta_fast, beta_slow, mscale,
                                   mscale_all_dim):
    """YaRN's frequencies, the rotated channels' magnitude and the scores' scale against
    transformers' DeepSeek-V3 (`ROPE_INIT_FUNCTIONS["yarn"]`, `yarn_apply_mscale`)."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale
    parameters = {"rope_type": "yarn", "rope_theta": base, "factor": factor,
                  "original_max_position_embeddings": original, "beta_fast": beta_fast,
                  "beta_slow": beta_slow, "mscale": mscale, "mscale_all_dim": mscale_all_dim}
    hf = transformers.DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, qk_rope_head_dim=dim, qk_nope_head_dim=8,
        max_position_embeddings=int(original * factor), rope_parameters=parameters)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    cfg = TransformerConfig(
        num_layers=1, hidden_size=64, num_attention_heads=4, vocab_size=64, seq_length=8,
        multi_latent_attention=True, qk_head_dim=8, qk_pos_emb_head_dim=dim,
        position_embedding_type="rope", rotary_base=base, rope_type="yarn",
        yarn_rotary_scaling_factor=factor, yarn_original_max_position_embeddings=original,
        yarn_beta_fast=beta_fast, yarn_beta_slow=beta_slow, yarn_mscale=mscale,
        yarn_mscale_all_dim=mscale_all_dim)
    angles = rotary_freqs(3, dim, base, "cpu", yarn=cfg.yarn_arguments)
    assert_rel_close(angles[1, 0, 0, :dim // 2], inv_freq, rtol=1e-6, what="frequencies")
    assert torch.equal(angles[2], 2 * angles[1])
    if mscale_all_dim:  # transformers infers the magnitude from both, as DeepSeek's code
        # does; with mscale_all_dim 0 DeepSeek's m(mscale) / 1 is mp's, transformers' m(1)
        assert cfg.rotary_magnitude == pytest.approx(attention_factor, rel=1e-12)
    assert cfg.softmax_scale == pytest.approx(yarn_apply_mscale(parameters, (8 + dim) ** -0.5),
                                              rel=1e-12)
    plain = TransformerConfig(**{**vars(cfg), "rope_type": "rope"})
    assert plain.rotary_magnitude == 1.0
    assert plain.softmax_scale == pytest.approx((8 + dim) ** -0.5, rel=1e-15)


def test_the_magnitude_scales_the_rotated_channels_only():
    x = torch.randn(5, 2, 3, 8, dtype=torch.float64)
    freqs = rotary_freqs(5, 4, 100.0, "cpu").double()
    scaled = apply_rotary(x, freqs, magnitude=1.5)
    assert torch.allclose(scaled[..., :4], 1.5 * apply_rotary(x, freqs)[..., :4])
    assert torch.equal(scaled[..., 4:], x[..., 4:])
