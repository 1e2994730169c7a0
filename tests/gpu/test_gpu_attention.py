"""Grouped-query attention and the key/value cache on a GPU: SDPA reading the key/value groups
itself (``enable_gqa``, flash or cuDNN kernels) against the same model with the groups
repeated per query head, and against the unfused core (mp's fused softmax when built), in
fp32 and bf16, forward and backward; generation with the cache against running the whole
sequence at each step; the bottom-right causal attention of context parallelism (queries at
the end of longer keys, SDPA's flash or memory-efficient kernels) against an explicit mask;
sliding-window attention against float64 with the window written out (attention sinks too),
and generating with it through the cache."""

import pytest
import torch

from mp.device import get_device
from mp.generation import SamplingParams, generate
from mp.model import GPTModel, TransformerConfig, attention
from mp.model.attention import CoreAttention

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
              pytest.mark.usefixtures("one_gpu_world", "model_parallel")]

HEADS, GROUPS, SEQ, VOCAB = 16, 4, 512, 1000


def grouped_model(precision: str, **overrides) -> GPTModel:
    """A two-layer Llama-style GPT, the same weights for the same arguments."""
    torch.manual_seed(0)
    return GPTModel(TransformerConfig(
        num_layers=2, hidden_size=1024, num_attention_heads=HEADS, num_query_groups=GROUPS,
        vocab_size=VOCAB, seq_length=SEQ, normalization="RMSNorm", activation="swiglu",
        position_embedding_type="rope", add_bias_linear=False, hidden_dropout=0.0,
        attention_dropout=0.0, precision=precision, **overrides))


def loss_and_grads(model: GPTModel, repeat_groups: bool) -> tuple[torch.Tensor, list]:
    """The mean loss on a fixed batch and every parameter's gradient, with SDPA reading the
    groups itself or given them repeated per head (the torch < 2.5 path)."""
    g = torch.Generator().manual_seed(1)
    ids, labels = (torch.randint(0, VOCAB, (2, SEQ), generator=g).to(get_device())
                   for _ in range(2))
    saved = attention.SDPA_TAKES_GROUPS
    attention.SDPA_TAKES_GROUPS = not repeat_groups
    try:
        model.zero_grad()
        loss = model(ids, labels=labels).float().mean()
        loss.backward()
    finally:
        attention.SDPA_TAKES_GROUPS = saved
    return loss.detach(), [p.grad.float().clone() for p in model.parameters()]


@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_sdpa_reads_groups_as_the_repeated_heads(precision, rtol):
    model = grouped_model(precision)
    loss, grads = loss_and_grads(model, repeat_groups=False)
    ref_loss, ref_grads = loss_and_grads(model, repeat_groups=True)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    for grad, ref in zip(grads, ref_grads):
        assert (grad - ref).norm() <= rtol * ref.norm()


@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-4), ("bf16", 3e-2)])
def test_sdpa_and_unfused_cores_agree(precision, rtol):
    loss, grads = loss_and_grads(grouped_model(precision), repeat_groups=False)
    ref_loss, ref_grads = loss_and_grads(grouped_model(precision, attention_backend="unfused"),
                                         repeat_groups=False)
    torch.testing.assert_close(loss, ref_loss, rtol=rtol, atol=0)
    for grad, ref in zip(grads, ref_grads):
        assert (grad - ref).norm() <= rtol * ref.norm()


def test_cached_generation_equals_the_whole_sequence():
    model = grouped_model("fp32")
    prompts = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(2))
    prompts = prompts.to(get_device())
    runs = [generate(model, prompts, 64, SamplingParams(greedy=True), kv_cache=kv_cache)
            for kv_cache in (True, False)]
    assert torch.equal(*runs)


def bottom_right_against_explicit(precision: str) -> list[tuple[str, float]]:
    """Relative differences, output and each input gradient, between `CoreAttention` given
    512 queries at the end of 2048 grouped keys with no mask (bottom-right causal) and given
    the same mask written out (True = masked)."""
    torch.manual_seed(3)
    core = CoreAttention(TransformerConfig(
        num_layers=1, hidden_size=1024, num_attention_heads=HEADS, num_query_groups=GROUPS,
        vocab_size=VOCAB, seq_length=2048, attention_dropout=0.0, precision=precision))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    sq, sk, d = 512, 2048, 64
    q, k, v = (torch.randn(s, 2, h, d, device=get_device(), dtype=dtype, requires_grad=True)
               for s, h in ((sq, HEADS), (sk, GROUPS), (sk, GROUPS)))
    mask = torch.ones(sq, sk, dtype=torch.bool, device=get_device()).triu(sk - sq + 1)
    results = []
    for given in (None, mask[None, None]):
        out = core._attend(q, k, v, given)
        grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
        results.append([out.float(), *(g.float() for g in grads)])
    return [(name, ((a - b).norm() / b.norm()).item())
            for name, a, b in zip(("output", "dq", "dk", "dv"), *results)]


@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-4), ("bf16", 2e-2)])
def test_bottom_right_causal_attention_equals_the_explicit_mask(precision, rtol):
    for name, difference in bottom_right_against_explicit(precision):
        assert difference <= rtol, f"{name}: {difference:.2e}"


def windowed_against_float64(backend: str, precision: str, sq: int, sk: int,
                             softmax_type: str = "vanilla") -> list[tuple[str, float]]:
    """Relative differences, output and each input gradient, between `CoreAttention` with a
    sliding window of 100 earlier keys (``sq`` queries at the end of ``sk`` grouped keys, as a
    cache or a context-parallel chunk has them; more than `window_tile` of them attend in
    tiles) and the same attention in float64 with the window's mask written out; with attention
    sinks, each head's sink logit (0, or its learned one, whose gradient is compared too) one
    more column of the float64 softmax, dropped after it."""
    torch.manual_seed(4)
    config = TransformerConfig(
        num_layers=1, hidden_size=1024, num_attention_heads=HEADS, num_query_groups=GROUPS,
        vocab_size=VOCAB, seq_length=sk, attention_dropout=0.0, precision=precision,
        attention_backend=backend, softmax_type=softmax_type)
    window, d = 100, 64
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[precision]
    inputs = [torch.randn(s, 2, h, d, device=get_device(), dtype=dtype, requires_grad=True)
              for s, h in ((sq, HEADS), (sk, GROUPS), (sk, GROUPS))]
    exact = [t.detach().double().requires_grad_(True) for t in inputs]
    core = CoreAttention(config, window).to(get_device())
    learned = [core.softmax_offset] if softmax_type == "learnable" else []
    with torch.no_grad():
        for p in learned:  # logits that matter beside a window of scores
            p.normal_(0, 2)
    exact += [p.detach().double().requires_grad_(True) for p in learned]
    out = core(*inputs)
    positions = torch.arange(sk - sq, sk, device=get_device())[:, None]
    keys = torch.arange(sk, device=get_device())
    keep = (keys <= positions) & (positions - keys <= window)  # [sq, sk]
    q, k, v = (t.permute(1, 2, 0, 3) for t in exact[:3])  # [b, heads or groups, s, d]
    k, v = (t.repeat_interleave(HEADS // GROUPS, dim=1) for t in (k, v))
    scores = (q @ k.transpose(-1, -2) / d ** 0.5).masked_fill(~keep, float("-inf"))
    if softmax_type != "vanilla":
        sink = exact[3] if learned else scores.new_zeros(HEADS)
        scores = torch.cat([scores, sink.view(1, HEADS, 1, 1).expand(2, HEADS, sq, 1)], -1)
    probs = scores.softmax(-1)[..., :sk]
    ref = (probs @ v).permute(2, 0, 1, 3).reshape(sq, 2, HEADS * d)
    weights = torch.randn(out.shape, device=get_device(), dtype=torch.float64)
    grads = torch.autograd.grad((out.double() * weights).sum(), inputs + learned)
    ref_grads = torch.autograd.grad((ref * weights).sum(), exact)
    return [(name, ((a.double() - b).norm() / b.norm()).item())
            for name, a, b in zip(("output", "dq", "dk", "dv", "dsink"), (out, *grads),
                                  (ref, *ref_grads))]


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-5), ("bf16", 2e-2)])
@pytest.mark.parametrize("sq, sk", [(512, 1024), (2500, 3000)], ids=["one_call", "tiles"])
def test_sliding_window_attention_equals_float64(backend, precision, rtol, sq, sk):
    for name, difference in windowed_against_float64(backend, precision, sq, sk):
        assert difference <= rtol, f"{name}: {difference:.2e}"


@pytest.mark.parametrize("softmax_type", ["off-by-one", "learnable"])
@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("precision, rtol", [("fp32", 1e-5), ("bf16", 2e-2)])
def test_attention_sinks_equal_float64(softmax_type, backend, precision, rtol):
    """gpt-oss's sinks on CUDA: q, k, v padded with the sink's channel to a multiple of 8
    reach SDPA's flash or memory-efficient kernels, windows tiled (2,500 queries)."""
    results = windowed_against_float64(backend, precision, 2500, 3000, softmax_type)
    assert len(results) == (5 if softmax_type == "learnable" else 4)
    for name, difference in results:
        assert difference <= rtol, f"{name}: {difference:.2e}"


def test_windowed_cached_generation_equals_the_whole_sequence():
    """A window of 40 keys over 100 prompt tokens and 64 new ones: the cache's mask slides."""
    model = grouped_model("fp32", window_size=[40, 0], window_attn_skip_freq=2)
    prompts = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(2))
    prompts = prompts.to(get_device())
    runs = [generate(model, prompts, 64, SamplingParams(greedy=True), kv_cache=kv_cache)
            for kv_cache in (True, False)]
    assert torch.equal(*runs)
