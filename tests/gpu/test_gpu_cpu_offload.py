"""``--optimizer-cpu-offload`` on a GPU: a bf16 GPT with half of its optimizer elements in
pinned host memory (masters, AdamW's state, gradient buffers) trains as the same model with
all of it on the device, to the rounding of the host's AdamW against the device's, and the
offloaded tensors really live on the host."""

import pytest
import torch

from mp.device import get_device
from mp.model import GPTModel, TransformerConfig
from mp.optim import get_megatron_optimizer

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("one_gpu_world", "model_parallel")]

SEQ, BATCH, VOCAB, STEPS = 128, 4, 1000, 5


def _train(offload: bool) -> tuple[list[float], list[torch.Tensor], object]:
    torch.manual_seed(0)
    model = GPTModel(TransformerConfig(num_layers=2, hidden_size=256, num_attention_heads=4,
                                       vocab_size=VOCAB, seq_length=SEQ, precision="bf16",
                                       hidden_dropout=0.0, attention_dropout=0.0))
    optimizer = get_megatron_optimizer([model], lr=1e-3, clip_grad=1.0,
                                       optimizer_cpu_offload=offload,
                                       optimizer_offload_fraction=0.5)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(STEPS):
        ids, labels = (torch.randint(0, VOCAB, (BATCH, SEQ), generator=g).to(get_device())
                       for _ in range(2))
        optimizer.zero_grad()
        loss = model(ids, labels=labels).float().mean()
        loss.backward()
        assert optimizer.step().update_successful
        losses.append(loss.item())
    return losses, [p.detach().float().clone() for p in model.parameters()], optimizer


def test_offloaded_half_trains_as_the_device_optimizer():
    want_losses, want_params, _ = _train(offload=False)
    losses, params, optimizer = _train(offload=True)
    offloaded = [s for s in optimizer.shards if s.offloaded]
    assert 0 < len(offloaded) < len(optimizer.shards)
    for shard in offloaded:
        state = optimizer.shard_state(shard)
        assert shard.main.device.type == "cpu" and shard.main.is_pinned()
        assert shard.host_grad.is_pinned() and state["exp_avg"].device.type == "cpu"
        assert shard.param.device.type == "cuda"
    assert all(s.main.is_cuda for s in optimizer.shards if not s.offloaded)
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(want_losses), rtol=1e-4,
                               atol=0)
    for got, want in zip(params, want_params):  # bf16 weights: a rounding step apart at most
        torch.testing.assert_close(got, want, rtol=1e-2, atol=1e-3)
