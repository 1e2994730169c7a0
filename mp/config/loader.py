"""`load_config`: a YAML file, its base files and command-line overrides to a checked
`JobConfig`, before any process group exists.

A config file is a mapping of the sections ``model`` (`mp.model.TransformerConfig`'s fields),
``training``, ``data`` and ``logging`` (`mp.config.training_section`, `mp.config.sections`).
It may start from another file with ``base: PATH`` (relative to the file): the base is read
first (its own ``base`` too) and this file's keys replace its keys, section by section.
``model.vocab_size`` may be left out: it is then the tokenizer's vocabulary size (the model
pads it, see `TransformerConfig.padded_vocab_size`). Without a file (``path=None``) the
defaults and the overrides make the whole config, as a Megatron-LM command line does. With
``training.use_checkpoint_args`` the model's architecture comes from ``training.load``'s
checkpoint, over the file's values and under the command line's; with
``training.use_mp_args_from_checkpoint_args`` its parallel sizes too, over both (Megatron's).
"""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence

import yaml

from mp.config.coerce import ConfigError, build_dataclass, coerce
from mp.config.job import JobConfig, check_keys, resolve_world_size
from mp.config.overrides import apply_overrides
from mp.config.sections import DataConfig
from mp.data.tokenizer import build_tokenizer

BASE_KEY = "base"


def load_config(path: str | None, overrides: Sequence[str] = (),
                world_size: int | None = None) -> JobConfig:
    """The `JobConfig` of the YAML file at ``path`` (None: no file) with ``overrides`` applied
    (see `mp.config.overrides`), checked for ``world_size`` (default: ``WORLD_SIZE`` from the
    environment, else 1).

    Raises `ConfigError` (a ``ValueError``) for an unknown key, a value of the wrong type or a
    combination that cannot run, and ``ValueError`` from `TransformerConfig` for the model's own
    rules; each message names the values and the rule.
    """
    sections = {} if path is None else read_config_file(path)
    check_keys(sections, path)
    given = copy.deepcopy(sections)
    apply_overrides(given, overrides)
    _take_checkpoint_args(sections, given.get("training") or {})
    apply_overrides(sections, overrides)  # the command line wins over the checkpoint's args
    _take_checkpoint_layout(sections, given.get("training") or {})  # except these (Megatron)
    model = sections.get("model") or {}
    if "vocab_size" not in model:
        sections["model"] = {**model, "vocab_size": _tokenizer_vocab_size(sections.get("data"))}
    cfg = JobConfig.from_dict(sections)
    cfg.validate(resolve_world_size(world_size))
    return cfg


#: What ``training.use_checkpoint_args`` takes from the checkpoint: the architecture (the
#: fields a load checks), the functions' constants, the vocabulary padding, the sequence, and
#: how the experts route (which sets what the model computes, unlike the routers' losses).
CHECKPOINT_ARGS = ("num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                   "kv_channels", "ffn_hidden_size", "vocab_size", "max_position_embeddings",
                   "normalization", "layernorm_zero_centered_gamma", "activation",
                   "position_embedding_type", "add_bias_linear", "add_qkv_bias",
                   "untie_embeddings_and_output_weights", "layernorm_epsilon", "rotary_base",
                   "rotary_percent", "rotary_interleaved",
                   "use_rope_scaling", "rope_scaling_factor",
                   "make_vocab_size_divisible_by", "seq_length", "qk_layernorm", "qk_l2_norm",
                   "no_rope_freq",
                   "rotary_seq_len_interpolation_factor", "multi_latent_attention",
                   "q_lora_rank", "kv_lora_rank", "qk_head_dim", "qk_pos_emb_head_dim",
                   "v_head_dim", "rope_type", "yarn_rotary_scaling_factor",
                   "yarn_original_max_position_embeddings", "yarn_beta_fast", "yarn_beta_slow",
                   "yarn_mscale", "yarn_mscale_all_dim", "yarn_correction_range_round_to_int",
                   "softmax_type", "activation_func_clamp_value", "glu_linear_offset",
                   "num_moe_experts", "moe_router_bias",
                   "moe_ffn_hidden_size", "moe_layer_freq", "moe_shared_expert_intermediate_size",
                   "moe_shared_expert_gate",
                   "moe_router_topk", "moe_router_pre_softmax", "moe_router_score_function",
                   "moe_router_topk_scaling_factor", "moe_router_enable_expert_bias",
                   "moe_router_num_groups", "moe_router_group_topk",
                   "moe_apply_probs_on_input", "mtp_num_layers",
                   "window_size", "window_attn_skip_freq")


def _take_checkpoint_args(sections: dict, training: dict) -> None:
    """Megatron's ``--use-checkpoint-args``: when ``training`` (the resolved section) asks,
    `CHECKPOINT_ARGS` from the metadata of its ``load``'s newest checkpoint (its ``ckpt_step``
    one when set) replace the model section's values in ``sections`` (the config file's; the
    command line is applied after)."""
    if not coerce("training.use_checkpoint_args", training.get("use_checkpoint_args", False),
                  bool):
        return
    if training.get("load") is None:
        raise ConfigError("training.use_checkpoint_args=true needs training.load (the "
                          "checkpoint whose model arguments the run takes)")
    saved = _load_info(training, "use_checkpoint_args").model_config
    taken = {name: saved[name] for name in CHECKPOINT_ARGS if name in saved}
    sections["model"] = {**(sections.get("model") or {}), **taken}


def _load_info(training: dict, key: str):
    """The `CheckpointInfo` of ``training``'s ``load`` (its ``ckpt_step`` one when set), for
    ``training.<key>``; ConfigError when there is none."""
    from mp.checkpointing import CheckpointError, read_checkpoint_info  # imports mp.config
    from mp.checkpointing.files import resolve_checkpoint

    step = coerce("training.ckpt_step", training.get("ckpt_step"), int | None)
    try:
        return read_checkpoint_info(resolve_checkpoint(training["load"], step))
    except CheckpointError as error:
        raise ConfigError(f"training.{key}=true: {error}") from None


#: What ``training.use_mp_args_from_checkpoint_args`` takes (Megatron's list: TP, PP, virtual
#: PP and EP sizes): model key -> where the checkpoint holds it (its layout, or its model
#: config for the expert-parallel size, which the layout does not record).
CHECKPOINT_MP_ARGS = {"tensor_model_parallel_size": "layout",
                      "pipeline_model_parallel_size": "layout",
                      "virtual_pipeline_model_parallel_size": "layout",
                      "expert_model_parallel_size": "model_config"}


def _take_checkpoint_layout(sections: dict, training: dict) -> None:
    """Megatron's ``--use-mp-args-from-checkpoint-args`` (only with ``--use-checkpoint-args``):
    the parallel sizes `CHECKPOINT_MP_ARGS` of the layout that wrote ``load``'s checkpoint
    replace the model section's in ``sections``, the command line's included (Megatron forces
    them); a size the checkpoint does not hold (None) stays. The data-parallel size follows
    from the world size, as always."""
    key = "use_mp_args_from_checkpoint_args"
    if not coerce(f"training.{key}", training.get(key, False), bool):
        return
    if not coerce("training.use_checkpoint_args", training.get("use_checkpoint_args", False),
                  bool):
        raise ConfigError(f"training.{key}=true needs training.use_checkpoint_args=true "
                          "(Megatron reads a checkpoint's arguments only then): add "
                          "--use-checkpoint-args")
    info = _load_info(training, key)
    if info.layout is None:
        raise ConfigError(f"training.{key}=true: {info.path} was written by a single-process "
                          "tool, not a job, so it records no parallel layout to take; set "
                          "the parallel sizes yourself")
    taken = {}
    for name, source in CHECKPOINT_MP_ARGS.items():
        value = getattr(info, source).get(name)
        if value is not None:
            taken[name] = value
    sections["model"] = {**(sections.get("model") or {}), **taken}


def read_config_file(path: str, _chain: tuple[str, ...] = ()) -> dict:
    """The sections of the YAML file at ``path``, merged over its ``base`` files (not checked)."""
    path = os.path.abspath(path)
    if path in _chain:
        loop = " -> ".join((*_chain[_chain.index(path):], path))
        raise ConfigError(f"the base files of {_chain[0]} form a loop: {loop}")
    if not os.path.isfile(path):
        via = f" (the base of {_chain[-1]})" if _chain else ""
        raise ConfigError(f"no config file {path}{via}")
    with open(path, encoding="utf-8") as f:
        try:
            sections = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
    if sections is None:
        sections = {}
    if not isinstance(sections, dict):
        raise ConfigError(f"{path}: a config must be a mapping of sections, got "
                          f"{type(sections).__name__}")
    base = sections.pop(BASE_KEY, None)
    if base is None:
        return sections
    if not isinstance(base, str):
        raise ConfigError(f"{path}: {BASE_KEY}={base!r} must be a file path")
    parent = read_config_file(os.path.join(os.path.dirname(path), base), (*_chain, path))
    return _merge(parent, sections)


def _merge(base: dict, override: dict) -> dict:
    """``base`` with ``override``'s keys replacing its keys, recursively into mappings (a list
    is replaced, not extended)."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = _merge(merged[key], value)
        merged[key] = value
    return merged


def _tokenizer_vocab_size(data_section: dict | None) -> int:
    """The vocabulary size of the tokenizer the ``data`` section names."""
    data = build_dataclass(DataConfig, "data", data_section or {})
    try:
        tokenizer = build_tokenizer(data.tokenizer_type, vocab_file=data.vocab_file,
                                    merge_file=data.merge_file,
                                    tokenizer_model=data.tokenizer_model,
                                    eod_token=data.eod_token, vocab_size=data.vocab_size)
    except (ValueError, OSError, ImportError) as error:
        raise ConfigError(f"model.vocab_size is not set, so it is read from the tokenizer "
                          f"({data.tokenizer_type}), which could not be built: {error}") from error
    return tokenizer.vocab_size
