"""NVIDIA apex as an optional extra (`mp.apex`): without apex, asking for it gives one notice and
mp's own norm / torch's AdamW; with an apex package present (a fake one here, apex needs CUDA to
build), its classes are chosen, and the GPT with apex's norms equals the one with mp's on the
same weights."""

from __future__ import annotations

import logging
import sys
import types

import pytest
import torch
from checks import assert_rel_close, seeded
from harness import run_distributed
from torch import nn

from mp import apex as mp_apex
from mp.fused import FusedLayerNorm, FusedRMSNorm
from mp.model import GPTModel, TransformerConfig
from mp.model import norm as mp_norm
from mp.model.norm import build_norm

B, S, VOCAB, H = 2, 16, 96, 32


def _config(**overrides) -> TransformerConfig:
    kw = {"num_layers": 2, "hidden_size": H, "num_attention_heads": 4, "vocab_size": VOCAB,
          "seq_length": S, "make_vocab_size_divisible_by": 8, "hidden_dropout": 0.0,
          "attention_dropout": 0.0}
    return TransformerConfig(**(kw | overrides))


# A stand-in for apex written from the formulas, independent of mp.fused and torch's norms.
class _FakeFusedLayerNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))
        self.bias = nn.Parameter(torch.zeros(normalized_shape))

    def forward(self, x):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + self.eps) * self.weight + self.bias


class _FakeFusedRMSNorm(nn.Module):
    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(normalized_shape))

    def forward(self, x):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + self.eps) * self.weight


class _FakeFusedAdam(torch.optim.AdamW):
    pass


def _install_fake_apex() -> None:
    apex = types.ModuleType("apex")
    apex.normalization = types.ModuleType("apex.normalization")
    apex.normalization.FusedLayerNorm = _FakeFusedLayerNorm
    apex.normalization.FusedRMSNorm = _FakeFusedRMSNorm
    apex.optimizers = types.ModuleType("apex.optimizers")
    apex.optimizers.FusedAdam = _FakeFusedAdam
    sys.modules.update({"apex": apex, "apex.normalization": apex.normalization,
                        "apex.optimizers": apex.optimizers})


def _clear_caches() -> None:
    mp_apex.fused_adam_class.cache_clear()
    mp_apex.norm_class.cache_clear()


@pytest.fixture
def no_apex(monkeypatch):
    """apex not importable (even where it is installed), and mp.apex's answers forgotten."""
    for name in ("apex", "apex.normalization", "apex.optimizers"):
        monkeypatch.setitem(sys.modules, name, None)
    _clear_caches()
    yield
    _clear_caches()


def _apex_notices(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mp.apex"]


@pytest.mark.parametrize("normalization,mp_cls", [("LayerNorm", FusedLayerNorm),
                                                  ("RMSNorm", FusedRMSNorm)])
def test_missing_apex_norm_notice_once_and_mp_norm(no_apex, caplog, normalization, mp_cls):
    caplog.set_level(logging.WARNING, logger="mp.apex")
    config = _config(normalization=normalization, normalization_impl="apex",
                     sequence_parallel=False)
    norms = [build_norm(config) for _ in range(3)]
    notices = _apex_notices(caplog)
    assert len(notices) == 1, notices
    assert "model.normalization_impl=apex" in notices[0] and f"mp's {normalization}" in notices[0]
    assert all(type(n) is mp_cls for n in norms)
    norm = norms[0]
    with torch.no_grad():
        norm.weight.copy_(seeded((H,), 1) + 1)
        if norm.bias is not None:
            norm.bias.copy_(seeded((H,), 2))
    x = seeded((S, B, H), 3)
    expected = (nn.functional.layer_norm(x, (H,), norm.weight, norm.bias, config.layernorm_epsilon)
                if normalization == "LayerNorm" else
                nn.functional.rms_norm(x, (H,), norm.weight, config.layernorm_epsilon))
    assert_rel_close(norm(x), expected, what=f"{normalization} without apex")


def test_missing_apex_adam_notice_once(no_apex, caplog):
    caplog.set_level(logging.WARNING, logger="mp.apex")
    assert mp_apex.fused_adam_class() is None
    assert mp_apex.fused_adam_class() is None
    notices = _apex_notices(caplog)
    assert len(notices) == 1, notices
    assert "training.optimizer_impl=apex" in notices[0] and "torch's AdamW" in notices[0]


def test_mp_impl_never_imports_apex(no_apex, caplog, monkeypatch):
    monkeypatch.setattr(mp_norm, "norm_class", lambda *_: pytest.fail("apex was looked up"))
    assert type(build_norm(_config())) is FusedLayerNorm
    assert not _apex_notices(caplog)


def _check_fake_apex_model(normalization: str, zero_centered_gamma: bool):
    """In a rank of a world of one (the model needs model-parallel groups): build the GPT with
    mp's norms and with the fake apex's, same weights, and compare loss, logits and grads
    (with ``zero_centered_gamma`` both scale by ``1 + weight``, apex's through mp.apex)."""
    from mp import parallel_state as ps

    _install_fake_apex()
    _clear_caches()
    try:
        ps.initialize_model_parallel(1)
        assert mp_apex.fused_adam_class() is _FakeFusedAdam
        arch = {"normalization": normalization,
                "layernorm_zero_centered_gamma": zero_centered_gamma}
        torch.manual_seed(5)
        ref = GPTModel(_config(**arch))
        torch.manual_seed(5)
        model = GPTModel(_config(**arch, normalization_impl="apex"))
        fake = _FakeFusedLayerNorm if normalization == "LayerNorm" else _FakeFusedRMSNorm
        apex_norms = [m for m in model.modules() if isinstance(m, fake)]
        assert len(apex_norms) == 2 * 2 + 1, model  # two per layer and the final one
        assert not any(isinstance(m, (FusedLayerNorm, FusedRMSNorm)) for m in model.modules())
        assert all(p.sequence_parallel is False for m in apex_norms for p in m.parameters())
        assert all(torch.equal(m.weight, torch.full((H,), 0.0 if zero_centered_gamma else 1.0))
                   for m in apex_norms)
        with torch.no_grad():  # norm weights away from ones/zeros, so that they matter
            for i, (name, p) in enumerate(ref.named_parameters()):
                if "layernorm" in name:
                    p.copy_(seeded(p.shape, 10 + i, scale=0.3) + (1 if "weight" in name else 0))
        model.load_state_dict(ref.state_dict())  # strict: same parameter names as mp's norms
        g = torch.Generator().manual_seed(3)
        ids, labels = (torch.randint(0, VOCAB, (B, S), generator=g) for _ in range(2))
        loss, ref_loss = model(ids, labels=labels), ref(ids, labels=labels)
        assert_rel_close(loss, ref_loss, what="loss")
        loss.sum().backward()
        ref_loss.sum().backward()
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            assert_rel_close(p.grad, ref_params[name].grad, what=f"grad of {name}")
        with torch.no_grad():
            assert_rel_close(model(ids), ref(ids), what="logits")
    finally:
        for name in ("apex", "apex.normalization", "apex.optimizers"):
            sys.modules.pop(name, None)
        _clear_caches()


@pytest.mark.parametrize("zero_centered_gamma", [False, True], ids=["", "zero_centered"])
@pytest.mark.parametrize("normalization", ["LayerNorm", "RMSNorm"])
def test_fake_apex_is_chosen_and_model_matches_mp_norms(normalization, zero_centered_gamma):
    run_distributed(1, _check_fake_apex_model, normalization, zero_centered_gamma)


@pytest.mark.parametrize("zero_centered_gamma", [False, True], ids=["", "zero_centered"])
def test_fake_apex_norm_takes_mp_shape_eps_dtype_and_sequence_parallel(monkeypatch,
                                                                       zero_centered_gamma):
    """Under sequence parallelism the norm's gradients are partial sums over TP; the apex
    module's parameters must carry ``sequence_parallel`` as mp's do, so they get summed."""
    _install_fake_apex()
    for name in ("apex", "apex.normalization", "apex.optimizers"):
        monkeypatch.setitem(sys.modules, name, sys.modules[name])  # removed again at the end
    _clear_caches()
    try:
        common = dict(tensor_model_parallel_size=2, sequence_parallel=True,
                      layernorm_epsilon=1e-3, precision="bf16",
                      layernorm_zero_centered_gamma=zero_centered_gamma)
        norm = build_norm(_config(**common, normalization_impl="apex"))
        mp_norm = build_norm(_config(**common))
        assert isinstance(norm, _FakeFusedLayerNorm) and norm.eps == 1e-3
        assert norm.sequence_parallel is True
        params, mp_params = dict(norm.named_parameters()), dict(mp_norm.named_parameters())
        assert set(params) == set(mp_params) == {"weight", "bias"}
        for name, p in params.items():
            q = mp_params[name]
            assert (p.shape, p.dtype, p.device) == (q.shape, torch.bfloat16, q.device)
            assert p.sequence_parallel is q.sequence_parallel is True
    finally:
        _clear_caches()
