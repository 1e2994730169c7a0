"""Parameters and model-state bytes per rank: the estimate against the built model, its
data-parallel gradient buffer and its optimizer, exactly; and the parameter counts of
Narayanan et al. 2021, Table 1. Mixture-of-experts models too: each stage's dense and MoE
layers at several TP, EP and PP sizes, the experts' share, the routers' untrained expert
biases, and the distributed optimizer's state sharded over DP for the dense parameters and
over DP / EP for the experts'."""

import os

import pytest
import torch
from harness import run_distributed

from mp import parallel_state as ps
from mp.distributed import DistributedDataParallel, finalize_model_grads
from mp.estimate import Setup, model_params, rank_params, state_bytes
from mp.model import GPTModel, TransformerConfig
from mp.optim import get_megatron_optimizer

VARIANTS = {
    "gpt": {},
    "swiglu_rms_rope_untied_nobias": dict(activation="swiglu", normalization="RMSNorm",
                                          position_embedding_type="rope",
                                          untie_embeddings_and_output_weights=True,
                                          add_bias_linear=False),
    "grouped_query": dict(num_attention_heads=8, num_query_groups=4),
    "no_position_embedding": dict(position_embedding_type="none"),
    # heads 12 wide, not 64 / 8: QKV 64 -> 8 x 12 + 2 x 4 x 12, output projection 96 -> 64
    "kv_channels_grouped_query": dict(num_attention_heads=8, num_query_groups=4, kv_channels=12),
    # q and k norms over 12 channels: LayerNorm 4 vectors per layer, RMSNorm 2
    "qk_layernorm_kv_channels": dict(qk_layernorm=True, kv_channels=12),
    "qk_rmsnorm_squared_relu": dict(qk_layernorm=True, normalization="RMSNorm",
                                    activation="squared_relu"),
    # Qwen2's attention: a bias on the QKV projection only, sharded with its outputs
    "qkv_bias_grouped_query": dict(add_qkv_bias=True, add_bias_linear=False,
                                   num_attention_heads=8, num_query_groups=4),
    # gpt-oss's: a gated quick GeGLU (gate and up projections) and one sink logit per head
    "quick_geglu_learnable_sinks": dict(activation="quick_geglu", softmax_type="learnable"),
}


def _config(tp: int, pp: int = 1, vpp: int | None = None, **overrides) -> TransformerConfig:
    kw = dict(num_layers=4, hidden_size=64, num_attention_heads=4, vocab_size=1000,
              seq_length=32, make_vocab_size_divisible_by=96, tensor_model_parallel_size=tp,
              pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp)
    kw.update(overrides)  # the vocabulary is padded: 1056 rows at TP 1, 1152 at TP 2 and 4
    return TransformerConfig(**kw)


MOE_VARIANTS = {
    "gelu_every_other_layer": dict(num_moe_experts=4, moe_ffn_hidden_size=48, moe_layer_freq=2),
    "swiglu_nobias_shared_sigmoid_bias": dict(
        num_moe_experts=8, moe_ffn_hidden_size=32, moe_router_topk=2, activation="swiglu",
        add_bias_linear=False, moe_shared_expert_intermediate_size=64,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True),
    "gated_shared_expert_qkv_bias": dict(
        num_moe_experts=4, moe_ffn_hidden_size=32, moe_shared_expert_intermediate_size=32,
        moe_shared_expert_gate=True, add_qkv_bias=True, add_bias_linear=False),
    "router_bias": dict(num_moe_experts=4, moe_ffn_hidden_size=32, moe_router_bias=True),
}


def _stage_counts(tp: int, pp: int, vpp: int | None, overrides: dict
                  ) -> list[tuple[int, int, int, int]]:
    """(trained parameter elements, trained tensors, expert elements, untrained elements)
    one rank holds on each pipeline stage: the model chunks of that stage built on the meta
    device, as a pipelined job builds them (EP and ETP from ``overrides``)."""
    os.environ["MP_DEVICE"] = "meta"
    try:
        ps.initialize_model_parallel(
            tp, expert_model_parallel_size=overrides.get("expert_model_parallel_size", 1),
            expert_tensor_parallel_size=overrides.get("expert_tensor_parallel_size"))
        cfg = _config(tp, pp, vpp, **overrides)
        chunks = vpp or 1
        counts = []
        for stage in range(pp):
            params = []
            for chunk in range(chunks):
                model = GPTModel(cfg, pre_process=stage == 0 and chunk == 0,
                                 post_process=stage == pp - 1 and chunk == chunks - 1,
                                 layers=cfg.chunk_layers(stage, chunk))
                params += list(model.parameters())
            trained = [p for p in params if p.requires_grad]
            counts.append((sum(p.numel() for p in trained), len(trained),
                           sum(p.numel() for p in trained if not getattr(p, "allreduce", True)),
                           sum(p.numel() for p in params if not p.requires_grad)))
        return counts
    finally:
        os.environ["MP_DEVICE"] = "cpu"


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tp,pp,vpp", [(1, 1, None), (2, 1, None), (4, 1, None), (1, 2, None),
                                       (2, 4, None), (2, 2, 2)])
def test_rank_params_equal_the_built_model(tp, pp, vpp, variant):
    assert_rank_params_equal_the_built_model(tp, pp, vpp, VARIANTS[variant])


def assert_rank_params_equal_the_built_model(tp: int, pp: int, vpp: int | None,
                                             overrides: dict) -> None:
    """`rank_params` of each stage against the chunks built (`_stage_counts`)."""
    built = run_distributed(tp, _stage_counts, tp, pp, vpp, overrides)[0]
    cfg = _config(tp, pp, vpp, **overrides)
    for stage, (elements, tensors, _, _) in enumerate(built):
        estimate = rank_params(cfg, stage)
        assert (estimate.total, estimate.tensors) == (elements, tensors), f"stage {stage}"


@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
@pytest.mark.parametrize("tp,ep,pp,vpp", [(1, 1, 1, None), (1, 2, 1, None), (2, 2, 2, None),
                                          (1, 4, 2, 2)])
def test_rank_params_of_a_mixture_of_experts_model_equal_the_built_model(tp, ep, pp, vpp,
                                                                         variant):
    overrides = dict(MOE_VARIANTS[variant], expert_model_parallel_size=ep)
    built = run_distributed(tp * ep, _stage_counts, tp, pp, vpp, overrides)
    cfg = _config(tp, pp, vpp, **overrides)
    assert sum(rank_params(cfg, stage).experts for stage in range(pp)) > 0
    for rank, stages in enumerate(built):
        for stage, counts in enumerate(stages):
            estimate = rank_params(cfg, stage)
            assert (estimate.total, estimate.tensors, estimate.experts,
                    estimate.expert_bias) == counts, f"rank {rank}, stage {stage}"
    unsplit = _config(1, **MOE_VARIANTS[variant], make_vocab_size_divisible_by=96 * tp)
    assert model_params(cfg) == rank_params(unsplit).total  # every expert once


@pytest.mark.parametrize("tp,pp,vpp,split", [
    (2, 4, None, dict(num_layers_in_first_pipeline_stage=0, num_layers_in_last_pipeline_stage=2)),
    (1, 2, 2, dict(num_layers=6, account_for_embedding_in_pipeline_split=True,
                   account_for_loss_in_pipeline_split=True)),
], ids=["stages-0-1-1-2", "chunks-1-2-2-1"])
def test_rank_params_of_uneven_stages_equal_the_built_model(tp, pp, vpp, split):
    built = run_distributed(tp, _stage_counts, tp, pp, vpp, split)[0]
    cfg = _config(tp, pp, vpp, **split)
    assert [rank_params(cfg, stage).layers for stage in range(pp)] == \
        [cfg.stage_num_layers(stage) * rank_params(_config(tp)).layers // 4
         for stage in range(pp)]
    for stage, (elements, tensors, _, _) in enumerate(built):
        estimate = rank_params(cfg, stage)
        assert (estimate.total, estimate.tensors) == (elements, tensors), f"stage {stage}"


def test_model_params_is_the_gpt3_formula():
    """``12 l h^2 + 13 l h + (V + s) h + 2 h`` with the vocabulary padded for the TP size."""
    for tp in (1, 2, 8):
        cfg = _config(tp, num_layers=6, hidden_size=96, num_attention_heads=8)
        l, h, s, v = 6, 96, 32, cfg.padded_vocab_size
        assert model_params(cfg) == 12 * l * h * h + 13 * l * h + (v + s) * h + 2 * h


# Narayanan et al. 2021, Table 1: (heads, hidden, layers) and the size it prints, in billions;
# vocabulary 51,200, sequence 2048, learned positions, tied embeddings.
NARAYANAN_TABLE_1 = [(24, 2304, 24, "1.7"), (32, 3072, 30, "3.6"), (32, 4096, 36, "7.5"),
                     (48, 6144, 40, "18.4"), (64, 8192, 48, "39.1"), (80, 10240, 60, "76.1"),
                     (96, 12288, 80, "145.6"), (128, 16384, 96, "310.1"),
                     (128, 20480, 105, "529.6"), (160, 25600, 128, "1008.0")]


@pytest.mark.parametrize("heads,hidden,layers,printed", NARAYANAN_TABLE_1)
def test_narayanan_table_1_sizes(heads, hidden, layers, printed):
    cfg = TransformerConfig(num_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                            vocab_size=51200, seq_length=2048)
    decimals = len(printed.split(".")[1])
    assert f"{model_params(cfg) / 1e9:.{decimals}f}" == printed


def _stepped(tp: int, precision: str, overrides: dict, grad_dtype: torch.dtype,
             distributed_optimizer: bool, offload_fraction: float = 0.0):
    """The test GPT wrapped for data parallelism and its optimizer, after one step (the
    buffers checked to need no padding, which the estimate leaves out)."""
    ps.initialize_model_parallel(
        tp, expert_model_parallel_size=overrides.get("expert_model_parallel_size", 1),
        expert_tensor_parallel_size=overrides.get("expert_tensor_parallel_size"))
    torch.manual_seed(0)
    cfg = _config(tp, precision=precision, hidden_dropout=0.0, attention_dropout=0.0,
                  **overrides)
    model = DistributedDataParallel(GPTModel(cfg), grad_dtype=grad_dtype, bucket_size=None,
                                    use_distributed_optimizer=distributed_optimizer)
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert sum(buffer.grads.numel() for buffer in model.buffers) == trained
    opt = get_megatron_optimizer([model], lr=1e-3, initial_loss_scale=2.0**8,
                                 use_distributed_optimizer=distributed_optimizer,
                                 optimizer_cpu_offload=offload_fraction > 0,
                                 optimizer_offload_fraction=offload_fraction)
    ids = torch.randint(0, cfg.vocab_size, (2, cfg.seq_length),
                        generator=torch.Generator().manual_seed(1))
    model.zero_grad_buffer()
    model(ids, labels=ids).float().mean().backward()
    finalize_model_grads([model])
    assert opt.step().update_successful, "the step was skipped: no optimizer state to count"
    return model, opt


def _measured_state(tp: int, precision: str, overrides: dict,
                    grad_dtype: torch.dtype = torch.float32, distributed_optimizer: bool = False
                    ) -> tuple[float, float, float]:
    """Bytes of weights, gradient buffers and optimizer state this rank holds after a step
    (with the distributed optimizer, without its per-shard step counters, which the estimate
    leaves out)."""
    model, opt = _stepped(tp, precision, overrides, grad_dtype, distributed_optimizer)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    grads = sum(buffer.grads.numel() * buffer.grads.element_size() for buffer in model.buffers)
    own = {id(p) for p in model.parameters()}
    masters = sum(m.numel() * m.element_size() for m in opt.main_params if id(m) not in own)
    moments = sum(t.numel() * t.element_size() for state in opt.optimizer.state.values()
                  for name, t in state.items()
                  if not (distributed_optimizer and name == "step"))
    return weights, grads, masters + moments


def _measured_offload(precision: str, distributed_optimizer: bool, fraction: float) -> tuple:
    """After a step with ``fraction`` of the optimizer offloaded: this rank's optimizer bytes
    on the device (masters and moments of the shards kept there, every step counter), in
    host memory (the offloaded shards' fp32 masters, moments and gradient buffers), the
    fraction of its optimizer elements offloaded and its largest shard's."""
    _, opt = _stepped(1, precision, {}, torch.float32, distributed_optimizer, fraction)
    device = host = 0
    for shard in opt.shards:
        state = opt.optimizer.state[shard.main]
        moments = sum(t.numel() * t.element_size() for name, t in state.items() if name != "step")
        counters = 0 if distributed_optimizer else state["step"].numel() * 4
        master = 0 if shard.main_is_param and not shard.offloaded else shard.main.numel() * 4
        if shard.offloaded:
            grad = shard.host_grad.numel() * shard.host_grad.element_size()
            host, device = host + master + moments + grad, device + counters
        else:
            device += master + moments + counters
    elements = sum(shard.end - shard.start for shard in opt.shards)
    return (device, host, sum(s.end - s.start for s in opt.shards if s.offloaded) / elements,
            max(shard.end - shard.start for shard in opt.shards) / elements)


@pytest.mark.parametrize("precision,distributed_optimizer,fraction", [
    ("bf16", True, 0.4), ("fp32", False, 0.4), ("bf16", False, 1.0)])
def test_offloaded_optimizer_state_is_counted_in_host_memory(precision, distributed_optimizer,
                                                             fraction):
    """At DP 2: the fraction offloaded is at least the one asked for and under one shard more
    (whole shards, Megatron's rule); at that fraction the estimate's device and host bytes are
    the built optimizer's."""
    measured = run_distributed(2, _measured_offload, precision, distributed_optimizer, fraction)
    cfg = _config(1, precision=precision)
    for rank, (device, host, offloaded, largest) in enumerate(measured):
        assert fraction <= offloaded < fraction + largest, f"rank {rank}"
        expected = state_bytes(Setup(cfg, data_parallel_size=2,
                                     distributed_optimizer=distributed_optimizer,
                                     optimizer_offload_fraction=offloaded), rank_params(cfg))
        assert (device, host) == pytest.approx((expected.optimizer, expected.host),
                                               rel=1e-12), f"rank {rank}"


def test_offload_fraction_comes_from_the_job_flags_and_is_checked():
    from mp.config import parse_args

    config = os.path.join(os.path.dirname(__file__), "..", "configs", "gpt-tiny.yaml")
    job = parse_args(["--config", config, "--tensor-model-parallel-size", "1"], world_size=1)
    assert Setup.from_job(job, 1).optimizer_offload_fraction == 0  # the fraction alone: off
    job = parse_args(["--config", config, "--tensor-model-parallel-size", "1",
                      "--optimizer-cpu-offload", "--optimizer-offload-fraction", "0.25"],
                     world_size=1)
    assert Setup.from_job(job, 1).optimizer_offload_fraction == 0.25
    cfg = _config(1)
    with pytest.raises(ValueError, match=r"optimizer_offload_fraction=1.5 must be in \[0, 1\]"):
        Setup(cfg, optimizer_offload_fraction=1.5)
    with pytest.raises(ValueError, match="needs an optimizer other than Muon and no FSDP; got "
                                         "optimizer='muon', fully_sharded=False"):
        Setup(cfg, optimizer="muon", optimizer_offload_fraction=0.5)


@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("tp,variant", [(2, "gpt"), (1, "gpt"),
                                        (2, "swiglu_rms_rope_untied_nobias")])
def test_state_bytes_equal_model_ddp_and_optimizer(tp, variant, precision):
    """Weights, the fp32 gradient buffer, fp32 masters, Adam moments and step counters."""
    measured = run_distributed(2, _measured_state, tp, precision, VARIANTS[variant])
    cfg = _config(tp, precision=precision, **VARIANTS[variant])
    expected = state_bytes(Setup(cfg, data_parallel_size=2 // tp), rank_params(cfg))
    for rank, got in enumerate(measured):
        assert got == (expected.weights, expected.grads, expected.optimizer), f"rank {rank}"


@pytest.mark.parametrize("distributed_optimizer", [False, True])
@pytest.mark.parametrize("variant", list(MOE_VARIANTS))
def test_state_bytes_of_a_mixture_of_experts_model(variant, distributed_optimizer):
    """TP 1 x DP 4 with EP 2 in bf16: the experts' gradients in a buffer of their own, the
    expert biases in fp32, and the distributed optimizer's masters and moments sharded over 4
    ranks for the dense parameters and over 2 for the experts'."""
    overrides = dict(MOE_VARIANTS[variant], expert_model_parallel_size=2, vocab_size=1056,
                     num_layers=2)  # no bucket needs padding to a multiple of 4 or 2
    measured = run_distributed(4, _measured_state, 1, "bf16", overrides, torch.float32,
                               distributed_optimizer)
    cfg = _config(1, precision="bf16", **overrides)
    params = rank_params(cfg)
    expected = state_bytes(Setup(cfg, data_parallel_size=4,
                                 distributed_optimizer=distributed_optimizer), params)
    if distributed_optimizer:
        assert expected.optimizer == 12 * ((params.total - params.experts) / 4
                                           + params.experts / 2)
    for rank, got in enumerate(measured):
        assert got == (expected.weights, expected.grads, expected.optimizer), f"rank {rank}"


def test_bf16_gradient_buffers_halve_the_gradient_bytes():
    """``grad_reduce_in_bf16``: 2 bytes per parameter for the gradients, the rest unchanged."""
    measured = run_distributed(2, _measured_state, 2, "bf16", {}, torch.bfloat16)
    cfg = _config(2, precision="bf16")
    expected = state_bytes(Setup(cfg, grad_reduce_in_bf16=True), rank_params(cfg))
    assert expected.grads == 2 * rank_params(cfg).total
    for rank, got in enumerate(measured):
        assert got == (expected.weights, expected.grads, expected.optimizer), f"rank {rank}"


def test_distributed_optimizer_bytes_follow_megatron_table():
    """Megatron's distributed-optimizer table: ``6 + 12 / d`` bytes per parameter for bf16,
    ``8 + 8 / d`` for fp32 (tests/test_distrib_optimizer.py measures mp's against it)."""
    for precision, fixed, sharded in (("bf16", 6, 12), ("fp32", 8, 8)):
        cfg = _config(1, precision=precision)
        params = rank_params(cfg)
        got = state_bytes(Setup(cfg, data_parallel_size=8, distributed_optimizer=True), params)
        assert got.total == pytest.approx(params.total * (fixed + sharded / 8), rel=1e-12)
