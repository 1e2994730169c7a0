"""Pipeline parallelism: the schedules' order against the papers', and GPT trained with
TP x PP x DP (1F1B and interleaved) against a single-process PyTorch reference."""

import re

import pytest
import torch
import torch.distributed as dist
from checks import assert_rel_close, computed_once, own_rank_group
from harness import run_distributed
from torch import nn

from mp import parallel_state as ps
from mp.distributed import DistributedDataParallel
from mp.model import TransformerConfig
from mp.model.gpt import GPTModel
from mp.model.stages import build_gpt_chunks
from mp.optim import get_megatron_optimizer
from mp.pipeline_parallel.schedules import get_forward_backward_func
from mp.training.gpt_step import forward_step as gpt_forward_step

# --- the order of forward and backward passes ------------------------------------------------

H = 8


class _Record(torch.autograd.Function):
    """Identity that logs ("B", chunk, micro-batch) when the gradient passes."""

    @staticmethod
    def forward(ctx, x, log, tag):
        ctx.log, ctx.tag = log, tag
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        ctx.log.append(("B",) + ctx.tag)
        return grad, None, None


class _ToyChunk(nn.Module):
    """A one-layer pipeline chunk that logs its forward and backward passes."""

    def __init__(self, chunk: int, log: list, overlap_p2p_comm: bool = True):
        super().__init__()
        self.chunk, self.log, self.count = chunk, log, 0
        self.layer = nn.Linear(H, H)
        self.input_tensor = None
        self.config = TransformerConfig(num_layers=1, hidden_size=H, num_attention_heads=1,
                                        vocab_size=1, seq_length=4,
                                        overlap_p2p_comm=overlap_p2p_comm)

    def set_input_tensor(self, tensor):
        self.input_tensor = tensor

    def forward(self, x):
        tag = (self.chunk, self.count)
        self.count += 1
        self.log.append(("F",) + tag)
        x = x if self.input_tensor is None else self.input_tensor
        return _Record.apply(torch.tanh(self.layer(x)), self.log, tag)


def _toy_step(data_iterator, model):
    out = model(next(data_iterator))
    return out, lambda o: (o.sum(), {"loss": o.sum().detach()})


def _run_order(v: int, m: int, overlap: bool = False) -> list:
    ps.initialize_model_parallel(1, dist.get_world_size(), v if v > 1 else None)
    log = []
    chunks = [_ToyChunk(c, log, overlap) for c in range(v)]
    iterators = [iter([torch.ones(4, 2, H)] * m) for _ in range(v)]
    get_forward_backward_func()(forward_step_func=_toy_step, data_iterator=iterators,
                                model=chunks, num_microbatches=m, seq_length=4,
                                micro_batch_size=2, finalize_model_grads_func=None)
    return log


def expected_order(p: int, r: int, m: int, v: int) -> list:
    """The papers' per-stage order, written from their description: forwards run chunk by
    chunk in groups of ``p`` micro-batches (backwards the chunks in reverse); ``warmup``
    forwards, then one forward and one backward alternately, then the remaining backwards."""
    fwd = [(c, g * p + j) for g in range(m // p if v > 1 else 1) for c in range(v)
           for j in range(p if v > 1 else m)]
    bwd = [(c, g * p + j) for g in range(m // p if v > 1 else 1) for c in reversed(range(v))
           for j in range(p if v > 1 else m)]
    if v == 1:
        warmup = min(p - r - 1, m)  # Narayanan et al. 2021, figure 4 (top)
    else:
        warmup = m * v if m == p else min(2 * (p - r - 1) + (v - 1) * p, m * v)
    order = [("F",) + f for f in fwd[:warmup]]
    for f, b in zip(fwd[warmup:], bwd):
        order += [("F",) + f, ("B",) + b]
    return order + [("B",) + b for b in bwd[len(fwd) - warmup:]]


@pytest.mark.parametrize("v,overlap", [(1, False), (2, False), (2, True)])
def test_schedule_order_p4_m8(v, overlap):
    logs = run_distributed(4, _run_order, v, 8, overlap)
    for r, log in enumerate(logs):
        assert log == expected_order(4, r, 8, v), f"stage {r}"


def test_one_f_one_b_order_by_hand():
    """Stage 0 of 4 with 8 micro-batches (the figure's first row): 3 warm-up forwards."""
    assert expected_order(4, 0, 8, 1)[:8] == [("F", 0, 0), ("F", 0, 1), ("F", 0, 2),
                                              ("F", 0, 3), ("B", 0, 0), ("F", 0, 4),
                                              ("B", 0, 1), ("F", 0, 5)]


# --- GPT: pipeline layouts against one process -----------------------------------------------

S, MBS, VOCAB, LAYERS = 16, 2, 96, 8
STEPS, LR, CLIP = 3, 2e-3, 0.5
# The key bias has an exactly zero gradient (softmax ignores a per-row shift), so what it gets
# is rounding noise, which Adam with a tiny eps blows up to full-size steps that differ
# between any two summation orders. A larger eps keeps noise small; the math is unchanged.
EPS = 1e-5


# A Llama-style layer: grouped-query attention, RMSNorm, SwiGLU, RoPE, untied, no biases.
LLAMA = {"num_query_groups": 2, "normalization": "RMSNorm", "activation": "swiglu",
         "position_embedding_type": "rope", "add_bias_linear": False,
         "untie_embeddings_and_output_weights": True}
# ... with heads 12 wide (hidden 32 / 4 heads would be 8), half of each rotated, 1 + weight norms,
# and q/k norms (replicated over TP, their gradients summed there)
WIDE_HEADS = {**LLAMA, "kv_channels": 12, "rotary_percent": 0.5,
              "layernorm_zero_centered_gamma": True, "qk_layernorm": True}
# ... with a sliding window of 3 keys but in layers 3 and 6: each stage's layers by their
# numbers over the whole model
MISTRAL = {**LLAMA, "window_size": [3, 0], "window_attn_skip_freq": 3}


def _config(tp=1, pp=1, vpp=None, sp=False, overlap=True, **model) -> TransformerConfig:
    return TransformerConfig(**{"num_layers": LAYERS, **model}, hidden_size=32,
                             num_attention_heads=4, vocab_size=VOCAB, seq_length=S,
                             make_vocab_size_divisible_by=8, hidden_dropout=0.0,
                             attention_dropout=0.0, tensor_model_parallel_size=tp,
                             pipeline_model_parallel_size=pp,
                             virtual_pipeline_model_parallel_size=vpp, sequence_parallel=sp,
                             overlap_p2p_comm=overlap)


def _global_batches(global_batch: int):
    g = torch.Generator().manual_seed(11)
    for _ in range(STEPS):
        tokens = torch.randint(0, VOCAB, (global_batch, S), generator=g)
        yield {"tokens": tokens, "labels": torch.randint(0, VOCAB, (global_batch, S), generator=g),
               "loss_mask": torch.ones(global_batch, S),
               "position_ids": torch.arange(S).expand(global_batch, S)}


def _reference_name(name: str, first_layer: int, tied: bool) -> str:
    match = re.fullmatch(r"decoder\.layers\.(\d+)\.(.*)", name)
    if match:
        return f"decoder.layers.{first_layer + int(match[1])}.{match[2]}"
    if name == "output_layer.weight" and tied:
        return "embedding.word_embeddings.weight"
    return name


def _shard(param, full: torch.Tensor) -> torch.Tensor:
    if getattr(param, "tensor_model_parallel", False):
        t = ps.get_tensor_model_parallel_world_size()
        return full.chunk(t, param.partition_dim)[ps.get_tensor_model_parallel_rank()]
    return full


def _train_reference(ref: GPTModel, global_batch: int):
    """The single-process reference's loss per step over `_global_batches` and its trained
    parameters by name."""
    initial = {n: p.detach().clone() for n, p in ref.named_parameters()}
    decay = [p for p in ref.parameters() if p.dim() > 1]
    ref_opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                 {"params": [p for p in ref.parameters() if p.dim() == 1],
                                  "weight_decay": 0.0}], lr=LR, eps=EPS)
    losses = []
    for batch in _global_batches(global_batch):
        ref_opt.zero_grad()
        loss = ref(batch["tokens"], labels=batch["labels"]).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), CLIP)
        ref_opt.step()
        losses.append(loss.item())
    unchanged = [n for n, p in ref.named_parameters() if torch.equal(p, initial[n])]
    assert not unchanged, f"the reference never updated {unchanged}: the test is too weak"
    return losses, {n: p.detach().clone() for n, p in ref.named_parameters()}


def _check_pipeline_training(tp: int, pp: int, vpp, microbatches: int, sp: bool,
                             overlap: bool = True, model: dict | None = None,
                             split: dict | None = None):
    """``split``: an uneven pipeline split (`TransformerConfig` fields) for the pipelined
    model only."""
    model = model or {}
    tied = not model.get("untie_embeddings_and_output_weights", False)
    ps.initialize_model_parallel(tp, pp, vpp)
    ref_group = own_rank_group()
    dp = ps.get_data_parallel_world_size()
    dp_rank, pp_rank = ps.get_data_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    global_batch = MBS * microbatches * dp

    torch.manual_seed(5)
    ref = GPTModel(_config(**model), group=ref_group)
    ref_params = dict(ref.named_parameters())
    chunks = build_gpt_chunks(_config(tp, pp, vpp, sp, overlap, **model, **(split or {})))
    with torch.no_grad():  # start from the reference's weights (stages are seeded apart)
        for c, chunk in enumerate(chunks):
            first = chunk.config.chunk_layers(pp_rank, c).start
            for name, p in chunk.named_parameters():
                p.copy_(_shard(p, ref_params[_reference_name(name, first, tied)]))
    ref_losses, ref_params = computed_once(_train_reference, ref, global_batch)
    models = [DistributedDataParallel(chunk, bucket_size=2000) for chunk in chunks]
    optimizer = get_megatron_optimizer(models, lr=LR, weight_decay=0.1, clip_grad=CLIP,
                                       adam_eps=EPS)

    losses = []
    for batch in _global_batches(global_batch):
        rows = slice(dp_rank * global_batch // dp, (dp_rank + 1) * global_batch // dp)
        local = {k: v[rows] for k, v in batch.items()}
        micro = [{k: v[i * MBS:(i + 1) * MBS] for k, v in local.items()}
                 for i in range(microbatches)]
        for model in models:
            model.zero_grad_buffer()
        optimizer.zero_grad()
        reported = get_forward_backward_func()(
            forward_step_func=gpt_forward_step, data_iterator=[iter(micro) for _ in models],
            model=models, num_microbatches=microbatches, seq_length=S, micro_batch_size=MBS,
            grad_scale_func=optimizer.scale_loss)
        optimizer.step()
        if reported:
            loss = torch.stack([r["lm loss"][0] / r["lm loss"][1] for r in reported]).mean()
            dist.all_reduce(loss, group=ps.get_data_parallel_group())
            losses.append(loss.item() / dp)

    if ps.is_pipeline_last_stage(ignore_virtual=True):
        assert_rel_close(torch.tensor(losses), torch.tensor(ref_losses), rtol=1e-5,
                         what="loss curve")
    # the weights after AdamW steps: a bias whose gradient is near zero moves by the ratio of
    # two small numbers (1.1e-5 seen on an AMD EPYC for fc2's bias), hence 3e-5
    for c, chunk in enumerate(chunks):
        first = chunk.config.chunk_layers(pp_rank, c).start
        for name, p in chunk.named_parameters():
            assert_rel_close(p, _shard(p, ref_params[_reference_name(name, first, tied)]),
                             rtol=3e-5, what=f"final {name}")
    return pp_rank, [len(chunk.decoder.layers) for chunk in chunks]


@pytest.mark.parametrize("tp,pp,vpp,microbatches,sp,overlap,model", [
    (2, 2, None, 4, False, True, None),  # TP2 x PP2 x DP2, 1F1B
    (1, 4, None, 4, False, True, None),  # PP4 x DP2
    (2, 2, 2, 4, True, True, None),      # TP2 x PP2 x VPP2 x DP2, interleaved, p2p overlapped, SP
    (1, 4, 2, 8, False, False, None),    # PP4 x VPP2 x DP2, interleaved, blocking p2p
    (1, 8, None, 8, False, True, None),  # PP8, 8 micro-batches
    (2, 2, 2, 4, True, True, LLAMA),     # the interleaved SP layout with a Llama-style model
    (2, 2, None, 4, True, True, WIDE_HEADS),  # TP2 x PP2 x DP2, SP, 1F1B, kv_channels etc.
    (1, 2, 2, 4, False, True, MISTRAL),  # PP2 x VPP2 x DP4, sliding windows
])
def test_gpt_pipeline_training_matches_single_process(tp, pp, vpp, microbatches, sp, overlap,
                                                      model):
    run_distributed(8, _check_pipeline_training, tp, pp, vpp, microbatches, sp, overlap, model,
                    timeout=600)


@pytest.mark.parametrize("tp,pp,vpp,microbatches,model,split,chunk_layers", [
    # PP4 x DP2, 1F1B: stages of 1, 3, 3 and 1 layers
    (1, 4, None, 4, None, {"num_layers_in_first_pipeline_stage": 1,
                           "num_layers_in_last_pipeline_stage": 1}, [[1], [3], [3], [1]]),
    # TP2 x PP2 x VPP2 x DP2, interleaved, SP: chunks of 1 layer on stage 0, of 3 on stage 1
    (2, 2, 2, 4, LLAMA, {"num_layers_in_first_pipeline_stage": 2}, [[1, 1], [3, 3]]),
    # PP4 x VPP2 x DP2, 6 layers + embedding + loss in 8 chunks: the model's first chunk holds
    # only the embedding, its last only the output layer and loss
    (1, 4, 2, 8, {"num_layers": 6}, {"account_for_embedding_in_pipeline_split": True,
                                     "account_for_loss_in_pipeline_split": True},
     [[0, 1], [1, 1], [1, 1], [1, 0]]),
    # PP4 x VPP2 x DP2 from Megatron's layout string: chunks Et, tt, t, t, t, t, t, L
    (1, 4, 2, 8, None, {"pipeline_model_parallel_layout": "Et|tt|(t|)*5,L"},
     [[1, 1], [2, 1], [1, 1], [1, 0]]),
], ids=["first-last-1f1b", "first-interleaved-llama", "embedding-loss-empty-chunks", "layout"])
def test_uneven_pipeline_training_matches_single_process(tp, pp, vpp, microbatches, model,
                                                         split, chunk_layers):
    built = run_distributed(8, _check_pipeline_training, tp, pp, vpp, microbatches, tp > 1,
                            True, model, split, timeout=600)
    assert {pp_rank: layers for pp_rank, layers in built} == dict(enumerate(chunk_layers))


def _check_forward_only(pp: int, vpp, m: int | None = None, group: int | None = None):
    """Forward-only over ``m`` micro-batches (default PP), interleaved in groups of
    ``group``: each micro-batch's loss, in order, as one process's."""
    ps.initialize_model_parallel(1, pp, vpp)
    m = m or pp
    torch.manual_seed(5)
    ref = GPTModel(_config(), group=own_rank_group())
    ref_params = dict(ref.named_parameters())
    chunks = build_gpt_chunks(_config(1, pp, vpp, microbatch_group_size_per_vp_stage=group))
    with torch.no_grad():
        for c, chunk in enumerate(chunks):
            first = chunk.config.chunk_layers(ps.get_pipeline_model_parallel_rank(), c).start
            for name, p in chunk.named_parameters():
                p.copy_(ref_params[_reference_name(name, first, True)])
    batch = next(_global_batches(MBS * m))
    micro = [{k: v[i * MBS:(i + 1) * MBS] for k, v in batch.items()} for i in range(m)]
    reported = get_forward_backward_func()(
        forward_step_func=gpt_forward_step, data_iterator=[iter(micro) for _ in chunks],
        model=chunks, num_microbatches=m, seq_length=S, micro_batch_size=MBS,
        forward_only=True)
    assert all(p.grad is None for chunk in chunks for p in chunk.parameters())
    if ps.is_pipeline_last_stage(ignore_virtual=True):
        assert len(reported) == m
        with torch.no_grad():
            for i, (r, one) in enumerate(zip(reported, micro)):
                assert_rel_close(r["lm loss"][0] / r["lm loss"][1],
                                 ref(one["tokens"], labels=one["labels"]).mean(),
                                 what=f"micro-batch {i}'s validation loss")


@pytest.mark.parametrize("pp,vpp,m,group", [(4, None, None, None), (2, 2, None, None),
                                            (2, 2, 5, 3)])
def test_forward_only_evaluation(pp, vpp, m, group):
    run_distributed(4 if pp == 4 else 2, _check_forward_only, pp, vpp, m, group)


def _check_bad_layouts():
    with pytest.raises(ValueError, match="num_layers=8 is not divisible by "
                                         "pipeline_model_parallel_size x "
                                         "virtual_pipeline_model_parallel_size=3"):
        _config(1, 3)
    with pytest.raises(ValueError, match="num_layers_in_first_pipeline_stage=3 must be a "
                                         "non-negative integer divisible by "
                                         "virtual_pipeline_model_parallel_size=2"):
        _config(1, 2, 2, num_layers_in_first_pipeline_stage=3)
    ps.initialize_model_parallel(1, 2, 2)
    with pytest.raises(ValueError, match="the interleaved schedule needs num_microbatches=3 "
                                         "to be a multiple of pipeline_model_parallel_size=2"):
        get_forward_backward_func()(forward_step_func=_toy_step, data_iterator=[iter([])] * 2,
                                    model=[_ToyChunk(0, []), _ToyChunk(1, [])],
                                    num_microbatches=3, seq_length=4, micro_batch_size=2)


def test_bad_layouts_fail_before_training():
    run_distributed(2, _check_bad_layouts)
