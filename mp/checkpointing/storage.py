"""Placed tensors to and from a ``torch.distributed.checkpoint`` (DCP) directory.

DCP stores every tensor as chunks of a global tensor, each chunk with its offsets, and reads
back any region of the global tensor from whichever chunks overlap it. So a rank writes its
shard of ``decoder.layers.3.mlp.linear_fc1.weight`` at its offset, and a rank of another layout
reads its own (other) region of the same global tensor. DCP's planners expect DTensors for
that; ``mp``'s parameters are plain tensors carrying their placement, so two small planners
say where each tensor lies (`mp.checkpointing.naming.Placement`). Replicated tensors that
several ranks pass under one key are written once: DCP keeps one copy of identical chunks and
spreads those writes over the ranks that hold them.

Reading is safe: tensor data goes through ``torch.load(weights_only=True)`` (DCP's own reader),
and the ``.metadata`` index, which DCP pickles, is read with an unpickler that only builds
DCP's metadata classes, ``torch.Size`` and dtypes (Python's "restricting globals" recipe).
"""

from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from mp.checkpointing.errors import CheckpointError
from mp.checkpointing.naming import Placement

METADATA_FILE = ".metadata"  # DCP's index of keys, shapes, chunks and where they are stored

#: ``{key: [(local tensor, its placement in the key's global tensor), ...]}``: usually one
#: piece per key; a piece per rectangle when a rank holds a flat slice of a tensor (the
#: distributed optimizer's shards, `mp.checkpointing.state`).
PlacedTensors = dict[str, list[tuple[torch.Tensor, Placement]]]


def placed(tensor: torch.Tensor, placement: Placement) -> list[tuple[torch.Tensor, Placement]]:
    """One piece: ``tensor`` at ``placement``."""
    return [(tensor, placement)]


def _pieces(tensors: PlacedTensors):
    """``(key, index, tensor, placement)`` of every piece."""
    for key, pieces in tensors.items():
        for index, (tensor, placement) in enumerate(pieces):
            yield key, index, tensor, placement


def _write_item(key: str, tensor: torch.Tensor, placement: Placement) -> WriteItem:
    offsets = torch.Size(placement.offsets)
    whole = placement.global_shape == tuple(tensor.shape)
    return WriteItem(
        index=MetadataIndex(key, offsets),
        type=WriteItemType.TENSOR if whole else WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(offsets=offsets, sizes=tensor.size()),
            properties=TensorProperties.create_from_tensor(tensor),
            size=torch.Size(placement.global_shape)))


class _PlacedSavePlanner(DefaultSavePlanner):
    """Writes each piece as the chunk its `Placement` names (DCP's deduplication and
    global-plan checks, which reject chunks that overlap or leave holes, stay on)."""

    def __init__(self, tensors: PlacedTensors):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._items = [_write_item(key, tensor, placement)
                       for key, _, tensor, placement in _pieces(tensors)]
        self._by_chunk = {(key, tuple(placement.offsets)): tensor.detach()
                          for key, _, tensor, placement in _pieces(tensors)}

    def create_local_plan(self) -> SavePlan:
        self.plan = SavePlan(self._items)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> torch.Tensor:
        return self._by_chunk[index.fqn, tuple(index.offset)]


class _PlacedLoadPlanner(DefaultLoadPlanner):
    """Reads into each piece the region of the global tensor its `Placement` names."""

    def __init__(self, tensors: PlacedTensors):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._tensors = tensors

    def create_local_plan(self) -> LoadPlan:
        items = []
        for key, pieces in self._tensors.items():
            chunks = [ChunkStorageMetadata(offsets=torch.Size(placement.offsets),
                                           sizes=tensor.size()) for tensor, placement in pieces]
            items += create_read_items_for_chunk_list(
                key, self.metadata.state_dict_metadata[key], chunks)
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        return self._tensors[index.fqn][index.index][0].detach()

    def load_bytes(self, read_item, value) -> None:
        raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn!r} is pickled bytes; "
                              "mp checkpoints hold tensors only and never unpickle objects")


_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata", "TensorStorageMetadata", "BytesStorageMetadata", "ChunkStorageMetadata",
        "TensorProperties", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING"},
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch.serialization": {"_get_layout"},
    "torch": {"Size"},
    "pathlib": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "pathlib._local": {"PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
}


class MetadataUnpickler(pickle.Unpickler):
    """Builds DCP's metadata and nothing else."""

    def find_class(self, module: str, name: str):
        allowed = name in _METADATA_CLASSES.get(module, ()) or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype))
        if not allowed:
            raise pickle.UnpicklingError(f"{module}.{name} is not allowed in checkpoint metadata")
        return super().find_class(module, name)


def read_metadata(directory: str | Path) -> Metadata:
    """DCP's index of ``directory``, read without unpickling arbitrary objects."""
    path = Path(directory) / METADATA_FILE
    try:
        with open(path, "rb") as file:
            metadata = MetadataUnpickler(file).load()
    except (OSError, EOFError, pickle.UnpicklingError, AttributeError, TypeError,
            ValueError) as error:
        raise CheckpointError(f"cannot read checkpoint index {path}: {error}") from error
    if not isinstance(metadata, Metadata):
        raise CheckpointError(f"checkpoint index {path} holds a {type(metadata).__name__}, "
                              "not DCP metadata")
    return metadata


class _SafeReader(FileSystemReader):
    """DCP's file reader with `read_metadata`'s restricted unpickler."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_metadata(self.path)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


@contextlib.contextmanager
def _single_process(distributed: bool):
    """Silence DCP's warning that it "assumes" one process: without ``distributed`` that is
    what was asked for."""
    with warnings.catch_warnings():
        if not distributed:
            warnings.filterwarnings("ignore", message="torch.distributed is disabled",
                                    category=UserWarning)
        yield


def _by_piece(tensors: PlacedTensors) -> dict[str, torch.Tensor]:
    """The flat ``{key#index: tensor}`` DCP is handed (the planners place the pieces)."""
    return {f"{key}#{index}": tensor.detach() for key, index, tensor, _ in _pieces(tensors)}


def write_tensors(directory: str | Path, tensors: PlacedTensors, *, distributed: bool,
                  group: dist.ProcessGroup | None = None) -> None:
    """Write every piece of ``tensors`` into ``directory`` (one data file per rank, each
    fsynced): collective over ``group`` (default: the default group) when ``distributed``,
    else this process alone. Every rank returns once every rank's files and the index are
    written."""
    with _single_process(distributed):
        dcp.save(_by_piece(tensors),
                 storage_writer=FileSystemWriter(directory, single_file_per_rank=True,
                                                 sync_files=True),
                 planner=_PlacedSavePlanner(tensors), no_dist=not distributed,
                 process_group=group)


def snapshot(tensors: PlacedTensors) -> PlacedTensors:
    """``tensors`` copied to CPU memory (what an asynchronous save writes while training
    changes the originals)."""
    return {key: [(tensor.detach().to("cpu", copy=True), placement)
                  for tensor, placement in pieces] for key, pieces in tensors.items()}


def tensor_entries(metadata: Metadata) -> dict[str, TensorStorageMetadata]:
    """The tensor entries of a checkpoint index (it holds nothing else when mp wrote it)."""
    entries = {}
    for key, entry in metadata.state_dict_metadata.items():
        if not isinstance(entry, TensorStorageMetadata):
            raise CheckpointError(f"checkpoint entry {key!r} is not a tensor; mp checkpoints "
                                  "hold tensors only")
        entries[key] = entry
    return entries


def read_tensors(directory: str | Path, targets: PlacedTensors, *, distributed: bool) -> None:
    """Fill each target piece with its region of the stored global tensor (casting dtypes).
    The caller checks first that every key exists with the expected global shape.
    Collective like `write_tensors`."""
    with _single_process(distributed):
        dcp.load(_by_piece(targets), storage_reader=_SafeReader(directory),
                 planner=_PlacedLoadPlanner(targets), no_dist=not distributed)
