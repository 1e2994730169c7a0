"""Activation memory of mixture-of-experts layers: the bytes autograd saves for backward,
counted with saved-tensor hooks on the real layers, against `mp.estimate.mlp_activations.moe_terms`
(through ``layer_terms(..., moe=True)``) and the stage-level sums of `mp.estimate.memory`.

The CPU measurement equals the estimate for `mp.estimate.CPU` to the byte. The rows a rank's
experts take depend on the routing: at EP 1 every rank takes all ``N k`` routed copies, so
the estimate is exact; at EP 2 each rank is compared with the estimate for the rows it
actually took (``rows=``), and the ranks of an expert-parallel group, which take the
``P N k`` copies their routers sent between them, together with ``P`` times the balanced
estimate. Dropout is on and activations are bf16 (one case fp32), as in
tests/test_estimate_activations.py.
"""

import dataclasses
import itertools

import pytest
import torch
from harness import run_distributed
from test_estimate_activations import HEADS, B, H, S, model_saved_bytes

from mp import parallel_state as ps
from mp.estimate import CPU, CUDA, SavedTensorMeter, layer_terms
from mp.estimate.activations import layer_bytes
from mp.estimate.memory import (
    chunk_saved_bytes,
    embedding_terms,
    output_terms,
    recompute_working_set,
)
from mp.estimate.mlp_activations import moe_terms
from mp.model import TransformerConfig
from mp.model.context_parallel import local_positions
from mp.model.rope import rotary_freqs
from mp.model.transformer import TransformerBlock, TransformerLayer
from mp.tensor_parallel import model_parallel_cuda_manual_seed

MOE = dict(num_moe_experts=4, moe_router_topk=2, moe_ffn_hidden_size=48)

MOE_CASES = {  # name -> config overrides (tp, sequence_parallel and EP are added per case)
    # GeLU with biases, top-2 (top-k logits, then a softmax over them), no auxiliary losses
    "gelu_top2": {},
    "gelu_top2_aux_and_z_loss": dict(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01),
    "swiglu_nobias_top1": dict(activation="swiglu", add_bias_linear=False, moe_router_topk=1),
    # the top-k softmax is kept, and again scaled
    "squared_relu_top3_scaled_aux_loss": dict(activation="squared_relu", moe_router_topk=3,
                                              moe_router_topk_scaling_factor=2.0,
                                              moe_aux_loss_coeff=0.1),
    # the aux loss reuses the router's softmax over all experts
    "pre_softmax_aux_loss": dict(moe_router_pre_softmax=True, moe_aux_loss_coeff=0.1),
    "pre_softmax_z_loss_scaled": dict(moe_router_pre_softmax=True, moe_z_loss_coeff=0.01,
                                      moe_router_topk_scaling_factor=2.0),
    # the aux loss computes the sigmoids again and normalizes them
    "sigmoid_top2_aux_loss": dict(moe_router_score_function="sigmoid", moe_aux_loss_coeff=0.1),
    "sigmoid_top1": dict(moe_router_score_function="sigmoid", moe_router_topk=1),
    "sigmoid_expert_bias_scaled_top3": dict(moe_router_score_function="sigmoid",
                                            moe_router_enable_expert_bias=True,
                                            moe_router_topk_scaling_factor=2.5,
                                            moe_router_topk=3),
    "shared_expert_z_loss": dict(moe_shared_expert_intermediate_size=32, moe_z_loss_coeff=0.01),
    "shared_expert_swiglu_nobias": dict(moe_shared_expert_intermediate_size=32,
                                        activation="swiglu", add_bias_linear=False),
    "gated_shared_expert": dict(moe_shared_expert_intermediate_size=32,
                                moe_shared_expert_gate=True),
    "global_aux_loss": dict(moe_router_load_balancing_type="global_aux_loss",
                            moe_aux_loss_coeff=0.1),
    # fp32 and fp64 copies of the router's input and weight
    "router_fp32_z_loss": dict(moe_router_dtype="fp32", moe_z_loss_coeff=0.01),
    "router_fp64_shared_expert_aux_loss": dict(moe_router_dtype="fp64",
                                               moe_shared_expert_intermediate_size=32,
                                               moe_aux_loss_coeff=0.1),
    # fp32 with the unfused attention core (the CPU's SDPA math path under dropout keeps fp32
    # q, k and v differently from the estimate's 16-bit rule, a dense-layer matter)
    "fp32_aux_and_z_loss": dict(precision="fp32", attention_backend="unfused",
                                moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01),
    "fp32_router_fp32_z_loss": dict(precision="fp32", attention_backend="unfused",
                                    moe_router_dtype="fp32", moe_z_loss_coeff=0.01),
    "selective_aux_loss": dict(recompute_granularity="selective", moe_aux_loss_coeff=0.1),
    # group-limited routing keeps the allowed experts' mask (not for the sigmoid's choice)
    "groups_pre_softmax": dict(moe_router_num_groups=2, moe_router_group_topk=1,
                               moe_router_pre_softmax=True),
    "groups_sigmoid": dict(moe_router_num_groups=2, moe_router_group_topk=1,
                           moe_router_score_function="sigmoid"),
    # the expert fractions of each of the B sequences
    "sequence_aux_loss_sigmoid": dict(moe_router_load_balancing_type="seq_aux_loss",
                                      moe_router_score_function="sigmoid",
                                      moe_aux_loss_coeff=0.1),
    "rmsnorm_swiglu_rope_gqa_z_loss": dict(normalization="RMSNorm", activation="swiglu",
                                           position_embedding_type="rope",
                                           add_bias_linear=False, num_attention_heads=16,
                                           num_query_groups=4, moe_z_loss_coeff=0.01),
}


def _config(tp: int, sequence_parallel: bool, ep: int = 1, num_layers: int = 1,
            **overrides) -> TransformerConfig:
    kw = dict(num_layers=num_layers, hidden_size=H, num_attention_heads=HEADS, vocab_size=300,
              seq_length=S, hidden_dropout=0.1, attention_dropout=0.1, precision="bf16",
              tensor_model_parallel_size=tp, sequence_parallel=sequence_parallel,
              expert_model_parallel_size=ep, **MOE)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _saved_bytes(module: torch.nn.Module, cfg: TransformerConfig, seed: int) -> tuple[int, int]:
    """``(bytes module(x, None, rotary) saves for backward on this rank, rows its experts
    took)``, parameters excluded; runs the backward too. ``seed`` draws ``x``."""
    cp = cfg.context_parallel_size
    rows = S // cp // (cfg.tensor_model_parallel_size if cfg.sequence_parallel else 1)
    torch.manual_seed(seed)
    x = torch.randn(rows, B, H, dtype=cfg.params_dtype, requires_grad=True)
    positions = local_positions(S, cp, ps.get_context_parallel_rank())  # this CP rank's
    freqs = (rotary_freqs(S, cfg.rotary_dim, cfg.rotary_base, x.device)[positions]
             if cfg.position_embedding_type == "rope" else None)
    taken = []
    hooks = [m.register_forward_pre_hook(lambda _, args: taken.append(args[0].size(0)))
             for name, m in module.named_modules() if name.endswith("experts")
             and not name.endswith("shared_experts")]
    with SavedTensorMeter(exclude=module.parameters()) as meter:
        y = module(x, None, freqs)
    y.float().square().sum().backward()
    for hook in hooks:
        hook.remove()
    assert x.grad is not None
    return meter.bytes, sum(taken)


def _measure_moe_layers(tp: int, ep: int) -> dict:
    """Per case: (saved bytes, rows the experts took, this rank's expert-parallel group)."""
    ps.initialize_model_parallel(tp, expert_model_parallel_size=ep)
    # the ranks of an EP group are data-parallel ones: give them different tokens
    seed = ps.get_data_parallel_rank()
    group = (ps.get_tensor_model_parallel_rank(), ps.get_expert_data_parallel_rank())
    results = {}
    sps = (False, True) if tp > 1 else (False,)
    for (name, overrides), sp in itertools.product(MOE_CASES.items(), sps):
        model_parallel_cuda_manual_seed(1234)  # the same weights on every EP rank
        cfg = _config(tp, sp, ep, **overrides)
        results[name, sp] = (*_saved_bytes(TransformerLayer(cfg, 1), cfg, seed), group)
    return results


def _moe_estimate(cfg: TransformerConfig, rows: int | None = None) -> float:
    """The CPU estimate of one MoE layer whose experts take ``rows`` rows (default balanced)."""
    balanced = layer_bytes(cfg, B, CPU, moe=True)
    if rows is None:
        return balanced
    return balanced - sum(moe_terms(cfg, B, CPU).values()) \
        + sum(moe_terms(cfg, B, CPU, rows=rows).values())


@pytest.mark.parametrize("tp", [1, 2])
def test_saved_bytes_of_an_moe_layer_match_the_estimate(tp):
    """EP 1: every rank's experts take all ``N k`` copies; the estimate is exact."""
    measured = run_distributed(tp, _measure_moe_layers, tp, 1)
    failures = []
    for rank, results in enumerate(measured):
        for (name, sp), (got, rows, _) in results.items():
            cfg = _config(tp, sp, **MOE_CASES[name])
            assert rows == S * B * cfg.moe_router_topk
            expected = sum(layer_terms(cfg, B, CPU, moe=True).values())
            if got != expected:
                failures.append(f"rank {rank}, {name} (SP {sp}): measured {got} B, estimated "
                                f"{expected:.0f} B ({got / expected - 1:+.2%})")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("tp", [1, 2], ids=["tp1_ep2", "tp2_ep2"])
def test_saved_bytes_of_an_moe_layer_with_expert_parallelism(tp):
    """EP 2 (DP 2): each rank against the estimate for the rows its experts took, and each
    EP group's sum against 2 x the balanced estimate (the group takes ``2 N k`` rows)."""
    ep = 2
    measured = run_distributed(tp * ep, _measure_moe_layers, tp, ep)
    failures = []
    unbalanced = 0
    for key in measured[0]:
        name, sp = key
        cfg = _config(tp, sp, ep, **MOE_CASES[name])
        groups = {}
        for rank, results in enumerate(measured):
            got, rows, group = results[key]
            unbalanced += rows != S * B * cfg.moe_router_topk
            groups.setdefault(group, []).append((rank, got, rows))
            expected = _moe_estimate(cfg, rows)
            if got != expected:
                failures.append(f"rank {rank}, {name} (SP {sp}), {rows} rows: measured {got} B,"
                                f" estimated {expected:.0f} B ({got / expected - 1:+.2%})")
        for group, members in groups.items():
            assert len(members) == ep
            assert sum(rows for _, _, rows in members) == ep * S * B * cfg.moe_router_topk
            got = sum(b for _, b, _ in members)
            if got != ep * _moe_estimate(cfg):
                failures.append(f"EP group of ranks {[r for r, _, _ in members]}, {name} "
                                f"(SP {sp}): measured {got} B, estimated "
                                f"{ep * _moe_estimate(cfg):.0f} B")
    assert unbalanced, "every rank took the balanced rows: the test shows nothing per rank"
    assert not failures, "\n".join(failures)


def _measure_with_context_parallelism(tp: int, cp: int, comm_type: str,
                                       sequence_parallel: bool) -> int:
    ps.initialize_model_parallel(tp, context_parallel_size=cp)
    model_parallel_cuda_manual_seed(1234)
    cfg = _config(tp, sequence_parallel, **CP_CASE, context_parallel_size=cp,
                  cp_comm_type=comm_type)
    return _saved_bytes(TransformerLayer(cfg, 1), cfg, 0)[0]


# without attention dropout (p2p's ring attention has none); the losses count whole sequences
CP_CASE = dict(attention_dropout=0.0, moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01,
               moe_shared_expert_intermediate_size=32, position_embedding_type="rope")


@pytest.mark.parametrize("tp,cp,comm_type,sequence_parallel", [
    (1, 2, "p2p", False), (1, 2, "a2a", False), (2, 2, "p2p", True)],
    ids=["cp2_p2p", "cp2_a2a", "tp2_sp_cp2_p2p"])
def test_saved_bytes_of_an_moe_layer_with_context_parallelism(tp, cp, comm_type,
                                                             sequence_parallel):
    """Each CP rank routes its own ``s / c`` tokens of each sequence."""
    got = run_distributed(tp * cp, _measure_with_context_parallelism, tp, cp, comm_type,
                          sequence_parallel)
    cfg = _config(tp, sequence_parallel, **CP_CASE, context_parallel_size=cp,
                  cp_comm_type=comm_type)
    assert got == [sum(layer_terms(cfg, B, CPU, moe=True).values())] * (tp * cp)


# two layers: with moe_layer_freq=2 layer 0 has experts and layer 1 is dense; [0, 1] the other
# way round (full recompute, block: only the first layer is checkpointed)
BLOCK_CASES = {
    "moe_then_dense": dict(moe_layer_freq=2, moe_aux_loss_coeff=0.1),
    "dense_then_moe_selective": dict(moe_layer_freq=[0, 1], recompute_granularity="selective",
                                     moe_router_score_function="sigmoid"),
    "moe_then_dense_full_block": dict(moe_layer_freq=2, recompute_granularity="full",
                                      recompute_method="block", recompute_num_layers=1),
    "dense_then_moe_full_block": dict(moe_layer_freq=[0, 1], recompute_granularity="full",
                                      recompute_method="block", recompute_num_layers=1,
                                      moe_shared_expert_intermediate_size=32),
    "full_uniform": dict(moe_layer_freq=2, recompute_granularity="full",
                         recompute_method="uniform"),
}


def _measure_blocks(tp: int) -> dict:
    ps.initialize_model_parallel(tp)
    results = {}
    sps = (False, True) if tp > 1 else (False,)
    for (name, overrides), sp in itertools.product(BLOCK_CASES.items(), sps):
        model_parallel_cuda_manual_seed(1234)
        cfg = _config(tp, sp, num_layers=2, **overrides)
        results[name, sp] = _saved_bytes(TransformerBlock(cfg, post_process=False), cfg, 0)[0]
    return results


@pytest.mark.parametrize("tp", [1, 2])
def test_saved_bytes_of_a_chunk_with_dense_and_moe_layers(tp):
    """`chunk_saved_bytes` counts each layer of the chunk as dense or MoE, as the model
    builds it (and keeps the one the block recompute leaves whole)."""
    measured = run_distributed(tp, _measure_blocks, tp)
    failures = []
    for rank, results in enumerate(measured):
        for (name, sp), got in results.items():
            cfg = _config(tp, sp, num_layers=2, **BLOCK_CASES[name])
            expected = chunk_saved_bytes(cfg, B, CPU, cfg.chunk_layers())
            if got != expected:
                failures.append(f"rank {rank}, {name} (SP {sp}): measured {got} B, estimated "
                                f"{expected:.0f} B ({got / expected - 1:+.2%})")
    assert not failures, "\n".join(failures)


def _measure_model(tp: int, sequence_parallel: bool, compiled: bool, **overrides) -> int:
    """Saved bytes of a two-layer GPT's forward with the loss (layer 0 MoE, layer 1 dense);
    ``compiled``: with `mp.jit`'s fused functions compiled (on the CPU by inductor)."""
    ps.initialize_model_parallel(tp)
    return model_saved_bytes(_config(tp, sequence_parallel, num_layers=2, **overrides),
                             compiled)


@pytest.mark.parametrize("tp,sequence_parallel,compiled,overrides", [
    (1, False, False, dict(moe_aux_loss_coeff=0.1, moe_z_loss_coeff=0.01)),
    (2, True, False, dict(normalization="RMSNorm", activation="swiglu", add_bias_linear=False,
                          position_embedding_type="rope", moe_shared_expert_intermediate_size=32,
                          moe_router_score_function="sigmoid", moe_aux_loss_coeff=0.1)),
    (2, False, False, dict(moe_router_pre_softmax=True, moe_router_topk=1)),
    # compiled: as CUDA runs them, the experts' and the shared expert's SwiGLU keep the gate
    # and up outputs only
    (2, True, True, dict(activation="swiglu", moe_shared_expert_intermediate_size=32)),
], ids=["tp1", "tp2_sp_llama_shared_sigmoid", "tp2_pre_softmax_top1",
        "tp2_sp_compiled_swiglu_shared"])
def test_saved_bytes_of_a_whole_moe_model(tp, sequence_parallel, compiled, overrides):
    """Embedding, a MoE and a dense layer (``moe_layer_freq=2``), final norm, output layer
    and the cross-entropy."""
    overrides = dict(moe_layer_freq=2, **overrides)
    got = run_distributed(tp, _measure_model, tp, sequence_parallel, compiled,
                          **overrides)[-1]
    cfg = _config(tp, sequence_parallel, num_layers=2, **overrides)
    assert cfg.is_moe_layer(0) and not cfg.is_moe_layer(1)
    kernels = dataclasses.replace(CPU, jit_compiled=compiled)
    expected = (chunk_saved_bytes(cfg, B, kernels)
                + sum(embedding_terms(cfg, B, kernels).values())
                + sum(output_terms(cfg, B, kernels).values()))
    assert got == expected


def test_stage_estimates_count_the_layers_each_stage_holds():
    """PP 2, layers ``[MoE, MoE, dense, dense]``: the first stage's chunk counts MoE layers,
    the second's dense ones; full block recompute rebuilds the first layer of a chunk, which
    is the larger MoE one only on the first stage."""
    cfg = _config(1, False, num_layers=4, moe_layer_freq=[1, 1, 0, 0],
                  pipeline_model_parallel_size=2, moe_aux_loss_coeff=0.1,
                  moe_ffn_hidden_size=4 * H)  # top 2 of experts as wide as the dense MLP
    moe, dense = layer_bytes(cfg, B, CPU, moe=True), layer_bytes(cfg, B, CPU)
    assert moe > dense
    assert chunk_saved_bytes(cfg, B, CPU, cfg.chunk_layers(0)) == 2 * moe
    assert chunk_saved_bytes(cfg, B, CPU, cfg.chunk_layers(1)) == 2 * dense
    with pytest.raises(ValueError, match="layer indices"):
        chunk_saved_bytes(cfg, B, CPU, 2)
    full = dataclasses.replace(cfg, recompute_granularity="full", recompute_method="block",
                               recompute_num_layers=1)
    assert recompute_working_set(full, B, CPU, full.chunk_layers(0)) == moe
    assert recompute_working_set(full, B, CPU, full.chunk_layers(1)) == dense
    checkpoint_input = 2 * S * B * H  # the first layer's; the second MoE layer whole
    assert chunk_saved_bytes(full, B, CPU, full.chunk_layers(0)) == checkpoint_input + moe
    assert chunk_saved_bytes(full, B, CPU, full.chunk_layers(1)) == checkpoint_input + dense
    uniform = dataclasses.replace(full, recompute_method="uniform", recompute_num_layers=2)
    assert recompute_working_set(uniform, B, CPU, uniform.chunk_layers(0)) == 2 * moe
    mixed = dataclasses.replace(uniform, moe_layer_freq=[1, 0, 0, 1])
    assert recompute_working_set(mixed, B, CPU, mixed.chunk_layers(1)) == moe + dense


def test_cuda_estimate_of_an_moe_layer_term_for_term():
    """A Mixtral-like layer at TP 4 + SP, bf16, top-2 of 8 GeLU experts, aux and z losses:
    the routing terms in closed form for the rank's ``n = N / t`` tokens, the experts'
    interior the dense MLP's for the ``N k`` rows of the TP group. CUDA and the CPU differ
    only by the MLP interior's rules (compiled SwiGLU)."""
    s, b, h, f, t, experts, k = 4096, 1, 4096, 14336, 4, 8, 2
    cfg = TransformerConfig(num_layers=32, hidden_size=h, num_attention_heads=32,
                            num_query_groups=8, ffn_hidden_size=f, vocab_size=32000,
                            seq_length=s, precision="bf16", tensor_model_parallel_size=t,
                            sequence_parallel=True, num_moe_experts=experts, moe_router_topk=k,
                            moe_aux_loss_coeff=0.01, moe_z_loss_coeff=0.001)
    n = s * b // t
    terms = moe_terms(cfg, b, CUDA)
    assert terms == {
        "MLP input": 2 * n * h,
        "router top-k expert indices (int64)": 8 * n * k,
        "router probabilities (fp32)": 4 * n * k,
        "aux loss: softmax over all experts (fp32)": 4 * n * experts,
        "aux loss: expert fractions (fp32)": 4 * experts,
        "z-loss: router logits (fp32)": 4 * n * experts,
        "z-loss: logsumexp (fp32)": 4 * n,
        "dispatch: token of each routed copy (int64)": 8 * n * k,
        "dispatch: received rows in expert order (int64)": 8 * t * n * k,
        "expert input rows": 2 * t * n * k * h,
        "experts' GeLU input": 2 * n * k * f,
        "experts' fc2 input": 2 * n * k * f,
        "combine: expert outputs back in received order (int64)": 8 * t * n * k,
        "combine: outputs back in token order (int64)": 8 * n * k,
        "combine: expert output of each routed copy": 2 * n * k * h,
    }
    dense = layer_terms(cfg, b, CUDA)
    layer = layer_terms(cfg, b, CUDA, moe=True)
    # the attention side as in a dense layer (and its MLP input); the MLP's terms replaced
    assert dense["MLP input"] == layer["MLP input"]
    mlp = ("MLP input", "GeLU input", "fc2 input")
    assert {name: v for name, v in dense.items() if name not in mlp} == \
        {name: v for name, v in layer.items() if name not in terms}
    assert dense["GeLU input"] * k == layer["experts' GeLU input"]
    assert moe_terms(cfg, b, CUDA) == moe_terms(cfg, b, CPU)
    swiglu = dataclasses.replace(cfg, activation="swiglu")
    assert swiglu.bias_activation_fusion
    assert moe_terms(swiglu, b, CUDA)["experts' SwiGLU gate and up outputs"] == \
        2 * 2 * n * k * f  # N k rows, f / t wide
    assert moe_terms(swiglu, b, CPU)["experts' SiLU output"] == \
        2 * n * k * f  # the gate and up outputs beside it, as compiled
    with pytest.raises(ValueError, match="num_moe_experts"):
        layer_terms(dataclasses.replace(cfg, num_moe_experts=None), b, CUDA, moe=True)
