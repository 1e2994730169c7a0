"""Multi-token prediction (`mp.model.mtp`) in the estimator, against the code as the other
estimate tests check the rest: parameters per rank on every pipeline stage (meta-built chunks;
the last stage's depths and its copy of the word embedding, tied and untied) and model-state
bytes (DDP and the optimizer after a step, with and without the distributed optimizer, the
copy included), FLOPs (torch's FLOP counter on a forward and backward), the bytes the whole
model saves for backward (`SavedTensorMeter`, to the byte with the `CPU` storage rules) and
the bytes of every collective in a `train_step` (`CollectiveMeter`)."""

import dataclasses

import pytest
import torch
from checks import counted_flops
from harness import run_distributed
from test_estimate_activations import B, model_saved_bytes
from test_estimate_activations import _config as _activations_config
from test_estimate_comm import WORLD, _pipelined_iteration
from test_estimate_params import _config as _params_config
from test_estimate_params import _stage_counts

from mp import parallel_state as ps
from mp.distributed import DistributedDataParallel, finalize_model_grads
from mp.estimate import (
    CPU,
    Setup,
    model_params,
    rank_params,
    state_bytes,
    training_flops,
)
from mp.estimate.memory import chunk_saved_bytes, stage_memory
from mp.estimate.mtp import mtp_saved_bytes
from mp.estimate.stage_ends import embedding_terms, output_terms
from mp.model import TransformerConfig
from mp.model.stages import build_gpt_chunks
from mp.optim import get_megatron_optimizer
from mp.training.flops import num_floating_point_operations

MTP = dict(mtp_num_layers=2, position_embedding_type="rope")
MOE = dict(num_moe_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2)


# ---------------------------------------------------------------- parameters and model state

PARAM_VARIANTS = {  # name -> overrides of the parameter tests' 4-layer model
    "tied": MTP,
    "untied_rmsnorm_swiglu_nobias": dict(MTP, untie_embeddings_and_output_weights=True,
                                         normalization="RMSNorm", activation="swiglu",
                                         add_bias_linear=False, mtp_num_layers=1),
    # the last layer dense (layer 3 of every other one from 0): the depths' layers dense too
    "moe_every_other_layer_last_dense": dict(MTP, **MOE, moe_layer_freq=2),
    # the last layer with experts, a shared one, and an expert bias
    "moe_last_layer_shared_bias": dict(MTP, **MOE, moe_layer_freq=[0, 0, 0, 1],
                                       moe_shared_expert_intermediate_size=32,
                                       moe_router_score_function="sigmoid",
                                       moe_router_enable_expert_bias=True),
    "mla_untied": dict(MTP, multi_latent_attention=True, kv_lora_rank=24, qk_head_dim=16,
                       qk_pos_emb_head_dim=8, v_head_dim=12, q_lora_rank=20,
                       untie_embeddings_and_output_weights=True),
}


LAYOUTS = [(1, 1, None), (2, 1, None), (2, 2, None), (1, 2, 2)]  # (tp, pp, vpp)


def _layout_counts(overrides: dict) -> list:
    """`_stage_counts` for each of `LAYOUTS` (on two ranks), and the unsplit model's with
    TP 2's vocabulary padding."""
    counts = []
    for tp, pp, vpp in LAYOUTS + [(1, 1, None)]:
        if len(counts) == len(LAYOUTS):
            overrides = dict(overrides, make_vocab_size_divisible_by=96 * 2)
        counts.append(_stage_counts(tp, pp, vpp, overrides))
        ps.destroy_model_parallel()
    return counts


@pytest.mark.parametrize("variant", list(PARAM_VARIANTS))
def test_rank_params_equal_the_built_model(variant):
    """Every stage's trained elements and tensors, the experts' share and the expert biases
    at TP 1 and 2, PP 1 and 2, PP 2 x v 2; the whole model's count the unsplit model's (the
    copy is not a second weight)."""
    overrides = PARAM_VARIANTS[variant]
    *built, unsplit = run_distributed(2, _layout_counts, overrides)[0]
    for (tp, pp, vpp), stages in zip(LAYOUTS, built):
        cfg = _params_config(tp, pp, vpp, **overrides)
        assert rank_params(cfg, pp - 1).mtp > 0
        for stage, counts in enumerate(stages):
            estimate = rank_params(cfg, stage)
            assert (estimate.total, estimate.tensors, estimate.experts,
                    estimate.expert_bias) == counts, f"TP {tp} PP {pp} v {vpp}, stage {stage}"
    cfg = _params_config(2, 2, **overrides)
    assert model_params(cfg) == unsplit[0][0]


def _measured_stage_state(tp: int, pp: int, overrides: dict, distributed_optimizer: bool
                          ) -> tuple[int, tuple[float, float, float]]:
    """(this rank's stage, the bytes of its weights, gradient buffers and optimizer state
    after a step) for the chunks `build_gpt_chunks` gives a TP x PP x DP layout of 4 ranks,
    bf16 (the distributed optimizer's per-shard step counters left out, as the estimate does;
    its buckets are checked to need no padding)."""
    ps.initialize_model_parallel(tp, pp)
    torch.manual_seed(0)
    cfg = _params_config(tp, pp, precision="bf16", **overrides)
    models = [DistributedDataParallel(chunk, bucket_size=None,
                                      use_distributed_optimizer=distributed_optimizer)
              for chunk in build_gpt_chunks(cfg)]
    for model in models:
        assert sum(b.grads.numel() for b in model.buffers) == sum(
            p.numel() for p in model.parameters() if p.requires_grad)
        model.zero_grad_buffer()
    opt = get_megatron_optimizer(models, lr=1e-3,
                                 use_distributed_optimizer=distributed_optimizer)
    finalize_model_grads(models)
    assert opt.step().update_successful
    params = [p for model in models for p in model.parameters()]
    own = {id(p) for p in params}
    masters = sum(m.numel() * m.element_size() for m in opt.main_params if id(m) not in own)
    moments = sum(t.numel() * t.element_size() for state in opt.optimizer.state.values()
                  for name, t in state.items()
                  if not (distributed_optimizer and name == "step"))
    return ps.get_pipeline_model_parallel_rank(), (
        sum(p.numel() * p.element_size() for p in params),
        sum(b.grads.numel() * b.grads.element_size() for m in models for b in m.buffers),
        masters + moments)


STATE_CASES = {  # name -> (tp, pp, overrides)
    "pp2_tied": (1, 2, dict(MTP)),
    "pp2_untied_moe_last_layer": (1, 2, dict(PARAM_VARIANTS["moe_last_layer_shared_bias"],
                                             untie_embeddings_and_output_weights=True)),
    "tp2_sp_untied": (2, 1, dict(MTP, sequence_parallel=True,
                                 untie_embeddings_and_output_weights=True)),
}


@pytest.mark.parametrize("distributed_optimizer", [False, True])
@pytest.mark.parametrize("case", list(STATE_CASES))
def test_state_bytes_equal_model_ddp_and_optimizer(case, distributed_optimizer):
    """Weights, gradient buffers, masters, moments and step counters of each stage: the last
    stage's embedding copy is trained like any weight (with the distributed optimizer its
    state sharded over DP too, although its gradient bucket is all-reduced)."""
    tp, pp, overrides = STATE_CASES[case]
    cfg = _params_config(tp, pp, precision="bf16", **overrides)
    setup = Setup(cfg, data_parallel_size=4 // (tp * pp),
                  distributed_optimizer=distributed_optimizer)
    for rank, (stage, got) in enumerate(run_distributed(
            4, _measured_stage_state, tp, pp, overrides, distributed_optimizer)):
        expected = state_bytes(setup, rank_params(cfg, stage))
        assert got == (expected.weights, expected.grads, expected.optimizer), f"rank {rank}"


# ------------------------------------------------------------------------------------ FLOPs

FLOPS_CASES = {
    "two_depths": MTP,
    # the decoder's layers run twice, the depths' once
    "full_recompute_swiglu": dict(MTP, recompute_granularity="full", recompute_method="uniform",
                                  activation="swiglu"),
    # the last layer's experts in the depth's layer too; its attention scores recomputed
    "moe_last_layer_selective": dict(MTP, **MOE, moe_layer_freq=[0, 1], mtp_num_layers=1,
                                     recompute_granularity="selective"),
    "mla": dict(PARAM_VARIANTS["mla_untied"]),
}


@pytest.mark.parametrize("case", list(FLOPS_CASES))
def test_flops_equal_what_torch_counts(case):
    counted, formula = run_distributed(1, counted_flops, FLOPS_CASES[case])[0]
    assert counted == formula


def test_flops_of_the_stages_add_up_and_reach_the_training_loop():
    """The last stage's part holds the depths (`training_flops(..., mtp=)`), and the count the
    training loop logs MFU with is the estimator's."""
    cfg = _params_config(1, 2, **MTP)
    stages = [training_flops(cfg, 8, layers=cfg.stage_layers(r), logits=r == 1)
              for r in range(2)]
    assert sum(stages) == training_flops(cfg, 8)
    plain = _params_config(1, 2, position_embedding_type="rope")
    extra = training_flops(cfg, 8) - training_flops(plain, 8)
    assert extra == training_flops(cfg, 8, layers=[], logits=False, mtp=True) > 0
    assert num_floating_point_operations(cfg, 8) == training_flops(cfg, 8)


# ------------------------------------------------------------------------ activation bytes

SAVED_CASES = {  # name -> (tp, sequence parallel, overrides of the activation tests' config)
    "tp1": (1, False, MTP),
    "tp1_moe_last_layer_aux_loss": (1, False, dict(MTP, **MOE, moe_layer_freq=[0, 1],
                                                   moe_aux_loss_coeff=0.1)),
    # learned positions (allowed without pipelining): the lookups add the table
    "tp2_learned_positions": (2, False, dict(MTP, position_embedding_type="learned_absolute")),
    "tp2_sp_zero_centered": (2, True, dict(MTP, layernorm_zero_centered_gamma=True)),
    # torch's composite RMSNorm: hnorm makes its own fp32 copy of its input
    "tp2_sp_llama": (2, True, dict(MTP, normalization="RMSNorm", activation="swiglu",
                                   add_bias_linear=False)),
    # the decoder's layers checkpointed, the depths' saved whole
    "tp2_sp_full_recompute": (2, True, dict(MTP, recompute_granularity="full",
                                            recompute_method="uniform")),
    "tp2_selective_mla": (2, False, dict(PARAM_VARIANTS["mla_untied"],
                                         recompute_granularity="selective")),
    # the second layer slides, and so do the depths (as the last layer): flash keeps its mask
    "tp2_sp_window_last_layer": (2, True, dict(MTP, window_size=[8, 0], attention_dropout=0.0,
                                               window_attn_skip_freq=[0, 1])),
    # an fp32 residual stream, the depths' layers' too: enorm, hnorm, fp32 weight copies
    "tp1_fp32_residual_zero_centered": (1, False, dict(MTP, fp32_residual_connection=True,
                                                       layernorm_zero_centered_gamma=True)),
    "tp2_sp_fp32_residual_llama": (2, True, dict(MTP, fp32_residual_connection=True,
                                                 normalization="RMSNorm", activation="swiglu",
                                                 add_bias_linear=False)),
}


def _measure_models(tp: int) -> dict:
    ps.initialize_model_parallel(tp)
    return {name: model_saved_bytes(_saved_config(name), False)
            for name, (size, _, _) in SAVED_CASES.items() if size == tp}


def _saved_config(name: str) -> TransformerConfig:
    tp, sp, overrides = SAVED_CASES[name]
    return _activations_config(tp, sp, num_layers=2, **overrides)


@pytest.mark.parametrize("tp", [1, 2])
def test_saved_bytes_of_the_whole_model(tp):
    """Embedding, two layers, final norm, output layer and loss, and the depths' saves
    (`mtp_depth_terms`) on the last rank, to the byte."""
    failures = []
    for name, got in run_distributed(tp, _measure_models, tp)[-1].items():
        cfg = _saved_config(name)
        assert mtp_saved_bytes(cfg, B, CPU) > 0
        expected = (chunk_saved_bytes(cfg, B, CPU) + sum(embedding_terms(cfg, B, CPU).values())
                    + sum(output_terms(cfg, B, CPU).values()) + mtp_saved_bytes(cfg, B, CPU))
        if got != expected:
            failures.append(f"{name}: measured {got} B, estimated {expected:.0f} B "
                            f"({got - expected:+.0f} B)")
    assert not failures, "\n".join(failures)



@pytest.mark.parametrize("recompute", [None, "selective", "full"])
def test_the_last_stage_holds_the_depths_once(recompute):
    """`stage_memory`: the last stage saves the depths' bytes for the one micro-batch whose
    backward comes next (beside its output's), at any recompute; the first stage is as
    without them."""
    cfg = _params_config(2, 2, **MTP, precision="bf16", sequence_parallel=True,
                         recompute_granularity=recompute,
                         recompute_method="uniform" if recompute == "full" else None)
    plain = dataclasses.replace(cfg, mtp_num_layers=None)
    with_depths, without = (Setup(c, micro_batch_size=2, num_microbatches=4) for c in (cfg, plain))
    assert stage_memory(with_depths, 0, CPU) == stage_memory(without, 0, CPU)
    last, base = stage_memory(with_depths, 1, CPU), stage_memory(without, 1, CPU)
    assert last.activations - base.activations == mtp_saved_bytes(cfg, 2, CPU) > 0


# ------------------------------------------------------------------- bytes per collective

ITERATIONS = {  # name -> (tp, pp, overrides, distributed optimizer), 4 ranks, one train_step
    "tp2_dp2": (2, 1, MTP, False),
    "tp2_sp_dp2_llama": (2, 1, dict(MTP, sequence_parallel=True, normalization="RMSNorm",
                                    activation="swiglu", add_bias_linear=False), False),
    # the lookups' all-reduce before the split; the decoder's layers recomputed, not the depths'
    "tp2_sp_dp2_learned_positions_full_recompute": (2, 1, dict(
        MTP, sequence_parallel=True, position_embedding_type="learned_absolute",
        recompute_granularity="full", recompute_method="uniform"), False),
    # the copy's gradient summed over the embedding group; under the distributed optimizer
    # the pair's own buckets all-reduced over DP, the rest reduce-scattered
    "pp2_dp2_tied_distributed_optimizer": (1, 2, MTP, True),
    "tp2_sp_pp2_untied": (2, 2, dict(MTP, sequence_parallel=True,
                                     untie_embeddings_and_output_weights=True), False),
    # the depths' layers with experts; their losses logged with the routers'
    "pp2_dp2_moe_last_layer_untied_distributed_optimizer": (1, 2, dict(
        MTP, **MOE, moe_layer_freq=[0, 0, 0, 1], moe_aux_loss_coeff=1e-2,
        moe_z_loss_coeff=1e-3, untie_embeddings_and_output_weights=True), True),
}


@pytest.mark.parametrize("case", list(ITERATIONS))
def test_collective_bytes_of_one_iteration(case):
    """Every rank's bytes per kind and group through `train_step` (1F1B), logging included:
    the depths' embedding lookups, layers, output layers and cross-entropy over TP, their
    partial gradients under SP, the word embedding's pair over the embedding group, and the
    tracked losses' all-reduces over PP and DP."""
    tp, pp, overrides, distributed_optimizer = ITERATIONS[case]
    results = run_distributed(WORLD, _pipelined_iteration, None, overrides, False, tp, 1, pp,
                              distributed_optimizer)
    for rank, (measured, expected, _) in enumerate(results):
        assert measured == expected, f"rank {rank}"
