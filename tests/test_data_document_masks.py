"""Documents packed into a sample, kept apart (``--reset-position-ids``,
``--reset-attention-mask``): positions and masks against Megatron-LM's
``get_ltor_masks_and_position_ids`` written out, and a GPT on a packed sample against the same
GPT on each document alone (learned and rotary positions, both attention cores); the mask kept
for backward once for all layers."""

import pytest
import torch
from checks import assert_rel_close
from harness import run_distributed
from torch.utils.data import default_collate

from mp import parallel_state as ps
from mp.data.document_masks import DocumentMasked, document_positions_and_mask, segment_mask
from mp.estimate import SavedTensorMeter
from mp.model import GPTModel, TransformerConfig
from mp.model.context_parallel import get_batch_on_this_cp_rank
from mp.model.packed_documents import PackedDocuments
from mp.training.gpt_step import get_batch

EOD = 0


def megatron_ltor(tokens: torch.Tensor, eod: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Megatron-LM's loop for one sample, both resets on: position ids and a [1, s, s] mask
    (True = masked)."""
    s = tokens.size(0)
    keep = torch.tril(torch.ones(s, s))
    positions = torch.arange(s)
    previous = 0
    for i in (tokens == eod).nonzero().flatten().tolist():
        keep[i + 1:, :i + 1] = 0
        positions[i + 1:] -= i + 1 - previous
        previous = i + 1
    return positions, (keep < 0.5)[None]


def test_by_hand():
    positions, mask = document_positions_and_mask(torch.tensor([5, 7, EOD, 3, EOD, EOD, 9]), EOD)
    assert positions.tolist() == [0, 1, 2, 0, 1, 0, 0]
    sees = [[j for j in range(7) if not mask[0, i, j]] for i in range(7)]
    assert sees == [[0], [0, 1], [0, 1, 2], [3], [3, 4], [5], [6]]


@pytest.mark.parametrize("seed", range(5))
def test_megatrons_positions_and_masks(seed):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 4, (64,), generator=g)  # about one token in four ends a document
    tokens[0] = EOD if seed == 0 else tokens[0]  # a sample that starts with an end
    got, want = document_positions_and_mask(tokens, EOD), megatron_ltor(tokens, EOD)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_wrapper_sets_only_what_it_is_asked():
    sample = {"tokens": torch.tensor([4, EOD, 6, 2]), "position_ids": torch.arange(4)}
    only_positions = DocumentMasked([sample], EOD, True, False)[0]
    assert only_positions["position_ids"].tolist() == [0, 1, 0, 1]
    assert "attention_mask" not in only_positions
    only_mask = DocumentMasked([sample], EOD, False, True)[0]
    assert only_mask["position_ids"].tolist() == [0, 1, 2, 3]
    assert only_mask["segment_ids"].tolist() == [0, 0, 1, 1] and "attention_mask" not in only_mask
    # the step packs the documents of the batch, whose mask is the documents' (a sample of one
    # document: causal)
    one = DocumentMasked([{"tokens": torch.tensor([4, 6, 2, 3]), "position_ids": torch.arange(4)}],
                         EOD, False, True)[0]
    batch = get_batch(iter([default_collate([only_mask, one])]))
    assert "segment_ids" not in batch and isinstance(batch["attention_mask"], PackedDocuments)
    mask = batch["attention_mask"].mask()
    assert mask.shape == (2, 1, 4, 4)
    assert torch.equal(mask[0], document_positions_and_mask(sample["tokens"], EOD)[1])
    assert torch.equal(mask[1, 0], torch.ones(4, 4, dtype=torch.bool).triu(1))


def _packed_against_alone(position_embedding_type: str, backend: str):
    """Per-token losses of two documents packed into one sample, against each alone."""
    ps.initialize_model_parallel(1)
    torch.manual_seed(0)
    model = GPTModel(TransformerConfig(
        num_layers=2, hidden_size=32, num_attention_heads=4, num_query_groups=2, vocab_size=50,
        seq_length=24, make_vocab_size_divisible_by=8, hidden_dropout=0.0,
        attention_dropout=0.0, position_embedding_type=position_embedding_type,
        attention_backend=backend))
    g = torch.Generator().manual_seed(1)
    first, second = torch.randint(1, 50, (10,), generator=g), torch.randint(1, 50, (13,),
                                                                            generator=g)
    first[-1] = EOD
    tokens = torch.cat([first, second, torch.randint(1, 50, (1,), generator=g)])  # 24
    labels = torch.roll(tokens, -1)
    item = DocumentMasked([{"tokens": tokens, "position_ids": torch.arange(24)}], EOD, True,
                          True)[0]
    batch = get_batch(iter([default_collate([item])]))  # as the training step reads it
    packed = model(batch["tokens"], batch["position_ids"], batch["attention_mask"],
                   labels=labels[None])[0]
    alone = [model(doc[None], labels=doc_labels[None])[0] for doc, doc_labels in (
        (tokens[:10], labels[:10]), (tokens[10:], labels[10:]))]
    return packed.detach(), torch.cat(alone).detach()


@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("positions", ["learned_absolute", "rope"])
def test_a_packed_sample_is_its_documents_alone(positions, backend):
    packed, alone = run_distributed(1, _packed_against_alone, positions, backend)[0]
    assert_rel_close(packed, alone, rtol=1e-6, what="per-token loss")


def _saved_masks(backend: str, precision: str, cp_comm_type: str | None = None) -> list[tuple]:
    """The document masks a three-layer GPT keeps for backward: (dtype, bytes) of each
    storage of a ``[b, 1, rows, keys]`` tensor it saves (the unfused core's ``[b, 1, rows, 1]``
    row flags aside); ``cp_comm_type``: at CP 2."""
    cp = 1 if cp_comm_type is None else 2
    ps.initialize_model_parallel(1, context_parallel_size=cp)
    model = GPTModel(TransformerConfig(
        num_layers=3, hidden_size=32, num_attention_heads=4, vocab_size=50, seq_length=24,
        make_vocab_size_divisible_by=8, precision=precision, attention_backend=backend,
        hidden_dropout=0.0, attention_dropout=0.0, context_parallel_size=cp,
        cp_comm_type=cp_comm_type or "all_gather"))
    tokens = torch.randint(1, 50, (2, 24), generator=torch.Generator().manual_seed(2))
    tokens[:, 9] = EOD
    item = DocumentMasked([{"tokens": t, "position_ids": torch.arange(24)} for t in tokens],
                          EOD, False, True)
    batch = get_batch_on_this_cp_rank(
        {"tokens": tokens, "attention_mask": segment_mask(torch.stack([item[i]["segment_ids"]
                                                                       for i in range(2)]))},
        ps.get_context_parallel_group())  # [2, 1, 24, 24] cut to the rank's query rows
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        loss = model(batch["tokens"], attention_mask=batch["attention_mask"],
                     labels=batch["tokens"])
    loss.float().sum().backward()
    return [(dtype, nbytes) for shape, dtype, nbytes, counted in meter.entries
            if counted and len(shape) == 4 and shape[:2] == (2, 1) and shape[-1] > 1]


@pytest.mark.parametrize("backend,precision,cp_comm_type", [
    ("sdpa", "bf16", None), ("sdpa", "fp32", None), ("unfused", "bf16", None),
    ("sdpa", "bf16", "all_gather"), ("sdpa", "bf16", "a2a")])
def test_the_layers_share_one_saved_mask(backend, precision, cp_comm_type):
    """SDPA would turn the boolean mask into an additive one in every layer and keep each for
    backward; the block makes it once (in the activation dtype) and every layer keeps that one.
    The unfused core keeps the boolean mask itself, once. With context parallelism the rank's
    query rows (all_gather, each query chunk's view of them), or every row gathered once
    (a2a)."""
    results = run_distributed(1 if cp_comm_type is None else 2, _saved_masks, backend,
                              precision, cp_comm_type)
    dtype = {"sdpa": {"bf16": torch.bfloat16, "fp32": torch.float32}[precision],
             "unfused": torch.bool}[backend]
    rows = 12 if cp_comm_type == "all_gather" else 24
    for saved in results:
        assert saved == [(dtype, 2 * rows * 24 * dtype.itemsize)]
