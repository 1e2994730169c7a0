"""Multi-latent attention on a GPU: keys 192 wide and values 128 (DeepSeek-V3's head shapes),
so SDPA picks a kernel that takes two widths; against the unfused core (mp's fused softmax
when built) in fp32 and bf16, bf16 against fp32, forward and backward, and generation with
the cache of latents against running the whole sequence at each step."""

import pytest
import torch

from mp.device import get_device
from mp.generation import SamplingParams, generate
from mp.model import GPTModel, TransformerConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("one_gpu_world", "model_parallel")]

SEQ, VOCAB = 512, 1000


def mla_model(precision: str, **overrides) -> GPTModel:
    """A two-layer GPT with DeepSeek-V3's attention shapes (8 heads), YaRN's RoPE; the same
    weights for the same arguments."""
    torch.manual_seed(0)
    return GPTModel(TransformerConfig(
        num_layers=2, hidden_size=1024, num_attention_heads=8, vocab_size=VOCAB,
        seq_length=SEQ, normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, precision=precision,
        multi_latent_attention=True, q_lora_rank=384, kv_lora_rank=512, qk_head_dim=128,
        qk_pos_emb_head_dim=64, v_head_dim=128, position_embedding_type="rope",
        rope_type="yarn", yarn_rotary_scaling_factor=40.0, yarn_mscale=1.0,
        yarn_mscale_all_dim=1.0, **overrides))


def loss_and_grads(model: GPTModel) -> tuple[torch.Tensor, list]:
    g = torch.Generator().manual_seed(1)
    ids, labels = (torch.randint(0, VOCAB, (2, SEQ), generator=g).to(get_device())
                   for _ in range(2))
    model.zero_grad()
    loss = model(ids, labels=labels).float().mean()
    loss.backward()
    return loss.detach(), [p.grad.float().clone() for p in model.parameters()]


def assert_close(got, expected, rtol: float) -> None:
    (loss, grads), (ref_loss, ref_grads) = got, expected
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    for grad, ref in zip(grads, ref_grads):
        assert (grad - ref).norm() <= rtol * ref.norm()


@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_sdpa_and_unfused_cores_agree(precision, rtol):
    assert_close(loss_and_grads(mla_model(precision)),
                 loss_and_grads(mla_model(precision, attention_backend="unfused")), rtol)


def test_bf16_follows_fp32():
    assert_close(loss_and_grads(mla_model("bf16")), loss_and_grads(mla_model("fp32")), 5e-2)


def test_cached_generation_equals_the_whole_sequence():
    model = mla_model("fp32")
    prompts = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(2))
    prompts = prompts.to(get_device())
    runs = [generate(model, prompts, 64, SamplingParams(greedy=True), kv_cache=kv_cache)
            for kv_cache in (True, False)]
    assert torch.equal(*runs)
