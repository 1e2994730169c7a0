"""What a checkpoint holds, key by key, and how a rank's objects map to the keys.

=====================================  ==========================================  ============
key                                    value                                       placed as
=====================================  ==========================================  ============
``model.<name>``                       the parameter (its own dtype)               the parameter
``optimizer.<name>.master``            fp32 master (bf16/fp16 parameters only)     the parameter
``optimizer.<name>.exp_avg``           AdamW's first moment (fp32, note below)     the parameter
``optimizer.<name>.exp_avg_sq``        AdamW's second moment (fp32, note below)    the parameter
``optimizer.<name>.step``              AdamW's step count (fp32 scalar)            whole
``optimizer.<name>.momentum_buffer``   SGD's or Muon's momentum (fp32)             the parameter
``rng.rank<r>.<generator>``            rank ``r``'s generator (`mp.checkpointing.rng`)  whole
=====================================  ==========================================  ============

``<name>`` is the global parameter name (`mp.checkpointing.naming`). Only the owner of a
parameter writes it (never the tied embedding's ``shared`` copy); every rank that holds a piece
reads it. Weights are the fp32 master when the checkpoint has one: an fp32 model loads the
masters of a bf16 run, and a bf16 model's masters come from an fp32 run's weights.

Optimizer entries are written and read per `mp.optim.ParamShard`: a whole parameter, or, under the
distributed optimizer, the flat slice of it this data-parallel rank updates, placed as the
rectangles that tile it (`Placement.of_flat_range`). The global tensors are the same either way, so
a checkpoint loads with or without the distributed optimizer at any data-parallel size.
Under FSDP (`mp.distributed.torch_fsdp2`) a rank holds rows of each parameter: it writes and
reads its weights, masters-to-be and moments as those rows of the same global tensors, so a
checkpoint loads with or without FSDP.
The moments are fp32 even when the precision-aware optimizer keeps them in bf16 or fp16
(`mp.optim.PrecisionAwareAdamW`: ``adam_state`` decodes them, ``load_adam_state`` rounds them
into the loading run's dtypes): fp16 moments are scaled per shard and chunk, so their stored
values would not place on another layout, and any run loads any checkpoint.
Half-precision parameters take their values from the loaded masters (``load_finished``,
which all-gathers them under the distributed optimizer).
"""

from __future__ import annotations

import math

import torch

from mp.checkpointing.errors import CheckpointError
from mp.checkpointing.naming import NamedParameter, Placement
from mp.checkpointing.rng import get_rng_state
from mp.checkpointing.storage import PlacedTensors, placed
from mp.distributed.torch_fsdp2 import dp_shard_range, local_tensor
from mp.optim import MixedPrecisionOptimizer, ParamShard
from mp.optim.update_rules import rule_of_items

_STEP = Placement((), ())


def model_key(name: str) -> str:
    return f"model.{name}"


def optimizer_key(name: str, item: str) -> str:
    return f"optimizer.{name}.{item}"


def rng_prefix(rank: int) -> str:
    return f"rng.rank{rank}."


def weight_source(name: str, stored: set[str]) -> str:
    """The key a weight is read from: the fp32 master when stored, else the model copy."""
    master = optimizer_key(name, "master")
    return master if master in stored else model_key(name)


def _shards(optimizer: MixedPrecisionOptimizer, params: list[NamedParameter]
            ) -> dict[str, list[ParamShard]]:
    """``{global name: this rank's shards of it}`` for every parameter the optimizer holds."""
    names = {id(entry.param): entry.name for entry in params}
    if any(id(param) not in names for param in optimizer.params):
        raise ValueError("the optimizer holds parameters that are not in the model chunks "
                         "passed with it")
    shards = {names[id(param)]: [] for param in optimizer.params}
    for shard in optimizer.shards:
        shards[names[id(shard.param)]].append(shard)
    return shards


def _pieces(values: torch.Tensor, shard: ParamShard, placement: Placement) -> list:
    """``values`` (one per element of ``shard``, shaped like its master) as placed pieces."""
    return _flat_pieces(values, shard.param.shape, shard.start, shard.end, placement)


def _weight(entry: NamedParameter) -> list:
    """The placed pieces of ``entry``'s weight this rank holds: the parameter, or an FSDP
    parameter's rows (its local tensor, `mp.distributed.torch_fsdp2`)."""
    local = local_tensor(entry.param)
    if local is entry.param:
        return placed(entry.param, entry.placement)
    return _flat_pieces(local, entry.param.shape, *dp_shard_range(entry.param),
                        entry.placement)


def _flat_pieces(values: torch.Tensor, shape: torch.Size, start: int, end: int,
                 placement: Placement) -> list:
    """``values``, elements ``[start, end)`` of a tensor of ``shape`` placed at
    ``placement``, as placed pieces (views of ``values``)."""
    flat, pieces, position = values.view(-1), [], 0
    for sizes, box in placement.of_flat_range(shape, start, end):
        count = math.prod(sizes)
        pieces.append((flat[position:position + count].view(sizes), box))
        position += count
    return pieces


# --- saving -------------------------------------------------------------------------------

def model_tensors(params: list[NamedParameter]) -> PlacedTensors:
    return {model_key(e.name): _weight(e) for e in params if e.owner}


def optimizer_tensors(optimizer: MixedPrecisionOptimizer,
                      params: list[NamedParameter]) -> PlacedTensors:
    """Masters and AdamW state of this rank's shards of the parameters it owns (zeros and
    step 0 before the first step, which is what AdamW starts from)."""
    shards = _shards(optimizer, params)
    tensors: PlacedTensors = {}
    for entry in params:
        if not entry.owner:
            continue
        for shard in shards.get(entry.name, ()):
            for item, value in optimizer.shard_state(shard).items():
                tensors.setdefault(optimizer_key(entry.name, item), []).extend(
                    placed(value, _STEP) if item == "step"
                    else _pieces(value, shard, entry.placement))
            if not shard.main_is_param:
                tensors.setdefault(optimizer_key(entry.name, "master"), []).extend(
                    _pieces(shard.main, shard, entry.placement))
    return tensors


def rng_tensors(rank: int) -> PlacedTensors:
    return {rng_prefix(rank) + key: placed(value, Placement.whole(value))
            for key, value in get_rng_state().items()}


# --- loading ------------------------------------------------------------------------------

class OptimizerTargets:
    """Tensors to read a rank's optimizer state into, and `apply` to hand it to AdamW. With
    ``adam_state=False`` only the fp32 masters are read (the stored weights), and AdamW's
    moments and step counts stay as they are."""

    def __init__(self, optimizer: MixedPrecisionOptimizer, params: list[NamedParameter],
                 stored: set[str], adam_state: bool = True):
        self.optimizer = optimizer
        self.state: dict[ParamShard, dict] | None = {} if adam_state else None
        self.tensors: PlacedTensors = {}
        shards = _shards(optimizer, params)
        if adam_state:
            _check_update_rule(optimizer, stored)
        for entry in params:
            if entry.name not in shards:
                continue
            if entry.param.dtype != torch.float32:  # the masters are read, not the weight
                self.tensors[weight_source(entry.name, stored)] = []
            for shard in shards[entry.name]:
                if self.state is not None:
                    self._read_adam_state(entry, shard)
                if not shard.main_is_param:
                    self.tensors[weight_source(entry.name, stored)].extend(
                        _pieces(shard.main, shard, entry.placement))

    def _read_adam_state(self, entry: NamedParameter, shard: ParamShard) -> None:
        state = self.state[shard] = {}
        for item in self.optimizer.state_items(shard):
            if item == "step":
                state[item] = torch.zeros((), dtype=torch.float32)
                self.tensors[optimizer_key(entry.name, item)] = placed(state[item], _STEP)
            else:
                state[item] = torch.zeros_like(shard.main)
                self.tensors.setdefault(optimizer_key(entry.name, item), []).extend(
                    _pieces(state[item], shard, entry.placement))

    @torch.no_grad()
    def apply(self) -> None:
        """Give the loaded moments and step counts to AdamW (when read), and refresh the
        half-precision parameters from the loaded masters."""
        if self.state is not None:
            self.optimizer.load_shard_state(self.state)
        self.optimizer.load_finished()


def _check_update_rule(optimizer: MixedPrecisionOptimizer, stored: set[str]) -> None:
    """Refuse a checkpoint whose optimizer state is another update rule's (AdamW's moments,
    SGD's momentum, or Muon's both), on every rank alike (they all hold the same keys)."""
    items = {key.rsplit(".", 1)[1] for key in stored if key.startswith("optimizer.")}
    saved = rule_of_items(items - {"master"})
    mine = optimizer.update_rule
    if saved is not None and saved != mine:
        raise CheckpointError(f"the checkpoint holds optimizer state of --optimizer {saved}, but "
                              f"this run's optimizer is {mine}: resume with --optimizer {saved}, "
                              "or without its optimizer state (--no-load-optim)")


def model_targets(params: list[NamedParameter], stored: set[str]) -> PlacedTensors:
    """Every parameter of this rank, the tied embedding's copy included. (With an optimizer,
    `OptimizerTargets` replaces the targets of half-precision parameters by their masters.)"""
    return {weight_source(e.name, stored): _weight(e) for e in params}


def rng_targets(rank: int, shapes: dict[str, tuple[torch.Size, torch.dtype]]
                ) -> PlacedTensors:
    """Empty tensors for rank ``rank``'s stored generator states (``shapes``: the stored
    tensors' global shapes and dtypes by key)."""
    prefix = rng_prefix(rank)
    targets: PlacedTensors = {}
    for key, (shape, dtype) in shapes.items():
        if key.startswith(prefix):
            tensor = torch.empty(shape, dtype=dtype)
            targets[key] = placed(tensor, Placement.whole(tensor))
    return targets


def rng_states(rank: int, targets: PlacedTensors) -> dict[str, torch.Tensor]:
    """The loaded rng targets of rank ``rank`` under `mp.checkpointing.rng`'s keys."""
    prefix = rng_prefix(rank)
    return {key[len(prefix):]: pieces[0][0] for key, pieces in targets.items()
            if key.startswith(prefix)}
