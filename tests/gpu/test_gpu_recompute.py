"""Selective recompute of Megatron-Core's modules on a GPU: a DeepSeek-shaped block
(multi-latent attention, experts with SwiGLU compiled by `mp.jit`) in bf16 with ``layernorm``,
``moe_act``, ``mla_up_proj`` and ``core_attn`` recomputed gives the loss and gradients of the
same block recomputing nothing, and the CUDA allocator really holds less after the forward:
at least the outputs `CheckpointWithoutOutput` frees (the two norms' outputs, the experts'
activations, q, k and v)."""

import pytest
import torch

from mp.device import get_device
from mp.model import GPTModel, TransformerConfig

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("one_gpu_world", "model_parallel")]

SEQ, BATCH, VOCAB, H = 512, 2, 1000, 1024
HEADS, DN, DR, DV = 8, 128, 64, 128
EXPERTS, TOPK, FFN = 8, 2, 512
MODULES = ["layernorm", "moe_act", "mla_up_proj", "core_attn"]


def deepseek_block(modules: list | None) -> GPTModel:
    """Two layers, each with DeepSeek-V3's attention shapes (8 heads) and 8 experts; the same
    weights whatever ``modules``."""
    torch.manual_seed(0)
    recompute = {} if modules is None else {"recompute_granularity": "selective",
                                            "recompute_modules": modules}
    return GPTModel(TransformerConfig(
        num_layers=2, hidden_size=H, num_attention_heads=HEADS, vocab_size=VOCAB,
        seq_length=SEQ, normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
        hidden_dropout=0.0, attention_dropout=0.0, precision="bf16",
        multi_latent_attention=True, q_lora_rank=384, kv_lora_rank=512, qk_head_dim=DN,
        qk_pos_emb_head_dim=DR, v_head_dim=DV, position_embedding_type="rope",
        num_moe_experts=EXPERTS, moe_router_topk=TOPK, moe_ffn_hidden_size=FFN,
        moe_grouped_gemm=True, **recompute))


def _batch():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(get_device())
            for _ in range(2)]


def test_recomputed_modules_give_the_same_loss_and_gradients():
    ids, labels = _batch()
    results = []
    for modules in (None, MODULES):
        model = deepseek_block(modules)
        loss = model(ids, labels=labels).float().mean()
        loss.backward()
        results.append((loss.detach(), [p.grad.float() for p in model.parameters()]))
    (loss, grads), (ref_loss, ref_grads) = results[1], results[0]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-2, atol=0)
    for grad, ref in zip(grads, ref_grads):
        assert torch.isfinite(grad).all()
        assert (grad - ref).norm() <= 2e-2 * ref.norm() + 1e-6


def _kept_after_forward(modules: list | None) -> int:
    """Bytes the allocator holds once the forward is done, beyond the model and the batch."""
    model = deepseek_block(modules)
    ids, labels = _batch()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    loss = model(ids, labels=labels).float().mean()
    torch.cuda.synchronize()
    kept = torch.cuda.memory_allocated() - before
    loss.backward()
    return kept


def test_the_freed_outputs_leave_the_allocator():
    tokens, e = SEQ * BATCH, 2  # bf16
    freed_per_layer = e * tokens * (
        2 * H                                           # the two norms' outputs
        + TOPK * FFN                                    # the experts' activations
        + HEADS * (2 * (DN + DR) + DV))                 # q, k and v
    plain, recomputed = _kept_after_forward(None), _kept_after_forward(MODULES)
    print(f"\nkept after forward: {plain / 2**20:.1f} MiB plainly, {recomputed / 2**20:.1f} MiB "
          f"with {MODULES}; at least {2 * freed_per_layer / 2**20:.1f} MiB freed")
    assert plain - recomputed >= 2 * freed_per_layer
