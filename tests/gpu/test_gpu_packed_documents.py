"""Packed documents on a GPU: a Llama-style GPT attending within each document through
`mp.model.packed_documents.PackedDocuments` (causal SDPA on the gathered documents: flash or
cuDNN kernels) against the same model under the dense document mask (SDPA's memory-efficient
kernel with the additive mask), in fp32 and bf16, loss and every gradient."""

import pytest
import torch

from mp.device import get_device
from mp.model import GPTModel, TransformerConfig
from mp.model.packed_documents import PackedDocuments

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("one_gpu_world", "model_parallel")]

SEQ, BATCH, VOCAB = 1024, 2, 1000


def loss_and_grads(precision: str, packed: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = GPTModel(TransformerConfig(
        num_layers=2, hidden_size=1024, num_attention_heads=16, num_query_groups=4,
        vocab_size=VOCAB, seq_length=SEQ, normalization="RMSNorm", activation="swiglu",
        position_embedding_type="rope", add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, precision=precision))
    g = torch.Generator().manual_seed(1)
    lengths = torch.randint(20, 400, (BATCH, 16), generator=g)  # more than SEQ tokens a row
    segments = torch.stack([torch.repeat_interleave(torch.arange(16), row)[:SEQ]
                            for row in lengths])
    documents = PackedDocuments(segments, get_device())
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(get_device())
    loss = model(ids, attention_mask=documents if packed else documents.mask(),
                 labels=ids).float().mean()
    loss.backward()
    return loss.detach(), [p.grad.float() for p in model.parameters()]


@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_packed_documents_train_as_under_the_mask(precision, rtol):
    loss, grads = loss_and_grads(precision, packed=True)
    ref_loss, ref_grads = loss_and_grads(precision, packed=False)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    for grad, ref in zip(grads, ref_grads):
        assert (grad - ref).norm() <= rtol * ref.norm()
