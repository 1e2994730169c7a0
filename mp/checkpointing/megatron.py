"""Megatron-Core GPT checkpoints (Megatron-LM's ``--ckpt-format torch_dist`` and ``torch``) to
mp's global parameter names: the model's config from Megatron-LM's ``args``, and the weights.

A save directory holds ``latest_checkpointed_iteration.txt`` (an iteration or ``release``)
and ``iter_XXXXXXX/`` (or ``release/``):

- ``torch_dist`` (Megatron-LM's default): ``metadata.json`` (``sharded_backend:
  torch_dist``), ``common.pt`` (``args``, an ``argparse.Namespace``, and the iteration), and a
  ``torch.distributed.checkpoint`` directory (``.metadata``, ``__<rank>_<i>.distcp``) whose
  keys are global: a layer's tensors are stacked along a leading dimension over every layer
  of the model (``decoder.layers.self_attention.linear_qkv.weight [L, qkv, h]``), or keyed
  per layer (``decoder.layers.3. ...``, Megatron's ``non_homogeneous_layers``); both are read.
- ``torch`` (legacy): ``mp_rank_TT/model_optim_rng.pt`` per tensor-parallel rank ``TT``
  (``mp_rank_TT_PPP`` with pipeline stages), each rank's ``{"args", "model": its shard}``;
  the shards are put together here (`_merge_legacy`).

Megatron-Core's names (``decoder.layers.<i>.``, the TE spec's, which ``torch_dist`` also uses
for the local spec) and mp's: ``self_attention.linear_qkv.layer_norm_weight`` /
``_bias`` is ``input_layernorm``, ``linear_qkv`` is ``query_key_value`` (both lay the rows
per query group, ``[g, a / g + 2, d]``: the group's queries, its key, its value),
``linear_proj`` is ``dense``, ``mlp.linear_fc1.layer_norm_*`` is ``pre_mlp_layernorm``; the
local spec's legacy files say ``input_layernorm`` and ``pre_mlp_layernorm`` themselves.
SwiGLU's ``linear_fc1`` fuses the gate and the up projection: ``torch_dist`` stores the
global ``[gate (ffn rows); up (ffn rows)]`` (Megatron's ``apply_swiglu_sharded_factory``),
a legacy file a rank's ``[gate shard; up shard]``; mp has them apart, ``linear_gate`` and
``linear_fc1``. The vocabulary keeps Megatron's padded rows (they are trained weights, and
they enter the softmax).

Loading is safe: ``common.pt`` and legacy files go through ``torch.load(weights_only=True)``
allowing `SAFE_GLOBALS` besides torch's own (tensors, dtypes, containers): Megatron-LM's
``argparse.Namespace`` and, as opaque values, the enums its ``args`` hold. DCP's pickled
index is read by `mp.checkpointing.storage`'s restricted unpickler, which here also builds
DCP's save-plan classes Megatron-Core keeps in it (``MCoreSavePlan`` as DCP's ``SavePlan``).
"""

from __future__ import annotations

import argparse
import json
import pickle
import re
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    BytesIOWriteData,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)

from mp.checkpointing.errors import CheckpointError
from mp.checkpointing.files import LATEST_FILE
from mp.checkpointing.hf_tensors import check_keys
from mp.checkpointing.storage import METADATA_FILE, MetadataUnpickler
from mp.model.config import TransformerConfig

COMMON_FILE, CONFIG_FILE, LEGACY_FILE = "common.pt", "metadata.json", "model_optim_rng.pt"
_LEGACY_RANK = re.compile(r"mp_rank_(\d{2,})(?:_(\d{3,}))?")
_STACKED = re.compile(r"decoder\.layers\.(?!\d)(.+)")


class MegatronEnum:
    """An enum member of Megatron's ``args`` (``AttnBackend.auto``, ``ModelType``, ...), read
    without importing Megatron: its value only."""

    def __init__(self, value):
        self.value = value

    def __repr__(self) -> str:
        return f"MegatronEnum({self.value!r})"


#: what ``torch.load(weights_only=True)`` may build from Megatron's files besides torch's own
SAFE_GLOBALS = [argparse.Namespace, *((MegatronEnum, name) for name in (
    "megatron.core.transformer.enums.AttnBackend", "megatron.core.transformer.enums.ModelType",
    "megatron.core.enums.ModelType", "megatron.core.enums.Fp8Recipe",
    "megatron.core.transformer.enums.AttnMaskType"))]
_PLAN_CLASSES = {"MCoreSavePlan": SavePlan, "SavePlan": SavePlan, "WriteItem": WriteItem,
                 "WriteItemType": WriteItemType, "TensorWriteData": TensorWriteData,
                 "BytesIOWriteData": BytesIOWriteData}
_PLAN_MODULES = ("megatron.core.dist_checkpointing.strategies.torch",
                 "torch.distributed.checkpoint.planner")

#: Megatron-LM argument -> (its value when args lack it, the values mp converts)
_REFUSED_ARGS = {
    "num_experts": (None, (None,)), "multi_latent_attention": (False, (False,)),
    "mtp_num_layers": (None, (None, 0)),
    "apply_residual_connection_post_layernorm": (False, (False,)),
    "softmax_scale": (None, (None,)), "no_rope_freq": (None, (None,)),
    "quick_geglu": (False, (False,)), "qk_l2_norm": (False, (False,)),
    "heterogeneous_layers_config_path": (None, (None,)),
    "normalization": ("LayerNorm", ("LayerNorm", "RMSNorm"))}
_POSITIONS = ("learned_absolute", "rope", "none")


# --- reading the files ---------------------------------------------------------------------

def safe_load(path: Path) -> dict:
    """``torch.load(path, weights_only=True)`` allowing `SAFE_GLOBALS`; CheckpointError
    naming anything else the file would build."""
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, pickle.UnpicklingError, RuntimeError) as error:
        # torch's message, without its advice to unpickle anything (weights_only=False)
        reason = re.search(r"WeightsUnpickler error: (.*?\.)(?: |$)", str(error))
        raise CheckpointError(f"cannot read {path} safely (weights_only=True, allowing "
                              f"argparse.Namespace and Megatron's enums): "
                              f"{reason[1] if reason else error}") from error


class _IndexUnpickler(MetadataUnpickler):
    """DCP's metadata, and the save plans Megatron-Core keeps in it."""

    def find_class(self, module: str, name: str):
        if module in _PLAN_MODULES and name in _PLAN_CLASSES:
            return _PLAN_CLASSES[name]
        return super().find_class(module, name)


class _Reader(FileSystemReader):
    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = Path(self.path) / METADATA_FILE
        try:
            with open(path, "rb") as file:
                return _IndexUnpickler(file).load()
        except (OSError, EOFError, pickle.UnpicklingError, AttributeError) as error:
            raise CheckpointError(f"cannot read checkpoint index {path}: {error}") from error


def resolve(path: str | Path) -> Path:
    """The checkpoint directory ``path`` is, or the one its tracker file names."""
    path = Path(path)
    if (path / CONFIG_FILE).is_file() or any(_LEGACY_RANK.fullmatch(p.name)
                                             for p in path.glob("mp_rank_*")):
        return path
    tracker = path / LATEST_FILE
    if not tracker.is_file():
        raise CheckpointError(f"{path} is not a Megatron checkpoint: it has no {CONFIG_FILE} "
                              f"(torch_dist), no mp_rank_* (torch) and no {LATEST_FILE}")
    text = tracker.read_text(encoding="utf-8").strip()
    if text != "release" and not text.isdigit():
        raise CheckpointError(f"{tracker} should hold an iteration or 'release'; it holds "
                              f"{text[:40]!r}")
    return path / ("release" if text == "release" else f"iter_{int(text):07d}")


def read_checkpoint(path: str | Path) -> tuple[argparse.Namespace, dict[str, torch.Tensor]]:
    """``(args, the model's weights)`` of a Megatron-Core checkpoint (a save directory or one
    of its checkpoints): the weights whole, under Megatron's global names, one key per layer
    (``decoder.layers.<i>. ...``, the TE spec's names), SwiGLU's ``linear_fc1`` as
    ``[gate; up]``; ``_extra_state`` entries and everything but the model are left out."""
    directory = resolve(path)
    if not (directory / CONFIG_FILE).is_file():
        return _read_legacy(directory)
    backend = json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")).get(
        "sharded_backend")
    if backend != "torch_dist":
        raise CheckpointError(f"{directory / CONFIG_FILE}: sharded_backend={backend!r}; mp "
                              "reads Megatron's torch_dist (and legacy torch) checkpoints")
    common = safe_load(directory / COMMON_FILE)
    if (common.get("content_metadata") or {}).get("singleton_local_shards"):
        raise CheckpointError(f"{directory}: singleton_local_shards=True (per-rank keys); mp "
                              "reads the default layout (singleton_local_shards=False)")
    if "args" not in common:
        raise CheckpointError(f"{directory / COMMON_FILE} has no args")
    reader = _Reader(directory)
    entries = {key: entry for key, entry in reader.read_metadata().state_dict_metadata.items()
               if isinstance(entry, TensorStorageMetadata) and _is_model_key(key)}
    weights = {key: torch.empty(entry.size, dtype=entry.properties.dtype)
               for key, entry in entries.items()}
    with warnings.catch_warnings():  # that DCP "assumes" one process: as asked
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(weights, storage_reader=reader, no_dist=True)
    return common["args"], _unstack(weights)


def _is_model_key(key: str) -> bool:
    return key.startswith(("embedding.", "decoder.", "output_layer.", "mtp.")) \
        and "_extra_state" not in key


def _unstack(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Layer-stacked tensors ``decoder.layers.<name> [L, ...]`` as ``decoder.layers.<i>.<name>``."""
    out = {}
    for key, tensor in weights.items():
        match = _STACKED.fullmatch(key)
        out.update({f"decoder.layers.{i}.{match[1]}": t for i, t in enumerate(tensor)}
                   if match else {key: tensor})
    return out


# --- the legacy format: one file per rank ---------------------------------------------------

_LOCAL_SPEC_NAMES = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                     "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}
_ROWS = ("embedding.word_embeddings.weight", "output_layer.weight", "linear_qkv.weight",
         "linear_qkv.bias", "linear_fc1.weight", "linear_fc1.bias")  # column-parallel: dim 0
_COLUMNS = ("linear_proj.weight", "linear_fc2.weight")  # row-parallel: dim 1


def _read_legacy(directory: Path) -> tuple[argparse.Namespace, dict[str, torch.Tensor]]:
    files = {}  # (tp rank, pp rank) -> its file
    for rank_dir in directory.glob("mp_rank_*"):
        match = _LEGACY_RANK.fullmatch(rank_dir.name)
        if match and (rank_dir / LEGACY_FILE).is_file():
            files[int(match[1]), int(match[2] or 0)] = rank_dir / LEGACY_FILE
    tp, pp = (max(rank[i] for rank in files) + 1 if files else 0 for i in (0, 1))
    if pp > 1:
        raise CheckpointError(f"{directory}: a legacy (torch) checkpoint of {pp} pipeline stages; "
                              "mp reads legacy ones of one stage: have Megatron-LM load it "
                              "with --ckpt-convert-format torch_dist --ckpt-convert-save DIR")
    missing = [t for t in range(tp) if (t, 0) not in files]
    if not files or missing:
        raise CheckpointError(f"{directory} has no mp_rank_TT/{LEGACY_FILE} of tensor-parallel "
                              f"rank(s) {missing or [0]}")
    ranks = [safe_load(files[t, 0]) for t in range(tp)]
    if "model" not in ranks[0]:  # a virtual pipeline's model0, model1, ...
        raise CheckpointError(f"{files[0, 0]} holds no 'model' (keys {sorted(ranks[0])}); mp "
                              "reads legacy checkpoints without virtual pipeline stages")
    args = ranks[0]["args"]
    if getattr(args, "tensor_model_parallel_size", tp) != tp:
        raise CheckpointError(f"{directory} holds {tp} tensor-parallel rank(s) but its args say "
                              f"tensor_model_parallel_size={args.tensor_model_parallel_size}")
    shards = [_global_names(rank["model"]) for rank in ranks]
    return args, {key: _merge_legacy(key, [s[key] for s in shards], args) for key in shards[0]}


def _global_names(model: dict) -> dict[str, torch.Tensor]:
    """A rank's state dict under the TE spec's names, without ``_extra_state``."""
    out = {}
    for key, value in model.items():
        if "_extra_state" in key:
            continue
        for local, te in _LOCAL_SPEC_NAMES.items():
            key = key.replace(f".{local}", f".{te}")
        out[key] = value
    return out


def _merge_legacy(key: str, shards: list[torch.Tensor], args) -> torch.Tensor:
    """One tensor from its tensor-parallel shards: concatenated along its split dimension
    (SwiGLU's ``linear_fc1`` as ``[every gate shard; every up shard]``), or the first copy of a
    replicated one."""
    if key.endswith(_COLUMNS):
        return torch.cat(shards, dim=1)
    if not key.endswith(_ROWS):
        return shards[0]
    if getattr(args, "swiglu", False) and ".linear_fc1." in key:
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards)


# --- the model ------------------------------------------------------------------------------

def config_from_args(args: argparse.Namespace, *, tensor_model_parallel_size: int | None = None,
                     make_vocab_size_divisible_by: int | None = None,
                     vocab_size: int | None = None) -> TransformerConfig:
    """The mp model of Megatron-LM's ``args`` (as Megatron-Core's GPT reads them,
    ``core_transformer_config_from_args``); ValueError naming what mp cannot express.

    The vocabulary: ``args.padded_vocab_size`` rows, all kept; ``vocab_size`` (the
    tokenizer's, default the padded size: Megatron's args do not hold it) padded by
    ``make_vocab_size_divisible_by`` x ``tensor_model_parallel_size`` (default the
    checkpoint's) must give that many rows."""
    positions = _position_embedding_type(args)
    for name, (default, allowed) in {**_REFUSED_ARGS, "position_embedding_type": (
            positions, _POSITIONS)}.items():
        value = getattr(args, name, default)
        if value not in allowed:
            raise ValueError(f"{name}={value!r} in the Megatron checkpoint's args: mp converts "
                             f"{name} in {allowed!r}")
    try:
        return _config(args, positions, tensor_model_parallel_size,
                       make_vocab_size_divisible_by, vocab_size)
    except AttributeError as error:
        raise ValueError(f"the Megatron checkpoint's args have no {error.name}") from error


def _config(args, positions: str, tensor_model_parallel_size: int | None,
            make_vocab_size_divisible_by: int | None, vocab_size: int | None
            ) -> TransformerConfig:
    rows, window = args.padded_vocab_size, getattr(args, "window_size", None)
    tp = tensor_model_parallel_size or args.tensor_model_parallel_size
    multiple = make_vocab_size_divisible_by or args.make_vocab_size_divisible_by
    config = TransformerConfig(
        num_layers=args.num_layers, hidden_size=args.hidden_size,
        num_attention_heads=args.num_attention_heads,
        num_query_groups=args.num_query_groups if args.group_query_attention else None,
        kv_channels=getattr(args, "kv_channels", None), ffn_hidden_size=args.ffn_hidden_size,
        vocab_size=vocab_size or rows, make_vocab_size_divisible_by=multiple,
        seq_length=args.seq_length, max_position_embeddings=args.max_position_embeddings,
        normalization=getattr(args, "normalization", "LayerNorm"),
        layernorm_epsilon=getattr(args, "norm_epsilon", getattr(args, "layernorm_epsilon", 1e-5)),
        layernorm_zero_centered_gamma=getattr(args, "apply_layernorm_1p", False),
        activation=("swiglu" if args.swiglu else "squared_relu"
                    if getattr(args, "squared_relu", False) else "gelu"),
        qk_layernorm=getattr(args, "qk_layernorm", False),
        position_embedding_type=positions,
        rotary_base=float(getattr(args, "rotary_base", 10000)),
        rotary_percent=getattr(args, "rotary_percent", 1.0),
        rotary_interleaved=getattr(args, "rotary_interleaved", False),
        use_rope_scaling=getattr(args, "use_rope_scaling", False),
        rope_scaling_factor=getattr(args, "rope_scaling_factor", 8.0),
        rotary_seq_len_interpolation_factor=getattr(
            args, "rotary_seq_len_interpolation_factor", None),
        window_size=None if window is None else list(window),
        window_attn_skip_freq=getattr(args, "window_attn_skip_freq", None),
        add_bias_linear=args.add_bias_linear, add_qkv_bias=getattr(args, "add_qkv_bias", False),
        untie_embeddings_and_output_weights=args.untie_embeddings_and_output_weights,
        hidden_dropout=args.hidden_dropout, attention_dropout=args.attention_dropout,
        init_method_std=args.init_method_std, tensor_model_parallel_size=tp)
    if config.padded_vocab_size != rows:
        raise ValueError(
            f"padded_vocab_size={rows} in the Megatron checkpoint, but vocab_size="
            f"{config.vocab_size} padded to a multiple of make_vocab_size_divisible_by x "
            f"tensor_model_parallel_size = {multiple} x {tp} is {config.padded_vocab_size}: "
            f"mp keeps Megatron's {rows} rows, so pick sizes whose product divides {rows}")
    return config


def _position_embedding_type(args) -> str:
    """``args.position_embedding_type``, or from Megatron-LM before it had one."""
    legacy = "rope" if getattr(args, "use_rotary_position_embeddings", False) \
        else "learned_absolute"
    return getattr(args, "position_embedding_type", legacy)


def _layer_pairs(config: TransformerConfig) -> list[tuple[str, str]]:
    """(Megatron-Core name, mp name) of a layer's parameters, under ``decoder.layers.<i>.``;
    SwiGLU's fused ``linear_fc1`` is left to `megatron_to_mp`."""
    norm = ("weight", "bias") if config.normalization == "LayerNorm" else ("weight",)
    linear = ("weight", "bias") if config.add_bias_linear else ("weight",)
    qkv = ("weight", "bias") if config.add_bias_linear or config.add_qkv_bias else ("weight",)
    pairs = [(f"self_attention.linear_qkv.layer_norm_{p}", f"input_layernorm.{p}")
             for p in norm]
    pairs += [(f"self_attention.linear_qkv.{p}", f"self_attention.query_key_value.{p}")
              for p in qkv]
    if config.qk_layernorm:
        pairs += [(f"self_attention.{n}.{p}", f"self_attention.{n}.{p}")
                  for n in ("q_layernorm", "k_layernorm") for p in norm]
    pairs += [(f"self_attention.linear_proj.{p}", f"self_attention.dense.{p}") for p in linear]
    pairs += [(f"mlp.linear_fc1.layer_norm_{p}", f"pre_mlp_layernorm.{p}") for p in norm]
    pairs += [(f"mlp.{n}.{p}", f"mlp.{n}.{p}") for n in ("linear_fc1", "linear_fc2")
              for p in linear]
    return pairs


def megatron_to_mp(weights: dict[str, torch.Tensor],
                   config: TransformerConfig) -> dict[str, torch.Tensor]:
    """`read_checkpoint`'s weights to mp's global names and layout. The tensors keep their
    values: QKV rows are laid alike, norm weights are zero-centred in both with
    ``--apply-layernorm-1p``; SwiGLU's ``linear_fc1 [2 ffn, h]`` (``[gate; up]``) becomes
    ``linear_gate [ffn, h]`` and ``linear_fc1 [ffn, h]`` (biases alike)."""
    tied = not config.untie_embeddings_and_output_weights
    names = {"embedding.word_embeddings.weight": "embedding.word_embeddings.weight",
             "decoder.final_layernorm.weight": "decoder.final_layernorm.weight"}
    if config.normalization == "LayerNorm":
        names["decoder.final_layernorm.bias"] = "decoder.final_layernorm.bias"
    if config.position_embedding_type == "learned_absolute":
        names["embedding.position_embeddings.weight"] = "embedding.position_embeddings.weight"
    if not tied:
        names["output_layer.weight"] = "output_layer.weight"
    names.update({f"decoder.layers.{i}.{src}": f"decoder.layers.{i}.{dst}"
                  for i in range(config.num_layers) for src, dst in _layer_pairs(config)})
    check_keys(set(weights), set(names), "Megatron checkpoint (for its args)")
    mp = {dst: weights[src] for src, dst in names.items()}
    if config.activation == "swiglu":
        for key in [k for k in mp if ".mlp.linear_fc1." in k]:
            mp[key.replace("linear_fc1", "linear_gate")], mp[key] = mp[key].chunk(2)
    return {k: v.contiguous().clone() for k, v in mp.items()}
