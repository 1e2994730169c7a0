"""Reading Megatron-Core GPT checkpoints (`mp.checkpointing.megatron` maps what they hold):
Megatron-LM's ``args`` and the model's tensors under Megatron-Core's global names.

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
  the shards are put together here (`_merge_legacy`): SwiGLU's ``linear_fc1`` holds a rank's
  ``[gate shard; up shard]``, made the global ``[gate; up]`` ``torch_dist`` stores.

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
from mp.checkpointing.storage import METADATA_FILE, MetadataUnpickler

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
    (``decoder.layers.<i>. ...``, the TE spec's names, a MoE layer's norm as a dense one's),
    SwiGLU's ``linear_fc1`` as ``[gate; up]``; ``_extra_state`` entries and everything but the
    model are left out."""
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
    return common["args"], _global_names(_unstack(weights))  # a TE MoE layer's norm


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
    first = safe_load(files[min(files)]) if files else {}
    if getattr(first.get("args"), "num_experts", None):  # local experts; EP: mp_rank_TT_EEE
        raise CheckpointError(f"{directory}: a legacy (torch) checkpoint of a mixture of "
                              f"experts (num_experts={first['args'].num_experts}); mp reads "
                              "those in torch_dist: have Megatron-LM load it with "
                              "--ckpt-convert-format torch_dist --ckpt-convert-save DIR")
    if pp > 1:
        raise CheckpointError(f"{directory}: a legacy (torch) checkpoint of {pp} pipeline stages; "
                              "mp reads legacy ones of one stage: have Megatron-LM load it "
                              "with --ckpt-convert-format torch_dist --ckpt-convert-save DIR")
    missing = [t for t in range(tp) if (t, 0) not in files]
    if not files or missing:
        raise CheckpointError(f"{directory} has no mp_rank_TT/{LEGACY_FILE} of tensor-parallel "
                              f"rank(s) {missing or [0]}")
    ranks = [first if t == 0 else safe_load(files[t, 0]) for t in range(tp)]
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
    (a gated unit's, SwiGLU's or quick GeGLU's, ``linear_fc1`` as ``[every gate shard; every up
    shard]``), or the first copy of a replicated one."""
    if key.endswith(_COLUMNS):
        return torch.cat(shards, dim=1)
    if not key.endswith(_ROWS):
        return shards[0]
    if (getattr(args, "swiglu", False) or getattr(args, "quick_geglu", False)) \
            and ".linear_fc1." in key:  # a gated unit's [gate; up]
        halves = [s.chunk(2) for s in shards]
        return torch.cat([h[0] for h in halves] + [h[1] for h in halves])
    return torch.cat(shards)
