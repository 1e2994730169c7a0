"""The phases of writing a checkpoint, and the collectives they take: `Ranks` (over the
default group, or one process alone), `begin_save` (the staging directory and its
``meta.json``), `describe_share` (this rank's share of the manifest) and `finish_save` (the
manifest, the atomic commit, the stale checkpoints' removal). A synchronous save
(`mp.checkpointing.checkpoint`) runs them back to back around writing the tensors; an
asynchronous one (`mp.checkpointing.async_save`) writes and describes in the background and
finishes later.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from mp.checkpointing.errors import CheckpointError
from mp.checkpointing.files import (
    META_FILE,
    Retention,
    checkpoint_dir,
    commit,
    content_files,
    describe_files,
    read_latest,
    remove_stale,
    staging_dir,
    write_manifest,
    write_text_atomically,
)


class Ranks:
    """The collectives save and load need, over the default group or within one process."""

    def __init__(self, distributed: bool):
        self.distributed = distributed
        self.rank = dist.get_rank() if distributed else 0
        self.world = dist.get_world_size() if distributed else 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def gather(self, value) -> list:
        """Every rank's ``value`` (picklable), on every rank."""
        if not self.distributed:
            return [value]
        values = [None] * self.world
        dist.all_gather_object(values, value)
        return values

    def agree(self, problems: list[str], error: type[CheckpointError], headline: str) -> None:
        """Raise ``error`` on every rank when any rank found a problem."""
        found = sorted({p for part in self.gather(problems) for p in part})
        if found:
            raise error(headline + ":\n  " + "\n  ".join(found))



def begin_save(ranks: Ranks, save_dir: str | Path, iteration: int, meta: dict) -> Path:
    """Check the arguments, make the staging directory and write ``meta.json`` into it (rank
    0); return it once every rank may write there."""
    if not isinstance(iteration, int) or iteration < 0:
        raise ValueError(f"iteration={iteration!r} must be a non-negative integer")
    save_dir = Path(save_dir)
    if read_latest(save_dir) == iteration:
        raise CheckpointError(f"iteration {iteration} is already the latest checkpoint in "
                              f"{save_dir}; refusing to overwrite it")
    staging = staging_dir(save_dir, iteration)
    if ranks.rank == 0:
        save_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(staging, ignore_errors=True)  # left by a save that crashed
        staging.mkdir()
        write_text_atomically(staging / META_FILE, json.dumps(meta, indent=1))
    ranks.barrier()
    return staging


def describe_share(ranks: Ranks, staging: Path) -> dict[str, dict]:
    """This rank's share of the manifest: size and SHA-256 of every ``ranks.world``-th file
    of the finished staging directory (hashing spread over the ranks; no collective)."""
    names = content_files(staging)
    return describe_files(staging, names[ranks.rank::ranks.world])


def finish_save(ranks: Ranks, save_dir: str | Path, iteration: int, retention: Retention,
                described: dict[str, dict]) -> Path:
    """Gather the manifest's shares (``described``: `describe_share`), then on rank 0 write
    it, commit the staging directory and remove the checkpoints ``retention`` does not keep;
    return the checkpoint's
    path on every rank once it is committed."""
    save_dir = Path(save_dir)
    shares = ranks.gather(described)
    if ranks.rank == 0:
        write_manifest(staging_dir(save_dir, iteration),
                       {k: v for part in shares for k, v in part.items()})
        commit(save_dir, iteration)
        remove_stale(save_dir, iteration, retention)
    ranks.barrier()
    return checkpoint_dir(save_dir, iteration)
