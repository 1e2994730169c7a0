"""vocab_parallel_cross_entropy against torch.nn.functional.cross_entropy on the full logits."""

import contextlib

import pytest
import torch
import torch.nn.functional as F

from checks import assert_rel_close, jit_compiled_on_cpu, seeded
from harness import run_distributed
from mp import parallel_state as ps
from mp import tensor_parallel as tp_

S, B, V = 6, 3, 32


def _check(t: int, alpha: float, dtype: torch.dtype, fused: bool = False):
    ps.initialize_model_parallel(t)
    r = ps.get_tensor_model_parallel_rank()
    logits = seeded((S, B, V), 1, scale=4.0)
    target = torch.randint(0, V, (S, B), generator=torch.Generator().manual_seed(2))
    target[0, :] = torch.tensor([0, V - 1, (V // t) % V])  # the ends of the vocabulary ranges
    dloss = seeded((S, B), 3)

    local = logits.chunk(t, -1)[r].to(dtype).requires_grad_(True)
    with jit_compiled_on_cpu() if fused else contextlib.nullcontext():
        loss = tp_.vocab_parallel_cross_entropy(local * 1.0, target, label_smoothing=alpha,
                                                fused=fused)
        loss.backward(dloss)

    # Megatron's smoothing alpha (spread over K - 1 classes) is PyTorch's alpha * K / (K - 1)
    ref_logits = logits.to(dtype).double().requires_grad_(True)
    ref = F.cross_entropy(ref_logits.view(-1, V), target.view(-1), reduction="none",
                          label_smoothing=alpha * V / (V - 1)).view(S, B)
    ref.backward(dloss.double())
    rtol = 1e-6 if dtype == torch.float32 else 1e-2
    assert loss.dtype == torch.float32
    assert_rel_close(loss, ref, rtol=rtol, what="loss")
    assert local.grad.dtype == dtype
    assert_rel_close(local.grad, ref_logits.grad.chunk(t, -1)[r], rtol=rtol, what="logits grad")


@pytest.mark.parametrize("t", [1, 2, 4])
@pytest.mark.parametrize("alpha", [0.0, 0.1])
def test_matches_torch_cross_entropy(t, alpha):
    run_distributed(t, _check, t, alpha, torch.float32)


def test_bf16_logits_fp32_loss():
    run_distributed(2, _check, 2, 0.0, torch.bfloat16)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_matches_torch_cross_entropy(dtype):
    """The compiled loss and gradient (inductor's C++ backend here, Triton on a GPU)."""
    run_distributed(2, _check, 2, 0.1, dtype, True)


def test_smoothing_convention_spreads_over_wrong_classes():
    """At TP=1: the target gets weight 1 - alpha, every other class alpha / (K - 1)."""
    run_distributed(1, _check_smoothing_weights)


def _check_smoothing_weights():
    ps.initialize_model_parallel(1)
    alpha = 0.3
    logits = seeded((4, V), 7).requires_grad_(True)
    target = torch.arange(4)
    loss = tp_.vocab_parallel_cross_entropy(logits, target, label_smoothing=alpha)
    logp = logits.double().log_softmax(-1)
    weights = torch.full((4, V), alpha / (V - 1), dtype=torch.float64)
    weights[torch.arange(4), target] = 1 - alpha
    assert_rel_close(loss, -(weights * logp).sum(-1), what="smoothed loss")


def _check_errors():
    ps.initialize_model_parallel(1)
    with pytest.raises(ValueError, match="label_smoothing=1.0 must be in \\[0, 1\\)"):
        tp_.vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), 1.0)
    with pytest.raises(ValueError, match="must agree on every dimension but the last"):
        tp_.vocab_parallel_cross_entropy(torch.zeros(2, 4), torch.zeros(3, dtype=torch.long))


def test_bad_arguments():
    run_distributed(1, _check_errors)
