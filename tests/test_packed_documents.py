"""Packed documents (`mp.model.packed_documents`): the buckets against their rule written out,
the gathers against documents listed by a loop, and attention through them against the same
attention under the dense document mask -- the core in float64 (both cores, grouped queries,
sinks, a window, values of another width), a GPT at TP 2 with sequence parallelism and each
recompute mode -- with no ``[s, s]`` mask kept; the refusals."""

import subprocess
import sys

import pytest
import torch
from checks import assert_rel_close
from harness import run_distributed

from mp import parallel_state as ps
from mp.estimate import SavedTensorMeter
from mp.model import GPTModel, TransformerConfig
from mp.model.attention import CoreAttention
from mp.model.attention_masks import mask_for_layers
from mp.model.packed_documents import PackedDocuments, bucket_lengths

S, B = 37, 3


def _segments(seed: int = 0) -> torch.Tensor:
    """``[B, S]``: random documents, one-token ones among them; the last sample one document."""
    g = torch.Generator().manual_seed(seed)
    rows = [torch.randint(0, 2, (S,), generator=g).mul(torch.rand(S, generator=g) < 0.3)
            .cumsum(0) for _ in range(B - 1)]
    rows[0][[3, 4, 5]] = rows[0][2] + torch.tensor([1, 2, 3])  # one-token documents
    rows[0][6:] = rows[0][6:].clamp(min=int(rows[0][5]) + 1)
    return torch.stack(rows + [torch.zeros(S, dtype=torch.int64)])


def _documents_by_loop(segments: torch.Tensor) -> list[tuple[int, list[int]]]:
    """(sample, its positions) of each document."""
    found = []
    for i, row in enumerate(segments.tolist()):
        for t, segment in enumerate(row):
            if t == 0 or segment != row[t - 1]:
                found.append((i, []))
            found[-1][1].append(t)
    return found


def test_the_buckets_are_powers_of_two_and_one_and_a_half_times_them():
    sizes = sorted({2 ** k for k in range(9)} | {3 * 2 ** k for k in range(8)})
    assert sizes[:8] == [1, 2, 3, 4, 6, 8, 12, 16]
    n = torch.arange(1, 257)
    for limit in (256, 100):
        want = [min(min(x for x in sizes if x >= m), limit) for m in n.tolist()]
        assert bucket_lengths(n, limit).tolist() == want


def test_each_call_gathers_its_documents_in_order_and_the_inverse_puts_them_back():
    segments = _segments()
    packed = PackedDocuments(segments)
    listed = _documents_by_loop(segments)
    assert any(len(tokens) == 1 for _, tokens in listed)
    gathered = []
    for length, index in packed.calls:
        columns = index.view(length, -1).t()
        for column in columns:
            doc = [int(x) for x in column]
            gathered.append(doc)
    flat = [[t * B + i for t in tokens] for i, tokens in listed]
    lengths = {len(doc) for doc in gathered}
    for doc in flat:
        length = bucket_lengths(torch.tensor([len(doc)]), S).item()
        assert length in lengths
        assert doc + [0] * (length - len(doc)) in gathered
    assert len(gathered) == len(flat)
    # token ids in the [s, b] layout, through the gathers and back
    ids = torch.arange(S * B)
    rows = torch.cat([ids.index_select(0, index) for _, index in packed.calls])
    assert torch.equal(rows.index_select(0, packed.inverse), ids)


def test_samples_of_one_document_each_attend_as_they_are():
    q, k, v = (torch.zeros(4, 2, 1, 8) for _ in range(3))
    seen = []
    PackedDocuments(torch.tensor([[0] * 4, [3] * 4])).attend(
        lambda *args: seen.append(args) or args[0], q, k, v)
    assert len(seen) == 1 and all(a is b for a, b in zip(seen[0], (q, k, v, None)))
    assert not PackedDocuments(torch.tensor([[0] * 4, [0, 0, 1, 1]])).whole_samples


def test_the_refusals():
    with pytest.raises(ValueError, match="segment_ids must not decrease along a sample"):
        PackedDocuments(torch.tensor([[0, 1, 0]]))
    with pytest.raises(ValueError, match=r"segment_ids must be \[b, s\], got shape \(3,\)"):
        PackedDocuments(torch.tensor([0, 1, 1]))
    packed = PackedDocuments(torch.zeros(2, 4, dtype=torch.int64))
    q = torch.zeros(4, 3, 1, 8)
    with pytest.raises(ValueError, match=r"queries \[s, b\] = \[4, 3\] do not match the packed "
                                         r"documents' \[s, b\] = \[4, 2\]"):
        packed.attend(None, q, q, q)


CORE_CASES = [(softmax, window, groups, value_width)
              for softmax in ("vanilla", "learnable") for window in (None, 4)
              for groups, value_width in ((4, 8), (2, 8), (2, 6))]


def _core_against_mask(backend: str) -> list[tuple[str, float]]:
    """For each case: (its name, the largest difference of the output and of the gradients of
    q, k, v and the sinks between packed documents and the dense mask), float64."""
    ps.initialize_model_parallel(1)
    segments = _segments(1)
    packed = PackedDocuments(segments)
    g = torch.Generator().manual_seed(2)
    results = []
    for softmax, window, groups, value_width in CORE_CASES:
        config = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                                   num_query_groups=groups, vocab_size=64, seq_length=S,
                                   attention_backend=backend, softmax_type=softmax,
                                   attention_dropout=0.0)
        core = CoreAttention(config, window=window).double()
        inputs = [torch.randn(S, B, heads, width, generator=g, dtype=torch.float64,
                              requires_grad=True)
                  for heads, width in ((4, 8), (groups, 8), (groups, value_width))]
        weights = torch.randn(S, B, 4 * value_width, generator=g, dtype=torch.float64)
        wrt = inputs + list(core.parameters())
        outputs = []
        for mask in (packed, mask_for_layers(packed.mask(), config, torch.float64)):
            out = core(*inputs, mask)
            outputs.append([out, *torch.autograd.grad((out * weights).sum(), wrt)])
        name = f"{softmax} window={window} groups={groups} v={value_width}"
        results.append((name, max((a - b).abs().max().item() for a, b in zip(*outputs))))
    return results


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
def test_the_core_attends_as_under_the_document_mask(backend):
    for name, difference in run_distributed(1, _core_against_mask, backend)[0]:
        assert difference < 1e-12, name


def _gpt_against_mask(recompute: str) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    ps.initialize_model_parallel(2)
    extra = {"full": {"recompute_granularity": "full", "recompute_method": "uniform",
                      "recompute_num_layers": 1},
             "selective": {"recompute_granularity": "selective"}, "none": {}}[recompute]
    torch.manual_seed(4)
    model = GPTModel(TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=64,
        seq_length=S + 1, make_vocab_size_divisible_by=8, hidden_dropout=0.0,
        attention_dropout=0.0, position_embedding_type="rope", tensor_model_parallel_size=2,
        sequence_parallel=True, **extra), group=ps.get_tensor_model_parallel_group())
    segments = torch.cat([_segments(3), torch.full((B, 1), 99)], dim=1)  # s = 38, even for SP
    tokens = torch.randint(0, 64, (B, S + 1), generator=torch.Generator().manual_seed(5))
    packed = PackedDocuments(segments)
    runs = []
    for mask in (packed, packed.mask()):
        model.zero_grad()
        with SavedTensorMeter(exclude=model.parameters()) as meter:
            loss = model(tokens, attention_mask=mask, labels=tokens)
        loss.sum().backward()
        squares = [shape for shape, _, _, counted in meter.entries
                   if counted and shape[-2:] == (S + 1, S + 1)]
        runs.append((loss.detach(), [p.grad.clone() for p in model.parameters()], squares))
    (loss, grads, squares), (want_loss, want_grads, want_squares) = runs
    assert squares == [] and want_squares, "packed documents keep no [s, s] mask"
    return [("loss", loss, want_loss)] + [(f"grad {i}", a, b)
                                          for i, (a, b) in enumerate(zip(grads, want_grads))]


@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_a_tp2_gpt_trains_as_under_the_document_mask(recompute):
    for rank in run_distributed(2, _gpt_against_mask, recompute):
        for what, got, want in rank:
            assert_rel_close(got, want, what=what)


def _graphs_over_micro_batches() -> list[int]:
    """A model with ``compile_layers`` (TorchDynamo's eager backend in place of inductor's):
    the graphs made so far after each of three micro-batches whose documents fall in different
    buckets."""
    from torch._dynamo.utils import counters

    ps.initialize_model_parallel(1)
    torch.manual_seed(6)
    torch._dynamo.reset()
    counters.clear()
    compile_module = torch.nn.Module.compile
    torch.nn.Module.compile = lambda self: compile_module(self, backend="eager")
    try:
        model = GPTModel(TransformerConfig(
            num_layers=1, hidden_size=32, num_attention_heads=4, vocab_size=64, seq_length=S,
            hidden_dropout=0.0, attention_dropout=0.0, position_embedding_type="rope",
            compile_layers=True))
    finally:
        torch.nn.Module.compile = compile_module
    graphs = []
    for seed in range(3):
        segments = _segments(seed)
        tokens = torch.randint(0, 64, (B, S), generator=torch.Generator().manual_seed(seed))
        model(tokens, attention_mask=PackedDocuments(segments), labels=tokens).sum().backward()
        graphs.append(counters["stats"]["unique_graphs"])
    assert len({tuple(c[0] for c in PackedDocuments(_segments(seed)).calls)
                for seed in range(3)}) > 1, "the micro-batches fall in the same buckets"
    torch._dynamo.reset()
    return graphs


def test_compiled_layers_compile_once_whatever_the_buckets():
    """The gathers and calls, whose number and shapes change with every micro-batch, run
    outside the compiled graphs (`CoreAttention` does not let them be traced)."""
    graphs = run_distributed(1, _graphs_over_micro_batches)[0]
    assert graphs[0] > 0 and graphs == [graphs[0]] * 3, graphs


def test_the_model_imports_without_torchdynamo():
    """Deciding what compiled layers leave untraced imports TorchDynamo only for them: its
    import is seconds of every job's start-up."""
    code = ("import sys, mp.model.gpt, mp.training.gpt_step; "
            "print('torch._dynamo' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
