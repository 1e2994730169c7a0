"""The compiled fusions of `mp.jit` on a GPU (inductor's Triton kernels): the cross-entropy at
GPT-2's vocabulary against float64, holding no fp32 copy of the logits; bias-dropout-add
against the eager function, and replayed bit for bit by activation checkpointing with the CUDA
RNG tracker; bias-GeLU and bias-SwiGLU against their formulas in float64."""

import pytest
import torch
import torch.nn.functional as F
from checks import assert_rel_close
from test_jit_fusion import _checkpoint_replays, _compiled_activations, _compiled_against_eager

from mp import jit
from mp import parallel_state as ps
from mp.tensor_parallel import vocab_parallel_cross_entropy

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("one_gpu_world")]

TOKENS, VOCAB = 8192, 50304  # GPT-3 1.3B's padded vocabulary, four sequences of 2048


@pytest.fixture(autouse=True)
def compiled_and_clean():
    yield
    ps.destroy_model_parallel()
    assert jit.compiles_on(torch.device("cuda")), "torch.compile failed: the eager code ran"


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_cross_entropy_at_gpt_vocabulary(smoothing):
    ps.initialize_model_parallel(1)
    g = torch.Generator(device="cuda").manual_seed(0)
    logits = (torch.randn(TOKENS, VOCAB, generator=g, device="cuda") * 4).bfloat16()
    target = torch.randint(0, VOCAB, (TOKENS,), generator=g, device="cuda")
    dloss = torch.rand(TOKENS, generator=g, device="cuda")
    leaf = logits.clone().requires_grad_(True)
    vocab_parallel_cross_entropy(leaf, target, smoothing, fused=True).backward(dloss)  # compile

    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    leaf.grad = None
    loss = vocab_parallel_cross_entropy(leaf, target, smoothing, fused=True)
    loss.backward(dloss)
    extra = torch.cuda.max_memory_allocated() - before
    # beside the logits: their bf16 gradient and per-row vectors (docs/estimate.md)
    assert extra < 1.1 * leaf.numel() * leaf.element_size(), f"{extra / 2**20:.0f} MiB extra"

    ref_logits = logits.double().requires_grad_(True)
    ref = F.cross_entropy(ref_logits, target, reduction="none",
                          label_smoothing=smoothing * VOCAB / (VOCAB - 1))
    ref.backward(dloss.double())
    assert_rel_close(loss, ref, rtol=1e-5, what="loss")
    assert leaf.grad.dtype == torch.bfloat16
    assert_rel_close(leaf.grad, ref_logits.grad, rtol=1e-2, what="logits grad")


def test_bias_dropout_add_matches_eager():
    _compiled_against_eager("cuda")


def test_checkpoint_replays_compiled_masks():
    _checkpoint_replays(1, "cuda")


@pytest.mark.parametrize("kind", ["none", "tanh", "swiglu"], ids=["gelu", "gelu_tanh", "swiglu"])
def test_bias_activations_follow_the_formulas(kind):
    _compiled_activations(kind, True, torch.float32, "cuda")
    _compiled_activations(kind, False, torch.bfloat16, "cuda")
