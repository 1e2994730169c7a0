"""mp models to Megatron-Core GPT checkpoints (Megatron-LM's ``--ckpt-format torch_dist``):
the inverse of `mp.checkpointing.megatron`, whose name table (`megatron.megatron_names`,
`megatron.fused_gate`) both directions read.

What Megatron-LM's ``load_checkpoint`` reads, written as Megatron-Core 0.14's
``dist_checkpointing.save`` lays it out (``tests/fixtures/megatron/`` holds such saves):

- ``latest_checkpointed_iteration.txt`` (the iteration, or ``release``) and
  ``iter_XXXXXXX/`` (``release/``) holding ``metadata.json`` (``sharded_backend:
  torch_dist``), ``common.pt`` (``args``: an ``argparse.Namespace`` of the model's shape in
  Megatron-LM's argument names, `args_from_config`; ``checkpoint_version`` 3.0,
  ``iteration``, ``content_metadata``) and the DCP files (``.metadata``, ``__0_0.distcp``);
- the model's tensors under Megatron's global names and shapes: a layer's stacked over the
  layers (``decoder.layers.self_attention.linear_qkv.weight [L, qkv, h]``), or keyed per layer
  (``decoder.layers.<i>. ...``) where Megatron-Core does so (``moe_layer_freq`` a list or
  above 1); SwiGLU's ``linear_fc1`` as ``[gate; up]``, the experts' stacked
  ``[E, 2 f, h]``; in the model's ``params_dtype`` (what Megatron saves of a model);
- the ``_extra_state`` objects Megatron-Core asks for when it loads (``[None]``, torch-saved,
  as its linear layers save them), keyed as it keys them
  (``<module>._extra_state/shard_<layer>_<L>``, an expert's ``shard_<layer>.<e>_<L>.<E>``).
  ``transformer_impl='transformer_engine'`` (Megatron-LM's default) adds those of the
  attention cores and norms and names a MoE layer's norm ``pre_mlp_layernorm`` (the TE spec's
  name); ``'local'`` writes exactly what the local spec saves. Megatron loads with its
  default ``--dist-ckpt-strictness assume_ok_unexpected``, so surplus objects do no harm.

Weights only: no optimizer state, no RNG state. Megatron-LM loads it with ``--finetune`` (or
``--no-load-optim --no-load-rng``); a ``release`` checkpoint needs neither.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner

from mp.checkpointing.files import LATEST_FILE
from mp.checkpointing.hf_tensors import check_keys
from mp.checkpointing.megatron import MOE_ARGS, config_from_args, fused_gate, megatron_names
from mp.checkpointing.megatron_files import COMMON_FILE, CONFIG_FILE
from mp.model.config import TransformerConfig

CHECKPOINT_VERSION = 3.0  # Megatron-LM's current one (its QKV ordering)
BACKENDS = {"sharded_backend": "torch_dist", "sharded_backend_version": 1,
            "common_backend": "torch", "common_backend_version": 1}
IMPLS = ("transformer_engine", "local")
#: what Megatron-Core's GPT (as mp maps it) cannot express: mp's field -> the values it can
_EXPRESSIBLE = {"multi_latent_attention": (False,), "mtp_num_layers": (None, 0),
                "rope_type": ("rope",),
                "activation": ("gelu", "swiglu", "squared_relu", "quick_geglu")}
#: mp's fields a Megatron checkpoint does not carry (parallel layout, kernels, recompute,
#: precision: the run chooses them), left out of `check_exportable`'s round trip
_RUN_FIELDS = {
    "normalization_impl", "attention_backend", "masked_softmax_fusion", "bias_dropout_fusion",
    "bias_activation_fusion", "cross_entropy_loss_fusion", "compile_layers",
    "pipeline_model_parallel_size", "virtual_pipeline_model_parallel_size",
    "context_parallel_size", "cp_comm_type", "hierarchical_context_parallel_sizes",
    "num_layers_in_first_pipeline_stage",
    "num_layers_in_last_pipeline_stage", "account_for_embedding_in_pipeline_split",
    "account_for_loss_in_pipeline_split", "pipeline_model_parallel_layout",
    "sequence_parallel", "expert_model_parallel_size", "expert_tensor_parallel_size",
    "overlap_p2p_comm", "recompute_granularity", "recompute_modules", "recompute_method",
    "recompute_num_layers", "distribute_saved_activations", "precision",
    "init_method_xavier_uniform", "mtp_loss_scaling_factor", "moe_router_force_load_balancing",
    "moe_per_layer_logging"}
_EXPERTS = "mlp.experts.experts."


# --- the model's args ---------------------------------------------------------------------

def check_exportable(config: TransformerConfig) -> None:
    """ValueError naming what of ``config`` a Megatron-Core GPT checkpoint cannot express:
    `_EXPRESSIBLE`'s features, and any field the args would not give back (read as
    `megatron.config_from_args` reads them), but the run's choices (`_RUN_FIELDS`)."""
    wrong = [f"{k}={getattr(config, k)!r}" for k, v in _EXPRESSIBLE.items()
             if getattr(config, k) not in v]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: Megatron-Core's GPT checkpoint (as mp maps it) "
                         "holds " + ", ".join(f"{k} in {v!r}" for k, v in _EXPRESSIBLE.items())
                         + " (GeLU is erf's: Megatron-Core's GPT ignores --openai-gelu)")
    back = config_from_args(args_from_config(config), vocab_size=config.vocab_size)
    skip = _RUN_FIELDS | ({f.name for f in dataclasses.fields(config) if f.name.startswith(
        "moe_")} if not config.num_moe_experts else set())
    lost = [f"{f.name}={getattr(config, f.name)!r} (read back as {getattr(back, f.name)!r})"
            for f in dataclasses.fields(config)
            if f.name not in skip and getattr(config, f.name) != getattr(back, f.name)]
    if lost:
        raise ValueError(f"{', '.join(lost)}: Megatron-LM's args cannot carry it, so a "
                         "Megatron checkpoint of this model would describe another one")


def _moe_layer_freq(config: TransformerConfig) -> int | list[int]:
    """Megatron-Core's ``moe_layer_freq``: mp's, its text written out as a 0/1 per layer;
    1 without experts (a list would key a dense model's layers apart)."""
    if not config.num_moe_experts:
        return 1
    if isinstance(config.moe_layer_freq, (int, list)):
        return config.moe_layer_freq
    return [int(config.is_moe_layer(i)) for i in range(config.num_layers)]


def _no_rope_freq(config: TransformerConfig) -> int | list[int] | None:
    """``config.no_rope_freq`` as Megatron-LM's args hold it: N, or a 0/1 per layer (1: no
    RoPE) for a list or an expression."""
    freq = config.no_rope_freq
    if freq is None or isinstance(freq, int):
        return freq
    return [int(not config.applies_rope(layer)) for layer in range(1, config.num_layers + 1)]


def args_from_config(config: TransformerConfig, *, iteration: int = 0,
                     transformer_impl: str = "transformer_engine") -> argparse.Namespace:
    """Megatron-LM's ``args`` of ``config``'s model, the names ``validate_args`` leaves (what
    ``--use-checkpoint-args`` and `megatron.config_from_args` read): shape, norms,
    activation, positions, biases, embeddings, mixture of experts, the vocabulary (``vocab_size``
    the tokenizer's, ``padded_vocab_size`` the rows), the tensor/pipeline/expert-parallel
    sizes of ``config`` (the checkpoint itself is layout-free) and its precision."""
    positions, experts = config.position_embedding_type, config.num_moe_experts
    window = config.window_size
    args = dict(
        num_layers=config.num_layers, hidden_size=config.hidden_size,
        ffn_hidden_size=config.ffn_hidden_size, num_attention_heads=config.num_attention_heads,
        group_query_attention=config.num_query_groups != config.num_attention_heads,
        num_query_groups=config.num_query_groups, kv_channels=config.kv_channels,
        seq_length=config.seq_length, max_position_embeddings=config.max_position_embeddings,
        vocab_size=config.vocab_size, padded_vocab_size=config.padded_vocab_size,
        make_vocab_size_divisible_by=config.make_vocab_size_divisible_by,
        normalization=config.normalization, norm_epsilon=config.layernorm_epsilon,
        apply_layernorm_1p=config.layernorm_zero_centered_gamma,
        swiglu=config.activation == "swiglu", squared_relu=config.activation == "squared_relu",
        quick_geglu=config.activation == "quick_geglu",
        activation_func_clamp_value=config.activation_func_clamp_value,
        glu_linear_offset=config.glu_linear_offset, softmax_type=config.softmax_type,
        openai_gelu=False, qk_layernorm=config.qk_layernorm, qk_l2_norm=config.qk_l2_norm,
        position_embedding_type=positions,
        add_position_embedding=positions == "learned_absolute",
        use_rotary_position_embeddings=positions == "rope",
        rotary_base=config.rotary_base, rotary_percent=config.rotary_percent,
        rotary_interleaved=config.rotary_interleaved, use_rope_scaling=config.use_rope_scaling,
        rope_scaling_factor=config.rope_scaling_factor,
        rotary_seq_len_interpolation_factor=config.rotary_seq_len_interpolation_factor,
        window_size=None if window is None else tuple(window),
        window_attn_skip_freq=config.window_attn_skip_freq,
        no_rope_freq=_no_rope_freq(config),
        add_bias_linear=config.add_bias_linear, add_qkv_bias=config.add_qkv_bias,
        untie_embeddings_and_output_weights=config.untie_embeddings_and_output_weights,
        apply_residual_connection_post_layernorm=False, multi_latent_attention=False,
        mtp_num_layers=None, hidden_dropout=config.hidden_dropout,
        attention_dropout=config.attention_dropout, init_method_std=config.init_method_std,
        embedding_init_method_std=config.embedding_init_method_std,
        init_method_xavier_uniform=config.init_method_xavier_uniform,
        tensor_model_parallel_size=config.tensor_model_parallel_size,
        pipeline_model_parallel_size=config.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=None,
        context_parallel_size=config.context_parallel_size,
        expert_model_parallel_size=config.expert_model_parallel_size,
        expert_tensor_parallel_size=config.expert_tensor_parallel_size,
        fp16=config.precision == "fp16", bf16=config.precision == "bf16",
        fp32_residual_connection=config.fp32_residual_connection,
        params_dtype=config.params_dtype, transformer_impl=transformer_impl,
        ckpt_format="torch_dist", iteration=iteration, num_experts=experts,
        **({name: getattr(config, name) for name in MOE_ARGS} if experts else {}))
    if experts:
        args.update(
            moe_layer_freq=_moe_layer_freq(config),
            moe_router_num_groups=config.moe_router_num_groups,
            moe_router_group_topk=config.moe_router_group_topk,
            moe_router_topk_scaling_factor=config.moe_router_topk_scaling_factor,
            moe_expert_capacity_factor=config.moe_expert_capacity_factor,
            moe_router_load_balancing_type=config.moe_router_load_balancing_type,
            moe_aux_loss_coeff=config.moe_aux_loss_coeff)
    return argparse.Namespace(**args)


# --- the weights --------------------------------------------------------------------------

def mp_to_megatron(weights: dict[str, torch.Tensor],
                   config: TransformerConfig) -> dict[str, torch.Tensor]:
    """mp's global weights to Megatron-Core's names, one key per layer (what
    `megatron_files.read_checkpoint` gives): the inverse of `megatron.megatron_to_mp`.
    SwiGLU's ``linear_gate [ffn, h]`` and ``linear_fc1 [ffn, h]`` become ``linear_fc1
    [2 ffn, h]`` (``[gate; up]``; biases alike), the experts' ``gate_weight`` and
    ``fc1_weight [E, f, h]`` ``[E, 2 f, h]``; ValueError naming missing or surplus weights."""
    names = megatron_names(config)
    gates = {dst: fused_gate(config, dst) for dst in names.values()}
    expected = set(names.values()) | {gate[0] for gate in gates.values() if gate}
    check_keys(set(weights), expected, "mp checkpoint (for its config)")
    out = {}
    for src, dst in names.items():
        gate = gates[dst]
        tensor = weights[dst] if gate is None else torch.cat([weights[gate[0]], weights[dst]],
                                                             dim=gate[1])
        out[src] = tensor.contiguous().clone()
    return out


def keyed_per_layer(config: TransformerConfig) -> bool:
    """Whether Megatron-Core keys the layers apart (``TransformerBlock.sharded_state_dict``'s
    ``non_homogeneous_layers``: ``moe_layer_freq`` a list, or an int above 1)."""
    freq = _moe_layer_freq(config)
    return isinstance(freq, list) or freq > 1


def sharded_state_dict(weights: dict[str, torch.Tensor], config: TransformerConfig, *,
                       transformer_impl: str = "transformer_engine") -> dict:
    """`mp_to_megatron`'s weights as Megatron-Core's DCP keys: a layer's tensors stacked over
    the layers (``decoder.layers.<name> [L, ...]``) unless `keyed_per_layer`, in
    ``config.params_dtype``; plus the ``_extra_state`` objects (``io.BytesIO`` of
    ``torch.save([None])``) that ``transformer_impl``'s spec loads."""
    if transformer_impl not in IMPLS:
        raise ValueError(f"transformer_impl={transformer_impl!r}: Megatron-LM's are {IMPLS}")
    te = transformer_impl == "transformer_engine"
    layers = config.num_layers
    if te:  # the TE spec's MoE layers keep their norm apart
        weights = {_te_moe_norm(config, k): v for k, v in weights.items()}
    per_layer = keyed_per_layer(config)
    state: dict = {k: v.to(config.params_dtype) for k, v in weights.items()
                   if per_layer or not k.startswith("decoder.layers.")}
    if not per_layer:
        first = [k.split(".", 3)[3] for k in weights if k.startswith("decoder.layers.0.")]
        state.update({f"decoder.layers.{name}": torch.stack(
            [weights[f"decoder.layers.{i}.{name}"] for i in range(layers)]).to(
            config.params_dtype) for name in first})
    for module, offsets, shape in _extra_states(config, te, per_layer):
        key = f"{module}._extra_state/shard_{'.'.join(map(str, offsets))}_" \
              f"{'.'.join(map(str, shape))}"
        buffer = io.BytesIO()
        torch.save([None], buffer)
        state[key] = buffer
    return state


def _te_moe_norm(config: TransformerConfig, key: str) -> str:
    """``key``, a MoE layer's norm named as the TE spec names it (``pre_mlp_layernorm``)."""
    parts = key.split(".")
    if key.startswith("decoder.layers.") and config.is_moe_layer(int(parts[2])):
        return key.replace(".mlp.linear_fc1.layer_norm_", ".pre_mlp_layernorm.")
    return key


def _extra_states(config: TransformerConfig, te: bool, per_layer: bool):
    """(module, offsets, global shape) of each ``_extra_state`` Megatron-Core loads."""
    layers, experts = config.num_layers, config.num_moe_experts or 0
    for i in range(layers):
        modules = ["self_attention.linear_qkv", "self_attention.linear_proj"]
        if te:
            modules += ["self_attention.core_attention"] + [
                f"self_attention.{n}_layernorm" for n in "qk" if config.qk_layernorm]
        if not config.is_moe_layer(i):
            modules += ["mlp.linear_fc1", "mlp.linear_fc2"]
        else:
            modules += ["pre_mlp_layernorm"] if te else []
            if config.moe_shared_expert_intermediate_size is not None:
                modules += ["mlp.shared_experts.linear_fc1", "mlp.shared_experts.linear_fc2"]
        prefix, place = (f"decoder.layers.{i}.", ()) if per_layer \
            else ("decoder.layers.", ((i, layers),))
        for module in modules:
            yield _placed_object(prefix + module, place or ((0, 1),))
        if config.is_moe_layer(i):
            for e in range(experts):
                for fc in ("linear_fc1", "linear_fc2"):
                    yield _placed_object(prefix + _EXPERTS + fc, (*place, (e, experts)))
    if te:
        yield _placed_object("decoder.final_layernorm", ((0, 1),))


def _placed_object(module: str, place: tuple[tuple[int, int], ...]):
    """(module, offsets, shape) of a ShardedObject at ``place`` ((offset, size) per axis)."""
    return module, tuple(p[0] for p in place), tuple(p[1] for p in place)


# --- the files ----------------------------------------------------------------------------

class _SavePlanner(DefaultSavePlanner):
    """DCP's planner writing ``io.BytesIO`` objects as they are (they are serialized already,
    as Megatron-Core's ``MCoreSavePlanner`` does) and Megatron-Core's per-tensor
    ``mcore_data`` (empty: no flattened tensors) into the index."""

    def transform_object(self, write_item, object):
        return object if isinstance(object, io.BytesIO) else super().transform_object(
            write_item, object)

    def create_global_plan(self, all_plans):
        plans, metadata = super().create_global_plan(all_plans)
        metadata.mcore_data = {k: {} for k, v in self.state_dict.items()
                               if isinstance(v, torch.Tensor)}
        return plans, metadata


def write_checkpoint(save_dir: str | Path, args: argparse.Namespace, state: dict, *,
                     iteration: int, release: bool = False) -> Path:
    """Write a Megatron-LM ``torch_dist`` checkpoint of ``state`` (`sharded_state_dict`'s)
    into ``save_dir``: ``iter_<iteration:07d>/`` (``release/``), then the tracker file
    naming it. Returns the checkpoint directory; refuses to write over a non-empty one."""
    save_dir = Path(save_dir)
    directory = save_dir / ("release" if release else f"iter_{iteration:07d}")
    if directory.exists() and any(directory.iterdir()):
        raise ValueError(f"{directory} exists and is not empty: pick another --output or "
                         "--iteration")
    directory.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # that DCP "assumes" one process: as asked
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=FileSystemWriter(directory, thread_count=1),
                 planner=_SavePlanner(), no_dist=True)
    torch.save({"args": args, "checkpoint_version": CHECKPOINT_VERSION,
                "iteration": iteration,
                "content_metadata": {"singleton_local_shards": False}},
               directory / COMMON_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(BACKENDS), encoding="utf-8")
    (save_dir / LATEST_FILE).write_text("release" if release else str(iteration),
                                        encoding="utf-8")
    return directory
