"""What a checkpoint holds, key by key, and how a rank's objects map to the keys.

=====================================  ==========================================  ============
key                                    value                                       placed as
=====================================  ==========================================  ============
``model.<name>``                       the parameter (its own dtype)               the parameter
``optimizer.<name>.master``            fp32 master (bf16/fp16 parameters only)     the parameter
``optimizer.<name>.exp_avg``           AdamW's first moment (fp32)                 the parameter
``optimizer.<name>.exp_avg_sq``        AdamW's second moment (fp32)                the parameter
``optimizer.<name>.step``              AdamW's step count (fp32 scalar)            whole
``rng.rank<r>.<generator>``            rank ``r``'s generator (`mp.checkpointing.rng`)  whole
=====================================  ==========================================  ============

``<name>`` is the global parameter name (`mp.checkpointing.naming`). Only the owner of a
parameter writes it (never the tied embedding's ``shared`` copy); every rank that holds a piece
reads it. Weights are the fp32 master when the checkpoint has one: an fp32 model loads the
masters of a bf16 run, and a bf16 model's masters come from an fp32 run's weights.
"""

from __future__ import annotations

import torch

from mp.checkpointing.naming import NamedParameter, Placement
from mp.checkpointing.rng import get_rng_state
from mp.checkpointing.storage import PlacedTensors
from mp.optim import MixedPrecisionOptimizer

MOMENTS = ("exp_avg", "exp_avg_sq")
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


def _masters(optimizer: MixedPrecisionOptimizer, params: list[NamedParameter]
             ) -> dict[str, torch.Tensor]:
    """``{global name: fp32 master}`` (the parameter itself when it is fp32)."""
    main_of = {id(model): main for model, main in zip(optimizer.model_params,
                                                      optimizer.main_params)}
    names = {id(entry.param) for entry in params}
    if any(id(model) not in names for model in optimizer.model_params):
        raise ValueError("the optimizer holds parameters that are not in the model chunks "
                         "passed with it")
    return {entry.name: main_of[id(entry.param)] for entry in params
            if id(entry.param) in main_of}


# --- saving -------------------------------------------------------------------------------

def model_tensors(params: list[NamedParameter]) -> PlacedTensors:
    return {model_key(e.name): (e.param, e.placement) for e in params if e.owner}


def optimizer_tensors(optimizer: MixedPrecisionOptimizer,
                      params: list[NamedParameter]) -> PlacedTensors:
    """Masters and AdamW state of the parameters this rank owns (zeros and step 0 before the
    first step, which is what AdamW starts from)."""
    masters = _masters(optimizer, params)
    tensors: PlacedTensors = {}
    for entry in params:
        main = masters.get(entry.name)
        if main is None or not entry.owner:
            continue
        state = optimizer.optimizer.state.get(main, {})
        for item in MOMENTS:
            tensors[optimizer_key(entry.name, item)] = (
                state.get(item, torch.zeros_like(main)), entry.placement)
        step = state.get("step", torch.zeros((), dtype=torch.float32))
        tensors[optimizer_key(entry.name, "step")] = (step.float(), _STEP)
        if main is not entry.param:
            tensors[optimizer_key(entry.name, "master")] = (main, entry.placement)
    return tensors


def rng_tensors(rank: int) -> PlacedTensors:
    return {rng_prefix(rank) + key: (value, Placement.whole(value))
            for key, value in get_rng_state().items()}


# --- loading ------------------------------------------------------------------------------

class OptimizerTargets:
    """Tensors to read a rank's optimizer state into, and `apply` to hand it to AdamW."""

    def __init__(self, optimizer: MixedPrecisionOptimizer, params: list[NamedParameter],
                 stored: set[str]):
        self.optimizer = optimizer
        self.masters = _masters(optimizer, params)
        self.state = {name: {"step": torch.zeros((), dtype=torch.float32),
                             **{item: torch.zeros_like(main) for item in MOMENTS}}
                      for name, main in self.masters.items()}
        self.tensors: PlacedTensors = {}
        self.half: list[tuple[torch.Tensor, torch.Tensor]] = []
        for entry in params:
            if entry.name not in self.masters:
                continue
            state, main = self.state[entry.name], self.masters[entry.name]
            for item in MOMENTS:
                self.tensors[optimizer_key(entry.name, item)] = (state[item], entry.placement)
            self.tensors[optimizer_key(entry.name, "step")] = (state["step"], _STEP)
            if main is not entry.param:  # the master is read; the parameter copies it
                self.tensors[weight_source(entry.name, stored)] = (main, entry.placement)
                self.half.append((entry.param, main))

    @torch.no_grad()
    def apply(self) -> None:
        """Give the loaded moments and step counts to the inner AdamW (its own
        ``load_state_dict`` places them as its kernels want), and copy the loaded masters
        into their half-precision parameters."""
        inner = self.optimizer.optimizer
        order = {id(p): i for i, p in enumerate(p for g in inner.param_groups
                                                for p in g["params"])}
        state = {order[id(main)]: self.state[name] for name, main in self.masters.items()}
        inner.load_state_dict({"state": state,
                               "param_groups": inner.state_dict()["param_groups"]})
        for param, main in self.half:
            param.copy_(main)


def model_targets(params: list[NamedParameter], stored: set[str]) -> PlacedTensors:
    """Every parameter of this rank, the tied embedding's copy included. (With an optimizer,
    `OptimizerTargets` replaces the targets of half-precision parameters by their masters.)"""
    return {weight_source(e.name, stored): (e.param, e.placement) for e in params}


def rng_targets(rank: int, shapes: dict[str, tuple[torch.Size, torch.dtype]]
                ) -> PlacedTensors:
    """Empty tensors for rank ``rank``'s stored generator states (``shapes``: the stored
    tensors' global shapes and dtypes by key)."""
    prefix = rng_prefix(rank)
    targets: PlacedTensors = {}
    for key, (shape, dtype) in shapes.items():
        if key.startswith(prefix):
            tensor = torch.empty(shape, dtype=dtype)
            targets[key] = (tensor, Placement.whole(tensor))
    return targets


def rng_states(rank: int, targets: PlacedTensors) -> dict[str, torch.Tensor]:
    """The loaded rng targets of rank ``rank`` under `mp.checkpointing.rng`'s keys."""
    prefix = rng_prefix(rank)
    return {key[len(prefix):]: tensor for key, (tensor, _) in targets.items()
            if key.startswith(prefix)}
