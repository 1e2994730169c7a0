"""Save and load a training job's state: atomically, verified, at any parallel layout.

``save_checkpoint`` and ``load_checkpoint`` are collective over the default process group:
every rank calls them with its own model chunks and optimizer. Each rank writes only what it
holds (DCP, `mp.checkpointing.storage`), so no rank ever holds the whole model. A checkpoint is
laid out on disk as `mp.checkpointing.files` describes; its tensors as
`mp.checkpointing.state` lists; ``meta.json`` holds the rest as plain JSON::

    {"format": "mp-checkpoint", "version": 1, "iteration": 40,
     "consumed_train_samples": 640, "has_optimizer": true, "has_rng": true,
     "layout": {"world_size": 4, "tensor_model_parallel_size": 2, ...},
     "model": {TransformerConfig's fields}, "config": {the job's resolved config} | null,
     "scheduler": {OptimizerParamScheduler.state_dict()} | null,
     "grad_scaler": {the loss scaler's state_dict()} | null}

Loading first checks every file against the manifest (the ranks share the hashing) and
every key and global shape against the model, and agrees across ranks on the outcome: a
damaged or mismatched checkpoint raises the same error on every rank before anything is
read. Model and optimizer state load at any layout whose padded vocabulary matches; the RNG
states are restored only at the layout that wrote them (``CheckpointInfo.rng_restored``).
A checkpoint may leave out the optimizer state (``optimizer=None``: Megatron's
``--no-save-optim``) or the RNG states (``save_rng=False``: ``--no-save-rng``); one without RNG
states restores none when loaded.

``save_global_model`` / ``load_global_model`` write and read whole, unsharded weights in one
process (conversion tools); their checkpoints load at any layout like the others.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from mp import parallel_state
from mp.checkpointing.errors import CheckpointError, CorruptCheckpointError
from mp.checkpointing.files import (
    META_FILE,
    Retention,
    check_files,
    read_manifest,
    resolve_checkpoint,
)
from mp.checkpointing.fit import architecture_problems, target_problems
from mp.checkpointing.naming import Placement, named_parameters, unwrap
from mp.checkpointing.rng import set_rng_state
from mp.checkpointing.saving import Ranks, begin_save, describe_share, finish_save
from mp.checkpointing.state import (
    OptimizerTargets,
    model_key,
    model_targets,
    model_tensors,
    optimizer_tensors,
    rng_states,
    rng_targets,
    rng_tensors,
    weight_source,
)
from mp.checkpointing.storage import (
    METADATA_FILE,
    PlacedTensors,
    placed,
    read_metadata,
    read_tensors,
    tensor_entries,
    write_tensors,
)
from mp.distributed import finish_param_sync
from mp.model.config import TransformerConfig
from mp.optim import MixedPrecisionOptimizer, OptimizerParamScheduler

FORMAT, VERSION = "mp-checkpoint", 1

@dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint holds (`read_checkpoint_info`) or `load_checkpoint` loaded."""

    path: Path  # the checkpoint directory (iter_NNNNNNN)
    iteration: int
    consumed_train_samples: int
    config: dict | None  # the job's resolved config (JobConfig.to_dict form), if it saved one
    model_config: dict  # TransformerConfig's fields at save time
    layout: dict | None  # the parallel layout that wrote it (None: a single-process tool)
    has_optimizer: bool
    has_rng: bool  # it holds every rank's RNG states
    rng_restored: bool


def current_layout() -> dict:
    """The parallel layout of this job (part of ``meta.json``)."""
    return {"world_size": dist.get_world_size(),
            "tensor_model_parallel_size": parallel_state.get_tensor_model_parallel_world_size(),
            "pipeline_model_parallel_size":
                parallel_state.get_pipeline_model_parallel_world_size(),
            "virtual_pipeline_model_parallel_size":
                parallel_state.get_virtual_pipeline_model_parallel_world_size(),
            "context_parallel_size": parallel_state.get_context_parallel_world_size(),
            "data_parallel_size": parallel_state.get_data_parallel_world_size()}


def _chunks(model: nn.Module | Sequence[nn.Module]) -> list[nn.Module]:
    return [model] if isinstance(model, nn.Module) else list(model)


# --- saving -------------------------------------------------------------------------------

def _save(ranks: Ranks, save_dir: str | Path, iteration: int, tensors: PlacedTensors,
          meta: dict, retention: Retention) -> Path:
    staging = begin_save(ranks, save_dir, iteration, meta)
    write_tensors(staging, tensors, distributed=ranks.distributed)
    return finish_save(ranks, save_dir, iteration, retention, describe_share(ranks, staging))


def save_checkpoint(save_dir: str | Path, iteration: int,
                    model: nn.Module | Sequence[nn.Module],
                    optimizer: MixedPrecisionOptimizer | None = None,
                    scheduler: OptimizerParamScheduler | None = None, *,
                    consumed_train_samples: int = 0, config: dict | None = None,
                    keep_last: int | None = None, retain_interval: int | None = None,
                    save_rng: bool = True) -> Path:
    """Write ``save_dir/iter_<iteration>`` and make it the latest; return its path.

    ``model`` is this rank's chunk or list of chunks (`DistributedDataParallel`-wrapped or
    not); ``config`` the job's resolved config (``JobConfig.to_dict()``), stored for the
    record. Without ``optimizer`` the checkpoint holds no optimizer state (half-precision
    weights then only in their own dtype), without ``scheduler`` no schedule, and with
    ``save_rng=False`` no RNG states. Once this one is committed, ``keep_last`` deletes all
    but the newest ``keep_last`` checkpoints, ``retain_interval`` all but the newest and those
    of the iterations it divides (both: those and the newest ``keep_last``; `Retention`).
    Collective: every rank calls it. Returns after the
    commit on every rank.
    """
    retention = Retention(keep_last, retain_interval)
    tensors, meta = job_state(model, optimizer, scheduler, iteration=iteration,
                              consumed_train_samples=consumed_train_samples, config=config,
                              save_rng=save_rng)
    return _save(Ranks(distributed=True), save_dir, iteration, tensors, meta, retention)


def job_state(model: nn.Module | Sequence[nn.Module],
              optimizer: MixedPrecisionOptimizer | None,
              scheduler: OptimizerParamScheduler | None, *, iteration: int,
              consumed_train_samples: int, config: dict | None,
              save_rng: bool) -> tuple[PlacedTensors, dict]:
    """What `save_checkpoint` writes (its arguments): this rank's placed tensors, once the
    parameter all-gathers in flight have landed, and ``meta.json``'s contents."""
    chunks = _chunks(model)
    finish_param_sync(chunks)
    params = named_parameters(chunks)
    tensors = model_tensors(params)
    if optimizer is not None:
        tensors.update(optimizer_tensors(optimizer, params))
    if save_rng:
        tensors.update(rng_tensors(dist.get_rank()))
    scaler = None if optimizer is None else optimizer.grad_scaler
    meta = {"format": FORMAT, "version": VERSION, "iteration": iteration,
            "consumed_train_samples": consumed_train_samples,
            "has_optimizer": optimizer is not None, "has_rng": save_rng,
            "layout": current_layout(),
            "model": dataclasses.asdict(unwrap(chunks[0]).config), "config": config,
            "scheduler": None if scheduler is None else scheduler.state_dict(),
            "grad_scaler": None if scaler is None else scaler.state_dict()}
    return tensors, meta


def save_global_model(save_dir: str | Path, model_config: TransformerConfig,
                      weights: dict[str, torch.Tensor], *, iteration: int = 0) -> Path:
    """Write whole weights ``{global name: tensor}`` as a model-only checkpoint, from one
    process (no process group needed). Loads at any layout with ``load_checkpoint``."""
    tensors = {model_key(name): placed(tensor, Placement.whole(tensor))
               for name, tensor in weights.items()}
    meta = {"format": FORMAT, "version": VERSION, "iteration": iteration,
            "consumed_train_samples": 0, "has_optimizer": False, "has_rng": False,
            "layout": None,
            "model": dataclasses.asdict(model_config), "config": None, "scheduler": None,
            "grad_scaler": None}
    return _save(Ranks(distributed=False), save_dir, iteration, tensors, meta, Retention())


# --- loading ------------------------------------------------------------------------------

def _verify(ranks: Ranks, directory: Path) -> None:
    """Every file against the manifest, hashing shared over the ranks."""
    manifest = read_manifest(directory)
    missing = [name for name in (META_FILE, METADATA_FILE) if name not in manifest]
    if missing:
        raise CorruptCheckpointError(f"{directory}: the manifest lists no {', '.join(missing)}")
    names = sorted(manifest)
    ranks.agree(check_files(directory, manifest, names[ranks.rank::ranks.world]),
                CorruptCheckpointError, f"checkpoint {directory} is damaged; nothing was loaded")


def _read_meta(directory: Path) -> dict:
    path = directory / META_FILE
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not an mp checkpoint's metadata")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"{path} has format version {meta.get('version')!r}; this mp "
                              f"reads version {VERSION}")
    meta.setdefault("has_rng", meta["layout"] is not None)  # older ones: a job's always did
    if meta["layout"] is not None:  # older ones were written without context parallelism
        meta["layout"].setdefault("context_parallel_size", 1)
    return meta


def _info(directory: Path, meta: dict, rng_restored: bool) -> CheckpointInfo:
    return CheckpointInfo(directory, meta["iteration"], meta["consumed_train_samples"],
                          meta["config"], meta["model"], meta["layout"], meta["has_optimizer"],
                          meta["has_rng"], rng_restored)


def read_checkpoint_info(path: str | Path) -> CheckpointInfo:
    """What a checkpoint (or a save directory's latest) holds, from its ``meta.json`` alone
    (nothing is verified or loaded)."""
    directory = resolve_checkpoint(path)
    return _info(directory, _read_meta(directory), False)


def _scheduler_problems(scheduler: OptimizerParamScheduler, saved: dict | None) -> list[str]:
    """The schedule's settings against the saved ones (its step count is what loads), as
    its resume flags allow (`OptimizerParamScheduler.mismatches`)."""
    if saved is None:
        return ["it holds no learning-rate schedule"]
    return scheduler.mismatches(saved)


def load_checkpoint(path: str | Path, model: nn.Module | Sequence[nn.Module],
                    optimizer: MixedPrecisionOptimizer | None = None,
                    scheduler: OptimizerParamScheduler | None = None, *,
                    load_rng: bool = True, load_optimizer_state: bool = True
                    ) -> CheckpointInfo:
    """Load a checkpoint into this rank's chunks, optimizer and schedule; collective.

    ``path`` is a checkpoint directory or a save directory (its latest checkpoint). With
    ``load_optimizer_state=False`` (a model-only checkpoint needs that, fine-tuning wants it)
    the weights go into the model and into ``optimizer``'s fp32 masters, at full precision,
    and AdamW's moments and step counts stay fresh. Without ``optimizer`` only the model is
    loaded; an optimizer built earlier then holds stale fp32 masters: call its
    ``reload_model_params()``. The RNG states are restored when ``load_rng``, the checkpoint
    holds them and the layout is the saving one. Raises
    `CorruptCheckpointError` or `CheckpointError` on every rank, before reading any tensor,
    when a file is damaged or the checkpoint does not fit.
    """
    ranks = Ranks(distributed=True)
    directory = resolve_checkpoint(path)
    _verify(ranks, directory)
    meta = _read_meta(directory)
    chunks = _chunks(model)
    config = unwrap(chunks[0]).config
    entries = tensor_entries(read_metadata(directory))
    stored = set(entries)
    params = named_parameters(chunks)
    problems = architecture_problems(meta["model"], config)
    targets = model_targets(params, stored)
    optimizer_targets = None
    if optimizer is not None:
        if load_optimizer_state and not meta["has_optimizer"]:
            problems.append("it holds no optimizer state (a model-only checkpoint): load it "
                            "with load_optimizer_state=False")
        else:
            optimizer_targets = OptimizerTargets(optimizer, params, stored, load_optimizer_state)
            targets.update(optimizer_targets.tensors)
    if scheduler is not None:
        problems += _scheduler_problems(scheduler, meta["scheduler"])
    restore_rng = load_rng and meta["has_rng"] and meta["layout"] == current_layout()
    if restore_rng:
        shapes = {key: (entry.size, entry.properties.dtype) for key, entry in entries.items()}
        targets.update(rng_targets(ranks.rank, shapes))
        if not rng_states(ranks.rank, targets):
            problems.append(f"it holds no RNG state for rank {ranks.rank}")
    problems += target_problems(targets, entries, config, directory)
    ranks.agree(problems, CheckpointError, f"cannot load {directory} into this model")
    read_tensors(directory, targets, distributed=True)
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if optimizer_targets is not None:
        optimizer_targets.apply()
        finish_param_sync(chunks)
        if load_optimizer_state and optimizer.grad_scaler is not None \
                and meta["grad_scaler"] is not None:
            optimizer.grad_scaler.load_state_dict(meta["grad_scaler"])
    if restore_rng:
        set_rng_state(rng_states(ranks.rank, targets))
    return _info(directory, meta, restore_rng)


def load_global_model(path: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """The whole weights ``{global name: tensor}`` of a checkpoint (fp32 masters where it
    has them), verified, in one process; for tools. Holds the entire model in memory."""
    ranks = Ranks(distributed=False)
    directory = resolve_checkpoint(path)
    _verify(ranks, directory)
    meta = _read_meta(directory)
    entries = tensor_entries(read_metadata(directory))
    stored, prefix = set(entries), model_key("")
    weights: dict[str, torch.Tensor] = {}
    targets: PlacedTensors = {}
    for key in entries:
        if key.startswith(prefix):
            source = weight_source(key[len(prefix):], stored)
            tensor = torch.empty(entries[source].size, dtype=entries[source].properties.dtype)
            weights[key[len(prefix):]] = tensor
            targets[source] = placed(tensor, Placement.whole(tensor))
    read_tensors(directory, targets, distributed=False)
    return weights, _info(directory, meta, False)
