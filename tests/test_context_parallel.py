"""Context parallelism: GPT with each sequence split over CP ranks equals the one-process
model on the same weights -- per-token losses at every position, every gradient (summed over
CP, as the DP x CP reduction does) -- at CP 2 and 4, with TP and sequence parallelism, both
attention cores, grouped queries, RoPE, document masks, sliding windows and recompute; the
load-balanced split against Megatron's description. Packed documents, as the training step
passes them: attended as they are under a2a, as the rank's rows of their mask under the other
kinds; handed to such a core they are refused."""

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from checks import RTOL, assert_rel_close, own_rank_group
from harness import run_distributed

from mp import parallel_state as ps
from mp.data.document_masks import document_positions_and_mask, document_segments
from mp.estimate import SavedTensorMeter
from mp.model import GPTModel, TransformerConfig
from mp.model.context_parallel import get_batch_on_this_cp_rank, local_positions
from mp.model.inference import InferenceParams
from mp.model.packed_documents import PackedDocuments
from mp.model.ring_attention import ring_attention

B, S, VOCAB = 2, 16, 96
SEED = 77


def test_local_positions_pair_an_early_chunk_with_a_late_one():
    """16 tokens over CP 2: 4 chunks of 4; rank 0 holds chunks 0 and 3, rank 1 chunks 1 and 2."""
    assert local_positions(16, 2, 0).tolist() == [0, 1, 2, 3, 12, 13, 14, 15]
    assert local_positions(16, 2, 1).tolist() == [4, 5, 6, 7, 8, 9, 10, 11]
    assert local_positions(8, 4, 3).tolist() == [3, 4]
    with pytest.raises(ValueError, match="seq_length=12 is not divisible by 2 x "
                                         "context_parallel_size=8"):
        local_positions(12, 4, 0)


def _config(tp: int = 1, cp: int = 1, **overrides) -> TransformerConfig:
    kw = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=VOCAB,
              seq_length=S, make_vocab_size_divisible_by=8, hidden_dropout=0.0,
              attention_dropout=0.0, tensor_model_parallel_size=tp, context_parallel_size=cp)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _batch(documents: bool | str) -> dict:
    """``documents``: False, True (the dense mask) or "packed" (`PackedDocuments`)."""
    g = torch.Generator().manual_seed(3)
    batch = {"tokens": torch.randint(0, VOCAB, (B, S), generator=g),
             "labels": torch.randint(0, VOCAB, (B, S), generator=g),
             "position_ids": torch.arange(S).expand(B, S)}
    if documents:  # documents end after tokens 5 and 11 of sample 0, after 8 of sample 1
        eod = 0
        batch["tokens"][0, [5, 11]] = eod
        batch["tokens"][1, 8] = eod
        batch["attention_mask"] = torch.stack([document_positions_and_mask(t, eod)[1]
                                               for t in batch["tokens"]])  # [b, 1, s, s]
        if documents == "packed":
            batch["attention_mask"] = PackedDocuments(torch.stack([
                document_segments(t, eod) for t in batch["tokens"]]))
    return batch


def _check_against_one_process(tp: int, cp: int, overrides: dict, documents: bool | str,
                               given_positions: bool = True):
    """``given_positions=False``: both models make their own position ids; ``documents``:
    `_batch`'s, the reference always under the dense mask."""
    ps.initialize_model_parallel(tp, context_parallel_size=cp, hierarchical_context_parallel_sizes=
                                 overrides.get("hierarchical_context_parallel_sizes"))
    cp_group, tp_group = ps.get_context_parallel_group(), ps.get_tensor_model_parallel_group()
    torch.manual_seed(SEED)
    ref = GPTModel(_config(**{k: v for k, v in overrides.items()
                              if k not in ("sequence_parallel",
                                           "hierarchical_context_parallel_sizes")}),
                   group=own_rank_group())
    model = GPTModel(_config(tp, cp, **overrides), group=tp_group)
    with torch.no_grad():  # the reference's weights, this rank's TP shard of each
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            full = ref_params[name]
            if getattr(p, "tensor_model_parallel", False):
                full = full.chunk(tp, p.partition_dim)[ps.get_tensor_model_parallel_rank()]
            p.copy_(full)

    batch = _batch(documents)
    if not given_positions:
        batch["position_ids"] = None
    ref_loss = ref(batch["tokens"], batch["position_ids"], _batch(bool(documents)).get(
        "attention_mask"), labels=batch["labels"])
    local = get_batch_on_this_cp_rank({k: v for k, v in batch.items() if v is not None},
                                      cp_group)
    loss = model(local["tokens"], local.get("position_ids"), local.get("attention_mask"),
                 labels=local["labels"])
    positions = local_positions(S, cp, ps.get_context_parallel_rank())
    assert_rel_close(loss, ref_loss[:, positions], what="per-token loss at this rank's positions")

    weights = torch.linspace(0.5, 1.5, B * S).view(B, S)  # a loss-mask-like weighting
    (ref_loss * weights).sum().backward()
    (loss * weights[:, positions]).sum().backward()
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad, group=cp_group)  # each CP rank holds its tokens' part
        if getattr(p, "sequence_parallel", False):
            dist.all_reduce(grad, group=tp_group)
        expected = ref_params[name].grad
        if getattr(p, "tensor_model_parallel", False):
            expected = expected.chunk(tp, p.partition_dim)[ps.get_tensor_model_parallel_rank()]
        # the sinks' logits' gradient sums each head's sink probability over every query, a
        # cancelling fp32 sum taken in other orders on each side: 1.4e-6 is seen under load
        rtol = 5e-6 if name.endswith("softmax_offset") else RTOL
        assert_rel_close(grad, expected, rtol=rtol, what=f"grad of {name}")


VARIANTS = {
    "sdpa": {},
    "unfused": {"attention_backend": "unfused"},
    "rope_grouped_query_swiglu_rms": {"position_embedding_type": "rope",
                                      "num_attention_heads": 8, "num_query_groups": 2,
                                      "activation": "swiglu", "normalization": "RMSNorm",
                                      "add_bias_linear": False},
    "sequence_parallel_selective": {"sequence_parallel": True,
                                    "recompute_granularity": "selective"},
    "full_recompute_unfused_rope": {"recompute_granularity": "full",
                                    "recompute_method": "uniform",
                                    "attention_backend": "unfused",
                                    "position_embedding_type": "rope"},
    # keys dn + dr wide, values dv: the cores and the ring carry both widths
    "multi_latent_attention": {"multi_latent_attention": True, "position_embedding_type": "rope",
                               "q_lora_rank": 24, "kv_lora_rank": 16, "qk_head_dim": 8,
                               "qk_pos_emb_head_dim": 4, "v_head_dim": 12},
    # a window of 5 earlier keys crosses the chunks' edges (4 tokens at CP 2, 2 at CP 4); the
    # second layer attends to everything
    "sliding_window": {"window_size": [5, 0], "window_attn_skip_freq": [1, 0],
                       "num_query_groups": 2},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tp,cp", [(1, 2), (2, 2), (1, 4)], ids=["cp2", "tp2_cp2", "cp4"])
@pytest.mark.parametrize("comm_type", ["all_gather", "a2a", "p2p"])
def test_gpt_with_context_parallelism_equals_one_process(tp, cp, variant, comm_type):
    overrides = {**VARIANTS[variant], "cp_comm_type": comm_type}
    if tp == 1 and overrides.get("sequence_parallel"):
        pytest.skip("sequence parallelism needs TP > 1")
    if comm_type == "a2a" and overrides.get("num_query_groups", 4) % (tp * cp):
        pytest.skip("a2a needs the key/value heads divisible by TP x CP")
    run_distributed(tp * cp, _check_against_one_process, tp, cp, overrides, False)


def test_the_model_makes_the_positions_of_its_own_tokens():
    """Called without position ids, the learned position table is read at the rank's
    positions, not at 0 .. s / c - 1."""
    run_distributed(2, _check_against_one_process, 1, 2, {}, False, False)


@pytest.mark.parametrize("window", [None, [3, 0]], ids=["full", "window3"])
@pytest.mark.parametrize("backend", ["sdpa", "unfused"])
@pytest.mark.parametrize("comm_type", ["all_gather", "a2a", "p2p"])
def test_document_masks_cut_like_the_sequence(backend, comm_type, window):
    """all_gather and p2p cut each rank's rows of the mask; a2a gathers every row; a sliding
    window masks on top of the documents."""
    run_distributed(2, _check_against_one_process, 1, 2,
                    {"attention_backend": backend, "cp_comm_type": comm_type,
                     "window_size": window}, True)


@pytest.mark.parametrize("cp,overrides", [
    (2, {"cp_comm_type": "all_gather"}), (2, {"cp_comm_type": "p2p"}),
    (2, {"cp_comm_type": "a2a"}),
    (2, {"cp_comm_type": "a2a", "window_size": [3, 0], "attention_backend": "unfused"}),
    (4, {"cp_comm_type": "a2a+p2p", "hierarchical_context_parallel_sizes": [2, 2]})],
    ids=["all_gather", "p2p", "a2a", "a2a_window_unfused", "a2a+p2p"])
def test_packed_documents_under_context_parallelism(cp, overrides):
    run_distributed(cp, _check_against_one_process, 1, cp, overrides, "packed")


def _masks_kept(comm_type: str) -> list[int]:
    """The bytes of the ``[b, 1, ...]`` masks a CP 2 GPT keeps for backward with packed
    documents (of each storage)."""
    ps.initialize_model_parallel(1, context_parallel_size=2)
    model = GPTModel(_config(cp=2, cp_comm_type=comm_type))
    batch = get_batch_on_this_cp_rank(_batch("packed"), ps.get_context_parallel_group())
    with SavedTensorMeter(exclude=model.parameters()) as meter:
        model(batch["tokens"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    return [nbytes for shape, _, nbytes, counted in meter.entries
            if counted and len(shape) == 4 and shape[:2] == (B, 1)]


@pytest.mark.parametrize("comm_type", ["a2a", "all_gather"])
def test_a2a_keeps_no_mask_of_packed_documents(comm_type):
    """a2a gathers the documents of its heads' whole sequence; all_gather keeps its rows of
    their mask (SDPA's additive form in fp32), one storage that its chunks' views share."""
    kept = run_distributed(2, _masks_kept, comm_type)
    want = [] if comm_type == "a2a" else [B * S // 2 * S * 4]
    assert kept == [want, want]


def _packed_documents_in_a_core_that_splits_them():
    ps.initialize_model_parallel(1, context_parallel_size=2)
    core = GPTModel(_config(cp=2)).decoder.layers[0].self_attention.core_attention
    packed = _batch("packed")["attention_mask"]
    q = torch.zeros(S // 2, B, 4, 8)
    with pytest.raises(ValueError, match="packed documents split over context-parallel ranks: "
                                         "the attention under all_gather, p2p and a2a\\+p2p "
                                         "takes the rank's rows of their mask"):
        core(q, q, q, packed)


def test_packed_documents_are_refused_by_a_core_that_splits_them():
    run_distributed(2, _packed_documents_in_a_core_that_splits_them)


def _decode_with_context_parallelism():
    ps.initialize_model_parallel(1, context_parallel_size=2)
    model = GPTModel(_config(cp=2))
    with pytest.raises(ValueError, match="a key/value cache \\(inference_params\\) needs "
                                         "context_parallel_size=1, not 2"):
        model(torch.zeros(1, 4, dtype=torch.int64), inference_params=InferenceParams(S))


def test_decoding_with_a_cache_is_refused_under_context_parallelism():
    run_distributed(2, _decode_with_context_parallelism)


def _ring_against_sdpa(tile: int, groups: int, documents: bool, window: int | None):
    """`ring_attention` on this CP rank's tokens, ``tile`` query rows at a time (a sliding
    window of ``window`` earlier keys), against SDPA over the whole sequence with the mask
    written out: the output at the rank's positions and the gradients of its q, k and v
    (which, for k and v, gather every rank's queries)."""
    ps.initialize_model_parallel(1, context_parallel_size=2)
    group = ps.get_context_parallel_group()
    g = torch.Generator().manual_seed(5)
    heads, d = 4, 8
    q, k, v = (torch.randn(S, B, n, d, generator=g, dtype=torch.float64)
               for n in (heads, groups, groups))
    mask = _batch(True)["attention_mask"] if documents else None  # [b, 1, s, s], True: masked
    positions = local_positions(S, 2, ps.get_context_parallel_rank())
    local = [t[positions].clone().requires_grad_(True) for t in (q, k, v)]
    out = ring_attention(*local, None if mask is None else mask[:, :, positions], 0.3, group,
                         tile=tile, window=window)
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    keep = torch.ones(S, S, dtype=torch.bool).tril() if mask is None else ~mask
    if window is not None:  # query i keeps keys i - window .. i
        keep = keep & torch.ones(S, S, dtype=torch.bool).triu(-window)
    ref = F.scaled_dot_product_attention(
        *(t.permute(1, 2, 0, 3) for t in full), attn_mask=keep, scale=0.3,
        enable_gqa=groups < heads).permute(2, 0, 1, 3).reshape(S, B, heads * d)
    assert_rel_close(out, ref[positions], what="output")
    weights = torch.randn(S, B, heads * d, generator=g, dtype=torch.float64)
    (out * weights[positions]).sum().backward()
    (ref * weights).sum().backward()
    for name, mine, theirs in zip("qkv", local, full):
        assert_rel_close(mine.grad, theirs.grad[positions], what=f"grad of {name}")


@pytest.mark.parametrize("window", [None, 2, 5], ids=["full", "window2", "window5"])
@pytest.mark.parametrize("tile", [3, 1024])
@pytest.mark.parametrize("groups,documents", [(4, False), (2, True)])
def test_ring_attention_tiles_equal_sdpa_over_the_whole_sequence(tile, groups, documents,
                                                                 window):
    """Tiles of 3 rows split each 4-row chunk unevenly; grouped queries; document masks;
    windows of 2 and 5 earlier keys (the blocks of chunks further back skipped, the rest
    cut)."""
    run_distributed(2, _ring_against_sdpa, tile, groups, documents, window)
