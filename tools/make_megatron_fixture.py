"""Write the tiny Megatron-Core checkpoints of ``tests/fixtures/megatron/`` with real
Megatron-Core, and the logits it computes on fixed tokens.

Runs on CPU, in a virtual environment of its own (the project's stays without megatron-core)::

    python -m venv --system-site-packages /tmp/mcvenv
    /tmp/mcvenv/bin/pip install megatron-core==0.14.0
    /tmp/mcvenv/bin/python tools/make_megatron_fixture.py --output tests/fixtures/megatron

Each variant (`VARIANTS`) builds a Megatron-Core ``GPTModel`` with the local layer spec
(``get_gpt_layer_local_spec``: no Transformer Engine, no apex; a mixture of experts's layers
from ``get_gpt_decoder_block_spec``, dense or MoE by ``moe_layer_freq``) at its
tensor-parallel size (times its expert-parallel size, ``ep``), one gloo process per rank,
``use_cpu_initialization`` (serial-equivalent weights, drawn on the CPU), dropouts 0. Every
weight is then redrawn (norms around 1, biases non-zero), each tensor-parallel rank its own
draw of a sharded weight and the same draw of a replicated one, each expert-parallel rank
its own draw of its experts, routers' expert biases too, so that nothing the converter reads
is a constant. The MoE variants route dropless with the ``allgather`` token dispatcher
(``alltoall``, Megatron-LM's default, needs CUDA streams; both compute the same), without
auxiliary losses in the forward (eval mode). The model runs forward on `TOKENS` with
Megatron-LM's causal mask and position ids, and is saved the way Megatron-LM's
``save_checkpoint`` lays out ``--ckpt-format torch_dist`` (no optimizer, no RNG state):
``dist_checkpointing.save`` of ``{"args", "checkpoint_version", "iteration", "model"}`` into
``<variant>/iter_0000010/`` (``common.pt``, ``metadata.json``, ``.metadata``,
``__<rank>_<i>.distcp``), then ``latest_checkpointed_iteration.txt``. Variants with
``legacy=True`` are also saved in the ``--ckpt-format torch`` layout beside it
(``<variant>_legacy/iter_0000010/mp_rank_0<t>/model_optim_rng.pt``: each rank's
``{"args", "checkpoint_version", "iteration", "model": state_dict_for_save_checkpoint()}``).
``<variant>/logits.pt`` holds ``{"tokens": [b, s], "logits": [b, s, padded vocab]}``
(fp32; Megatron's output gathered over the tensor-parallel ranks).

``args`` is an ``argparse.Namespace`` carrying Megatron-LM's argument names for the model's
shape (``ARGS`` and the variant's), as Megatron-LM's parser leaves them after
``validate_args``; that is what ``tools/convert_checkpoint.py megatron-to-mp`` reads.

Only what CUDA-less Megatron-Core lacks is patched, here and only in this process:
``torch.cuda.current_device`` answers ``"cpu"`` (the RoPE frequencies move there),
``torch.cuda.synchronize`` (before the checkpoint's writes) does nothing, the
CUDA RNG tracker's ``fork`` is a no-op context (dropout is 0), the router's
``te_general_gemm`` (left undefined without Transformer Engine) is None, the legacy
GroupedMLP's ``grouped_gemm.ops.gmm`` is a loop of matrix products, and torch's norms take
sequence parallelism (which Megatron asks for with TP and EP together; the local spec refuses
it only because the norms' gradients would miss their sum over TP).

``tools/verify_megatron_export.py`` loads mp's exports in Megatron-Core with these builders.

Megatron-Core 0.14 gates shared experts only through the spec (``SharedExpertMLP``'s
``gate``); its args here say ``moe_shared_expert_gate``, as later Megatron-LM's
``--moe-shared-expert-gate`` does.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
import torch.multiprocessing as mp_spawn
import torch.nn.functional as F

ITERATION = 10
TOKENS = torch.tensor([[3, 17, 59, 42, 8, 34, 1, 57, 23, 5, 50, 31],
                       [11, 0, 58, 58, 20, 7, 33, 2, 46, 14, 41, 45]])
ARGS = dict(  # the args every variant shares (Megatron-LM's names, as validate_args leaves them)
    num_layers=2, hidden_size=16, num_attention_heads=4, vocab_size=60,
    make_vocab_size_divisible_by=16, seq_length=16, max_position_embeddings=16,
    norm_epsilon=1e-5, hidden_dropout=0.0, attention_dropout=0.0, init_method_std=0.02,
    apply_layernorm_1p=False, openai_gelu=False, squared_relu=False, swiglu=False,
    qk_layernorm=False, add_qkv_bias=False, group_query_attention=False, num_query_groups=1,
    rotary_percent=1.0, rotary_base=10000, rotary_interleaved=False, use_rope_scaling=False,
    rope_scaling_factor=8.0, rotary_seq_len_interpolation_factor=None,
    window_size=None, window_attn_skip_freq=None, num_experts=None,
    multi_latent_attention=False, mtp_num_layers=None, pipeline_model_parallel_size=1,
    virtual_pipeline_model_parallel_size=None, context_parallel_size=1,
    expert_model_parallel_size=1, fp16=False, bf16=False, params_dtype=torch.float32,
    transformer_impl="local", ckpt_format="torch_dist", tokenizer_type="NullTokenizer",
    iteration=ITERATION, train_iters=ITERATION, micro_batch_size=2, global_batch_size=2,
    lr=1e-4, seed=1234)
MOE_ARGS = dict(  # the MoE variants' args: Megatron-LM's names and, but the sizes, defaults
    num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=8, moe_layer_freq=1,
    moe_router_load_balancing_type="aux_loss", moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None,
    moe_router_score_function="softmax", moe_router_pre_softmax=False,
    moe_router_topk_scaling_factor=None, moe_router_enable_expert_bias=False,
    moe_router_bias_update_rate=1e-3, moe_router_num_groups=None, moe_router_group_topk=None,
    moe_router_dtype=None, moe_shared_expert_intermediate_size=None,
    moe_shared_expert_gate=False, moe_shared_expert_overlap=False, moe_grouped_gemm=False,
    moe_use_legacy_grouped_gemm=False, moe_token_dispatcher_type="allgather",
    moe_expert_capacity_factor=None, moe_token_drop_policy="probs",
    moe_pad_expert_input_to_capacity=False, moe_input_jitter_eps=None,
    moe_apply_probs_on_input=False, moe_router_topk_limited_devices=None,
    moe_router_force_load_balancing=False, moe_permute_fusion=False, moe_router_fusion=False,
    expert_tensor_parallel_size=None)
VARIANTS = {
    # GPT-2-like: LayerNorm, GeLU, learned positions, biases, tied embeddings
    "gpt": dict(tp=2, legacy=True, args=dict(
        normalization="LayerNorm", ffn_hidden_size=32, kv_channels=4,
        num_query_groups=4, position_embedding_type="learned_absolute",
        add_bias_linear=True, untie_embeddings_and_output_weights=False)),
    # Llama-like: RMSNorm, SwiGLU, RoPE, grouped-query attention, untied, no biases
    "llama": dict(tp=2, legacy=True, args=dict(
        normalization="RMSNorm", swiglu=True, ffn_hidden_size=24, kv_channels=4,
        group_query_attention=True, num_query_groups=2, position_embedding_type="rope",
        rotary_base=500000, add_bias_linear=False, untie_embeddings_and_output_weights=True)),
    # Qwen-like at TP 1: q/k norms, QKV biases, heads wider than hidden / heads, half rotated
    "qwen": dict(tp=1, legacy=False, args=dict(
        normalization="RMSNorm", swiglu=True, ffn_hidden_size=24, kv_channels=12,
        group_query_attention=True, num_query_groups=2, position_embedding_type="rope",
        rotary_percent=0.5, qk_layernorm=True, add_qkv_bias=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=False)),
    # the Llama-like model with GPT-J's interleaved RoPE pairs (--rotary-interleaved)
    "llama_interleaved": dict(tp=2, legacy=False, args=dict(
        normalization="RMSNorm", swiglu=True, ffn_hidden_size=24, kv_channels=4,
        group_query_attention=True, num_query_groups=2, position_embedding_type="rope",
        rotary_interleaved=True, add_bias_linear=False,
        untie_embeddings_and_output_weights=True)),
    # Mixture of experts (the Llama-like model's attention): a dense first layer, then 4 SwiGLU
    # experts 8 wide, top 2 of a softmax over the top logits, and a shared expert 12 wide
    # gated per token; SequentialMLP (a module per expert) at TP 2
    "moe": dict(tp=2, ep=1, legacy=False, args=dict(
        MOE_ARGS, normalization="RMSNorm", swiglu=True, ffn_hidden_size=24, kv_channels=4,
        group_query_attention=True, num_query_groups=2, position_embedding_type="rope",
        add_bias_linear=False, untie_embeddings_and_output_weights=True,
        moe_layer_freq=[0, 1], moe_shared_expert_intermediate_size=12,
        moe_shared_expert_gate=True, moe_aux_loss_coeff=0.01)),
    # every layer a mixture: DeepSeek-V3's routing (sigmoid scores, the expert bias for the
    # choice, 2 groups of 2 experts of which a token's top 2 come from the best 1, the weights
    # times 2.5), an ungated shared expert 8 wide; the legacy GroupedMLP (the experts' weights
    # as two tensors) at TP 2 x EP 2 (with sequence parallelism, as Megatron asks)
    "moe_grouped": dict(tp=2, ep=2, legacy=False, args=dict(
        MOE_ARGS, normalization="RMSNorm", swiglu=True, ffn_hidden_size=24, kv_channels=4,
        group_query_attention=True, num_query_groups=2, position_embedding_type="rope",
        add_bias_linear=False, untie_embeddings_and_output_weights=False,
        moe_shared_expert_intermediate_size=8, moe_router_score_function="sigmoid",
        moe_router_enable_expert_bias=True, moe_router_topk_scaling_factor=2.5,
        moe_router_num_groups=2, moe_router_group_topk=1, moe_grouped_gemm=True,
        moe_use_legacy_grouped_gemm=True, sequence_parallel=True)),
}


def megatron_args(variant: dict) -> argparse.Namespace:
    """Megatron-LM's ``args`` for ``variant``: `ARGS`, its own, what ``validate_args`` and
    ``build_tokenizer`` derive (``padded_vocab_size``, ``tensor_model_parallel_size``) and
    the enums ``pretrain`` leaves there (``attention_backend``, ``model_type``)."""
    from megatron.core.enums import ModelType
    from megatron.core.transformer.enums import AttnBackend
    args = argparse.Namespace(**{**ARGS, **variant["args"]})
    args.attention_backend = AttnBackend.auto  # the enums Megatron-LM's args hold
    args.model_type = ModelType.encoder_or_decoder
    args.tensor_model_parallel_size = variant["tp"]
    args.expert_model_parallel_size = variant.get("ep", 1)
    args.world_size = variant["tp"] * args.expert_model_parallel_size
    multiple = args.make_vocab_size_divisible_by * args.tensor_model_parallel_size
    args.padded_vocab_size = -(-args.vocab_size // multiple) * multiple
    return args


def patch_cuda_only_calls() -> None:
    from megatron.core.tensor_parallel import random as mc_random
    from megatron.core.transformer import torch_norm
    from megatron.core.transformer.moe import grouped_gemm_util, moe_utils
    torch.cuda.current_device = lambda: "cpu"
    torch.cuda.synchronize = lambda device=None: None
    mc_random.CudaRNGStatesTracker.fork = lambda self, name=None: contextlib.nullcontext()
    moe_utils.te_general_gemm = None  # left undefined without Transformer Engine
    ops = SimpleNamespace(gmm=_grouped_gemm)  # the grouped_gemm package's CUDA kernel
    grouped_gemm_util.grouped_gemm, grouped_gemm_util.ops = SimpleNamespace(ops=ops), ops
    torch_norm.WrappedTorchNorm.__new__ = _norm_under_sequence_parallelism(
        torch_norm.WrappedTorchNorm.__new__)


def _norm_under_sequence_parallelism(new):
    """torch's norms under sequence parallelism, which the local spec refuses (their weights'
    gradients would miss the sum over TP; a forward takes none)."""
    def wrapped(cls, config, *args, **kwargs):
        config = copy.copy(config)
        config.sequence_parallel = False
        return new(cls, config, *args, **kwargs)
    return wrapped


def _grouped_gemm(a: torch.Tensor, b: torch.Tensor, batch_sizes: torch.Tensor,
                  trans_b: bool = False) -> torch.Tensor:
    """``grouped_gemm.ops.gmm`` on the CPU: expert ``e``'s ``batch_sizes[e]`` rows of ``a``
    times ``b[e]`` (``b[e]^T`` with ``trans_b``)."""
    rows = a.split(batch_sizes.tolist())
    return torch.cat([x @ (w.t() if trans_b else w) for x, w in zip(rows, b)])


def _transformer_config(args: argparse.Namespace):
    """Megatron-LM's ``core_transformer_config_from_args`` for the fields these use (GeLU
    or SwiGLU; like it, it ignores ``openai_gelu``), plus what a CPU run needs."""
    from megatron.core.transformer import TransformerConfig
    return TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=args.kv_channels, ffn_hidden_size=args.ffn_hidden_size,
        normalization=args.normalization, layernorm_epsilon=args.norm_epsilon,
        gated_linear_unit=args.swiglu, activation_func=F.silu if args.swiglu else F.gelu,
        add_bias_linear=args.add_bias_linear, add_qkv_bias=args.add_qkv_bias,
        qk_layernorm=args.qk_layernorm, rotary_interleaved=args.rotary_interleaved,
        hidden_dropout=0.0, attention_dropout=0.0,
        init_method_std=args.init_method_std,
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        use_cpu_initialization=True, perform_initialization=True,
        gradient_accumulation_fusion=False, bias_activation_fusion=False,
        bias_dropout_fusion=False, masked_softmax_fusion=False, apply_rope_fusion=False,
        persist_layer_norm=False, params_dtype=torch.float32,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=getattr(args, "sequence_parallel", False),
        **(_moe_config(args) if args.num_experts else {}))


def _moe_config(args: argparse.Namespace) -> dict:
    """The MoE fields of ``core_transformer_config_from_args`` (the args' names, but
    ``num_moe_experts``), dropless, no fused kernels."""
    names = ("moe_router_topk", "moe_ffn_hidden_size", "moe_layer_freq",
             "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
             "moe_router_score_function", "moe_router_pre_softmax",
             "moe_router_topk_scaling_factor", "moe_router_enable_expert_bias",
             "moe_router_num_groups", "moe_router_group_topk", "moe_router_dtype",
             "moe_shared_expert_intermediate_size", "moe_grouped_gemm",
             "moe_use_legacy_grouped_gemm", "moe_token_dispatcher_type")
    return dict(num_moe_experts=args.num_experts, **{n: getattr(args, n) for n in names})


def build_model(args: argparse.Namespace):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (
        get_gpt_decoder_block_spec,
        get_gpt_layer_local_spec,
    )
    config = _transformer_config(args)
    if args.num_experts:  # the local spec's layers, dense or MoE by moe_layer_freq
        spec = get_gpt_decoder_block_spec(config, use_transformer_engine=False,
                                          normalization=args.normalization)
        for layer in spec.layer_specs:  # Megatron-LM's --moe-shared-expert-gate (after 0.14)
            shared = getattr(layer.submodules.mlp.submodules, "shared_experts", None)
            if shared is not None:
                shared.params = {**shared.params, "gate": args.moe_shared_expert_gate}
    else:
        spec = get_gpt_layer_local_spec(qk_layernorm=args.qk_layernorm,
                                        normalization=args.normalization)
    return GPTModel(
        config, spec, vocab_size=args.padded_vocab_size,
        max_sequence_length=args.max_position_embeddings,
        share_embeddings_and_output_weights=not args.untie_embeddings_and_output_weights,
        position_embedding_type=args.position_embedding_type,
        rotary_percent=args.rotary_percent, rotary_base=args.rotary_base)


@torch.no_grad()
def _redraw_weights(model, tp_rank: int, ep_rank: int) -> None:
    """Every parameter from N(0, 0.2) (norm weights 1 + that), seeded by its place in the
    model and, for a tensor-parallel shard, the rank holding it, for an expert's weight the
    expert-parallel rank too; routers' expert biases from N(0, 0.1)."""
    for index, (name, param) in enumerate(model.named_parameters()):
        sharded = getattr(param, "tensor_model_parallel", False)
        expert = ".experts." in name
        generator = torch.Generator().manual_seed(1000 * index + (tp_rank if sharded else 0)
                                                  + (100 * ep_rank if expert else 0))
        noise = torch.randn(param.shape, generator=generator) * 0.2
        param.copy_(noise + 1.0 if name.endswith("layernorm.weight") else noise)
    for index, (name, buffer) in enumerate(model.named_buffers()):
        if name.endswith("router.expert_bias"):
            generator = torch.Generator().manual_seed(7 + index)
            buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)


def causal_inputs(tokens: torch.Tensor):
    """Megatron-LM's ``get_ltor_masks_and_position_ids`` for plain sequences: the boolean
    mask ``[1, 1, s, s]`` (True = masked) and positions ``[b, s]``."""
    b, s = tokens.shape
    mask = torch.triu(torch.ones(s, s, dtype=torch.bool), diagonal=1)[None, None]
    return mask, torch.arange(s).expand(b, s)


def _rank(rank: int, world: int, port: int, name: str, output: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import dist_checkpointing, parallel_state
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    patch_cuda_only_calls()
    variant = VARIANTS[name]
    args = megatron_args(variant)
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=variant["tp"],
        expert_model_parallel_size=args.expert_model_parallel_size)
    torch.manual_seed(args.seed)
    model = build_model(args)
    _redraw_weights(model, parallel_state.get_tensor_model_parallel_rank(),
                    parallel_state.get_expert_model_parallel_rank())
    model.eval()
    mask, positions = causal_inputs(TOKENS)
    with torch.no_grad():
        logits = gather_from_tensor_model_parallel_region(model(TOKENS, positions, mask))
    root, legacy_root = Path(output) / name, Path(output) / f"{name}_legacy"
    checkpoint = root / f"iter_{ITERATION:07d}"
    if rank == 0:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(legacy_root, ignore_errors=True)
        checkpoint.mkdir(parents=True)
    dist.barrier()
    state = {"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
             "model": model.sharded_state_dict()}
    dist_checkpointing.save(state, str(checkpoint),
                            content_metadata={"singleton_local_shards": False})
    if variant["legacy"]:
        legacy = legacy_root / f"iter_{ITERATION:07d}" / f"mp_rank_{rank:02d}"
        legacy.mkdir(parents=True, exist_ok=True)
        torch.save({"args": args, "checkpoint_version": 3.0, "iteration": ITERATION,
                    "model": model.state_dict_for_save_checkpoint()},
                   legacy / "model_optim_rng.pt")
    dist.barrier()
    if rank == 0:
        for save_dir in [root] + ([legacy_root] if variant["legacy"] else []):
            (save_dir / "latest_checkpointed_iteration.txt").write_text(str(ITERATION))
        torch.save({"tokens": TOKENS.clone(), "logits": logits.contiguous().clone()},
                   root / "logits.pt")
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="tests/fixtures/megatron")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--port", type=int, default=29533)
    args = parser.parse_args(argv)
    for offset, name in enumerate(args.variants):
        tp, ep = VARIANTS[name]["tp"], VARIANTS[name].get("ep", 1)
        mp_spawn.spawn(_rank, args=(tp * ep, args.port + offset, name, args.output),
                       nprocs=tp * ep, join=True)
        print(f"wrote {Path(args.output) / name} (TP {tp}, EP {ep})", file=sys.stderr)


if __name__ == "__main__":
    main()
