"""Communication: the bytes of every ``torch.distributed`` call in one training iteration
(micro-batches forward and backward, gradient reduction, optimizer step), counted per kind and
group by wrapping the collectives, equal the estimate exactly. TP 2 x DP 2 and TP 1 x DP 4 on
4 ranks; and TP 1 x PP 2 x DP 2 through `mp.training.training.train_step` (1F1B, and
interleaved with 2 model chunks per stage), stage by stage: the pipeline's sends and receives,
the tied word-embedding gradients, each stage's data-parallel gradients (also with every layer
on the last stage). Context parallelism through ``train_step`` too: CP 2 with DP 2, with TP 2
and sequence parallelism, with PP 2, with selective recompute and the distributed optimizer
(keys and values gathered and their gradients reduce-scattered over CP, or with ``a2a`` q, k,
v and the attention output exchanged over CP; the loss's sum and count all-reduced over CP,
gradients reduced over DP x CP). Mixture-of-experts layers through ``train_step`` at EP 2
and 4, with TP (SP on and off), CP, PP and the distributed optimizer: the tokens' and
outputs' all-to-alls over EP, the experts' gradients over DP x CP / EP, the routers' partial
gradients over TP and statistics over CP, the expert bias's token counts, the router losses'
logging. A rank's all-to-all bytes depend on where its tokens' experts live, so those are
compared summed over the world, per group (the estimate is the mean, exact in sum); every
other call per rank. Gradients reduced in
bf16 (``training.grad_reduce_in_bf16``) move half the bytes: TP2 x DP2 with sequence
parallelism, with and without the distributed optimizer, and the pipelined tied embedding. The
loss that
``train_step`` broadcasts from the last stage (``broadcast_object_list``) is logging: the meter
lists it apart, once per iteration over the pipeline group, and it is not in the estimate; the
loss's all-reduce over DP on the last stage is the estimate's ``logging`` row."""

import pytest
import torch
import torch.distributed as dist
from harness import run_distributed

from mp import parallel_state as ps
from mp.distributed import DistributedDataParallel, finalize_model_grads
from mp.estimate import CollectiveMeter, Setup, collectives
from mp.model import GPTModel, TransformerConfig
from mp.model.stages import build_gpt_chunks
from mp.optim import OptimizerParamScheduler, get_megatron_optimizer
from mp.tensor_parallel import model_parallel_cuda_manual_seed
from mp.training.gpt_step import forward_step as gpt_forward_step
from mp.training.training import train_step

WORLD, MICROBATCHES, MBS = 4, 2, 2

VARIANTS = {
    "plain": {},
    "sequence_parallel": dict(sequence_parallel=True),
    "sp_swiglu_rope_rms_untied": dict(sequence_parallel=True, activation="swiglu",
                                      position_embedding_type="rope", normalization="RMSNorm",
                                      untie_embeddings_and_output_weights=True),
    "sp_no_position_embedding": dict(sequence_parallel=True, position_embedding_type="none"),
    "full_recompute": dict(recompute_granularity="full", recompute_method="uniform"),
    "sp_block_recompute_distributed": dict(sequence_parallel=True, recompute_granularity="full",
                                           recompute_method="block", recompute_num_layers=1,
                                           distribute_saved_activations=True),
    "selective_bf16": dict(recompute_granularity="selective", precision="bf16"),
    # the MLP's calls again in backward (fc2's all-reduce; under SP fc1's and the gate's
    # gathers and fc2's reduce-scatter); the norms call nothing
    "mlp_recompute": dict(recompute_granularity="selective", recompute_modules=["mlp"]),
    "sp_swiglu_mlp_layernorm_core_attn_recompute": dict(
        sequence_parallel=True, activation="swiglu", recompute_granularity="selective",
        recompute_modules=["mlp", "layernorm", "core_attn"]),
    # a sliding window moves no byte: the first layer slides, the second attends fully
    "sp_window_every_other_layer": dict(sequence_parallel=True, window_size=[3, 0],
                                        window_attn_skip_freq=2),
    # an fp32 residual stream: the SP calls move bf16 (the norms' outputs, the embedding cast
    # after its split), the distributed checkpoints' inputs fp32
    "sp_fp32_residual_block_recompute_distributed": dict(
        sequence_parallel=True, precision="bf16", fp32_residual_connection=True,
        recompute_granularity="full", recompute_method="block", recompute_num_layers=1,
        distribute_saved_activations=True),
}


def _config(tp: int, **overrides) -> TransformerConfig:
    kw = dict(num_layers=2, hidden_size=32, num_attention_heads=4, vocab_size=200,
              seq_length=16, make_vocab_size_divisible_by=16, tensor_model_parallel_size=tp)
    kw.update(overrides)
    return TransformerConfig(**kw)


def _group_ranks() -> dict[str, tuple[int, ...]]:
    ranks = {"tp": tuple(ps.get_tensor_model_parallel_ranks()),
             "cp": tuple(ps.get_context_parallel_global_ranks()),
             "dp": tuple(ps.get_data_parallel_ranks()),
             "dp_cp": tuple(dist.get_process_group_ranks(
                 ps.get_data_parallel_group(with_context_parallel=True))),
             "pp": tuple(dist.get_process_group_ranks(ps.get_pipeline_model_parallel_group())),
             "mp": tuple(dist.get_process_group_ranks(ps.get_model_parallel_group())),
             "world": tuple(range(dist.get_world_size()))}
    if ps.get_expert_model_parallel_group() is not None:
        ranks["ep"] = tuple(dist.get_process_group_ranks(ps.get_expert_model_parallel_group()))
        ranks["edp"] = tuple(dist.get_process_group_ranks(ps.get_expert_data_parallel_group()))
        norm = ps.get_expert_grad_norm_group()
        ranks["expert_norm"] = (dist.get_rank(),) if norm is None \
            else tuple(dist.get_process_group_ranks(norm))
    if ps.is_rank_in_embedding_group():
        ranks["embedding"] = tuple(dist.get_process_group_ranks(ps.get_embedding_group()))
    return ranks


def _expected(setup: Setup, pp_rank: int = 0, logging: bool = False) -> dict:
    ranks = _group_ranks()
    expected: dict = {}
    for c in collectives(setup, pp_rank, logging):
        key = (c.kind, ranks[c.group])
        expected[key] = expected.get(key, 0) + c.bytes
    return expected


def _one_iteration(tp: int, overrides: dict, distributed_optimizer: bool = False,
                   bf16_grads: bool = False) -> tuple[dict, dict]:
    """Measured and estimated bytes per (kind, group ranks) for one iteration on this rank.
    With the distributed optimizer, one bucket (padding to a multiple of DP is not
    modelled; the test checks there is none); ``bf16_grads``: bf16 gradient buffers."""
    ps.initialize_model_parallel(tp)
    model_parallel_cuda_manual_seed(1)
    torch.manual_seed(0)
    cfg = _config(tp, **overrides)
    model = DistributedDataParallel(  # several buckets, or one for the distributed optimizer
        GPTModel(cfg), bucket_size=None if distributed_optimizer else 2000,
        use_distributed_optimizer=distributed_optimizer, overlap_param_gather=True,
        grad_dtype=torch.bfloat16 if bf16_grads else torch.float32)
    if distributed_optimizer:
        assert model.grad_buffer.numel() == sum(p.numel() for p in model.parameters())
    opt = get_megatron_optimizer([model], lr=1e-3,
                                 use_distributed_optimizer=distributed_optimizer)
    gen = torch.Generator().manual_seed(ps.get_data_parallel_rank())
    batches = [torch.randint(0, cfg.vocab_size, (MBS, cfg.seq_length), generator=gen)
               for _ in range(MICROBATCHES)]
    with CollectiveMeter() as meter:
        model.zero_grad_buffer()
        for i, ids in enumerate(batches):
            with model.no_sync() if i < MICROBATCHES - 1 else torch.enable_grad():
                (model(ids, labels=ids).float().mean() / MICROBATCHES).backward()
        finalize_model_grads([model])
        opt.step()
        model.finish_param_sync()
    setup = Setup(cfg, data_parallel_size=WORLD // tp, micro_batch_size=MBS,
                  num_microbatches=MICROBATCHES, distributed_optimizer=distributed_optimizer,
                  grad_reduce_in_bf16=bf16_grads)
    return meter.totals(), _expected(setup)


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("tp", [2, 1])
def test_collective_bytes_of_one_iteration(tp, variant):
    if tp == 1 and variant != "plain":
        pytest.skip("TP 1 has no tensor-parallel variants")
    for rank, (measured, expected) in enumerate(run_distributed(WORLD, _one_iteration, tp,
                                                                VARIANTS[variant])):
        assert measured == expected, f"rank {rank}"


@pytest.mark.parametrize("variant", ["plain", "selective_bf16"])
def test_collective_bytes_with_the_distributed_optimizer(variant):
    """Gradients reduce-scattered and parameters all-gathered over DP, at TP2 x DP2."""
    for rank, (measured, expected) in enumerate(run_distributed(
            WORLD, _one_iteration, 2, VARIANTS[variant], True)):
        assert any(kind == "reduce_scatter" for kind, _ in measured)
        assert measured == expected, f"rank {rank}"


@pytest.mark.parametrize("distributed_optimizer", [False, True])
def test_collective_bytes_with_bf16_gradient_reduction(distributed_optimizer):
    """The gradients (data parallel, and the sequence-parallel ones over TP) in bf16."""
    sp_bf16 = dict(sequence_parallel=True, precision="bf16")
    for rank, (measured, expected) in enumerate(run_distributed(
            WORLD, _one_iteration, 2, sp_bf16, distributed_optimizer, True)):
        assert measured == expected, f"rank {rank}"


PP, PP_MICROBATCHES = 2, 4


def _pipelined_iteration(vpp, overrides: dict, bf16_grads: bool, tp: int = 1, cp: int = 1,
                         pp: int = PP, distributed_optimizer: bool = False
                         ) -> tuple[dict, dict, list]:
    """Measured and estimated bytes per (kind, group ranks) for one `train_step` on this rank
    of a TP x CP x PP x DP layout (default TP 1 x PP 2 x DP 2; EP from ``overrides``), and the
    logging calls the meter set apart."""
    ps.initialize_model_parallel(
        tp, pp, vpp, context_parallel_size=cp,
        expert_model_parallel_size=overrides.get("expert_model_parallel_size", 1),
        expert_tensor_parallel_size=overrides.get("expert_tensor_parallel_size"))
    model_parallel_cuda_manual_seed(1)
    torch.manual_seed(0)
    cfg = _config(tp, num_layers=4, pipeline_model_parallel_size=pp,
                  virtual_pipeline_model_parallel_size=vpp, context_parallel_size=cp,
                  **overrides)
    models = [DistributedDataParallel(chunk, bucket_size=None if distributed_optimizer else 2000,
                                      use_distributed_optimizer=distributed_optimizer,
                                      grad_dtype=torch.bfloat16 if bf16_grads else torch.float32)
              for chunk in build_gpt_chunks(cfg)]  # its embedding all-reduce: build time
    if distributed_optimizer:  # one bucket, not padded (the estimate leaves padding out)
        assert all(sum(b.grads.numel() for b in m.buffers) == sum(
            p.numel() for p in m.parameters() if p.requires_grad) for m in models)
    opt = get_megatron_optimizer(models, lr=1e-3,
                                 use_distributed_optimizer=distributed_optimizer)
    scheduler = OptimizerParamScheduler(opt, max_lr=1e-3, lr_decay_steps=10)
    gen = torch.Generator().manual_seed(ps.get_data_parallel_rank())
    micro = []
    for _ in range(PP_MICROBATCHES):
        ids = torch.randint(0, cfg.vocab_size, (MBS, cfg.seq_length + 1), generator=gen)
        micro.append({"tokens": ids[:, :-1], "labels": ids[:, 1:],
                      "loss_mask": torch.ones(MBS, cfg.seq_length),
                      "position_ids": torch.arange(cfg.seq_length).expand(MBS, -1)})
    with CollectiveMeter() as meter:
        train_step(gpt_forward_step, [iter(micro) for _ in models], models, opt, scheduler,
                   num_microbatches=PP_MICROBATCHES, seq_length=cfg.seq_length,
                   micro_batch_size=MBS)
    setup = Setup(cfg, data_parallel_size=WORLD // (tp * cp * pp), micro_batch_size=MBS,
                  num_microbatches=PP_MICROBATCHES, grad_reduce_in_bf16=bf16_grads,
                  distributed_optimizer=distributed_optimizer)
    return meter.totals(), _expected(setup, ps.get_pipeline_model_parallel_rank(), logging=True), \
        meter.logging


PIPELINED = {"plain": ({}, False),
             "untied_bf16": (dict(untie_embeddings_and_output_weights=True, precision="bf16"),
                             False),
             "tied_bf16_grads": (dict(precision="bf16"), True),
             # the stages send the fp32 residual stream
             "fp32_residual_bf16": (dict(precision="bf16", fp32_residual_connection=True),
                                    False)}


@pytest.mark.parametrize("variant", list(PIPELINED))
@pytest.mark.parametrize("vpp", [None, 2], ids=["1f1b", "interleaved"])
def test_collective_bytes_of_one_pipelined_iteration(vpp, variant):
    results = run_distributed(WORLD, _pipelined_iteration, vpp, *PIPELINED[variant])
    for rank, (measured, expected, logging) in enumerate(results):
        assert measured == expected, f"rank {rank}"
        pipeline = (rank % 2, rank % 2 + 2)  # TP fastest, then DP, then PP
        assert logging == [("broadcast_object_list", pipeline)], f"rank {rank}"


def test_collective_bytes_of_one_pipelined_iteration_with_every_layer_on_the_last_stage():
    """1F1B with stage 0 holding only the embedding (an uneven split)."""
    results = run_distributed(WORLD, _pipelined_iteration, None,
                              dict(num_layers_in_first_pipeline_stage=0), False)
    for rank, (measured, expected, _) in enumerate(results):
        assert measured == expected, f"rank {rank}"


CONTEXT_PARALLEL = {  # name -> (tp, cp, pp, overrides, distributed optimizer)
    "cp2_dp2": (1, 2, 1, {}, False),
    "tp2_cp2_sp_rope": (2, 2, 1, dict(sequence_parallel=True, position_embedding_type="rope"),
                        False),
    "cp2_pp2": (1, 2, 2, {}, False),
    "cp2_dp2_selective_distributed_optimizer": (
        1, 2, 1, dict(recompute_granularity="selective", num_query_groups=2), True),
    "cp2_dp2_full_recompute": (1, 2, 1, dict(recompute_granularity="full",
                                             recompute_method="uniform"), False),
    "a2a_cp2_dp2": (1, 2, 1, dict(cp_comm_type="a2a"), False),
    "a2a_tp2_cp2_sp_rope": (2, 2, 1, dict(cp_comm_type="a2a", sequence_parallel=True,
                                          position_embedding_type="rope"), False),
    "a2a_cp2_pp2_selective_grouped": (1, 2, 2, dict(cp_comm_type="a2a", num_query_groups=2,
                                                    recompute_granularity="selective"), False),
    "p2p_cp2_dp2": (1, 2, 1, dict(cp_comm_type="p2p", attention_dropout=0.0), False),
    "p2p_cp4_full_recompute_grouped": (1, 4, 1, dict(cp_comm_type="p2p", num_query_groups=2,
                                                     attention_dropout=0.0,
                                                     recompute_granularity="full",
                                                     recompute_method="uniform"), False),
    "p2p_tp2_cp2_sp_selective_distributed_optimizer": (
        2, 2, 1, dict(cp_comm_type="p2p", sequence_parallel=True, attention_dropout=0.0,
                      recompute_granularity="selective"), True),
    # the ring skips the blocks out of a 3-key window (chunks of 4) but passes every block on
    "p2p_cp2_dp2_window": (1, 2, 1, dict(cp_comm_type="p2p", attention_dropout=0.0,
                                         window_size=[3, 0]), False),
}


@pytest.mark.parametrize("variant", list(CONTEXT_PARALLEL))
def test_collective_bytes_with_context_parallelism(variant):
    tp, cp, pp, overrides, distributed_optimizer = CONTEXT_PARALLEL[variant]
    results = run_distributed(WORLD, _pipelined_iteration, None, overrides, False, tp, cp, pp,
                              distributed_optimizer)
    for rank, (measured, expected, _) in enumerate(results):
        cp_ranks = tuple(r for r in range(WORLD) if r % tp == rank % tp
                         and r // (tp * cp) == rank // (tp * cp))  # TP, then CP
        assert any(group == cp_ranks for _, group in measured), f"rank {rank}"
        assert measured == expected, f"rank {rank}"


MOE = dict(num_moe_experts=4, moe_ffn_hidden_size=16, moe_router_topk=2,
           moe_aux_loss_coeff=1e-2, moe_z_loss_coeff=1e-3)
MIXTURE_OF_EXPERTS = {  # name -> (tp, cp, pp, ep, overrides, distributed optimizer)
    "ep2_dp4": (1, 1, 1, 2, {}, False),
    "ep2_dp4_distributed_optimizer": (1, 1, 1, 2, {}, True),
    "tp2_ep2_sp_swiglu_shared": (2, 1, 1, 2, dict(
        sequence_parallel=True, activation="swiglu", moe_shared_expert_intermediate_size=32),
        False),
    "tp2_ep2_sp_gated_shared": (2, 1, 1, 2, dict(
        sequence_parallel=True, moe_shared_expert_intermediate_size=32,
        moe_shared_expert_gate=True), False),
    "tp2_ep2_qk_layernorm_no_aux_loss": (2, 1, 1, 2, dict(
        qk_layernorm=True, moe_aux_loss_coeff=0.0), False),
    "tp2_sp_ep1": (2, 1, 1, 1, dict(sequence_parallel=True), False),
    "tp2_ep2_sp_sigmoid_expert_bias_full_recompute": (2, 1, 1, 2, dict(
        sequence_parallel=True, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, recompute_granularity="full",
        recompute_method="uniform"), False),
    "tp2_cp2_sp_ep2_distributed_optimizer": (2, 2, 1, 2, dict(sequence_parallel=True), True),
    "tp2_cp2_sp_ep2_sequence_aux_loss": (2, 2, 1, 2, dict(
        sequence_parallel=True, moe_router_load_balancing_type="seq_aux_loss"), False),
    # the global loss's statistics over DP (x CP), the z-loss's over CP
    "tp2_sp_ep2_global_aux_loss": (2, 1, 1, 2, dict(
        sequence_parallel=True, moe_router_load_balancing_type="global_aux_loss"), False),
    "cp2_ep2_global_aux_loss": (1, 2, 1, 2, dict(
        moe_router_load_balancing_type="global_aux_loss"), False),
    "ep4_sigmoid_expert_bias_distributed_optimizer": (1, 1, 1, 4, dict(
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True), True),
    "ep2_pp2_every_other_layer": (1, 1, 2, 2, dict(moe_layer_freq=2), False),
    "cp2_ep2_full_recompute_fp64_router": (1, 2, 1, 2, dict(
        recompute_granularity="full", recompute_method="uniform", moe_router_dtype="fp64"),
        False),
    "cp2_ep4_block_recompute": (1, 2, 1, 4, dict(
        recompute_granularity="full", recompute_method="block", recompute_num_layers=1), False),
    # selective recompute: the MoE layers' dispatch, combine and shared expert again
    "tp2_ep2_sp_shared_moe_layernorm_recompute": (2, 1, 1, 2, dict(
        sequence_parallel=True, moe_shared_expert_intermediate_size=32,
        recompute_granularity="selective", recompute_modules=["moe", "layernorm"]), False),
    "tp2_ep2_moe_recompute": (2, 1, 1, 2, dict(
        recompute_granularity="selective", recompute_modules=["moe"]), False),
    "tp2_ep2_swiglu_shared_experts_moe_act_recompute": (2, 1, 1, 2, dict(
        activation="swiglu", moe_shared_expert_intermediate_size=32,
        recompute_granularity="selective", recompute_modules=["shared_experts", "moe_act"]),
        False),
    "ep2_pp2_moe_mlp_recompute": (1, 1, 2, 2, dict(
        moe_layer_freq=2, recompute_granularity="selective", recompute_modules=["moe", "mlp"]),
        False),
}


def _named_iteration(*args) -> tuple[dict, dict, dict]:
    """`_pipelined_iteration`'s measured and estimated bytes, and the names of the groups
    (``{ranks: "ep"}``) whose ranks this rank's keys hold."""
    measured, expected, _ = _pipelined_iteration(*args)
    names: dict = {}
    for name, ranks in _group_ranks().items():
        names[ranks] = "/".join(filter(None, (names.get(ranks), name)))
    return measured, expected, names


@pytest.mark.parametrize("variant", list(MIXTURE_OF_EXPERTS))
def test_collective_bytes_with_mixture_of_experts(variant):
    assert_moe_collective_bytes(*MIXTURE_OF_EXPERTS[variant])


def assert_moe_collective_bytes(tp: int, cp: int, pp: int, ep: int, overrides: dict,
                                distributed_optimizer: bool) -> None:
    """Every call of one `train_step` per rank, the all-to-alls summed over the world per
    group, equal the estimate; the dispatcher exchanges over EP and, when the experts are split
    over TP under SP, over TP."""
    overrides = dict(MOE, expert_model_parallel_size=ep, **overrides)
    results = run_distributed(WORLD, _named_iteration, None, overrides, False, tp, cp, pp,
                              distributed_optimizer)
    exchanged: dict = {}  # group name -> (measured, estimated) all-to-all bytes, all ranks
    for rank, (measured, expected, names) in enumerate(results):
        for ranks in {group for kind, group in expected if kind == "all_to_all"}:
            got, want = exchanged.get(names[ranks], (0, 0))
            exchanged[names[ranks]] = (got + measured.pop(("all_to_all", ranks)),
                                       want + expected.pop(("all_to_all", ranks)))
        assert measured == expected, f"rank {rank}"
    split = overrides.get("expert_tensor_parallel_size") != 1 and overrides.get(
        "sequence_parallel")  # experts split over TP: their rows gathered there
    exchanging = [name for name, size in (("ep", ep), ("tp", tp)) if size > 1
                  and (name == "ep" or split)]
    assert sorted(next(n for n in names.split("/") if n in exchanging) for names in exchanged) \
        == sorted(exchanging)  # (a group's name may be several: DP and EP may coincide)
    for name, (got, want) in exchanged.items():
        assert got == want, f"all-to-alls over {name}"
