"""Asynchronous saves (Megatron's ``--async-save``): training goes on while a checkpoint is
written.

`AsyncSave` takes what `mp.checkpointing.checkpoint.job_state` gives (the tensors, the
parameter all-gathers in flight landed first, and ``meta.json``) on the training thread,
copies every tensor to CPU memory (`storage.snapshot`) and makes the staging directory and
its ``meta.json`` (`saving.begin_save`). A
background thread on every rank then writes the copies (DCP, collective over a gloo group of
its own, `parallel_state.get_checkpoint_writer_group`, so that it never interleaves with
training's collectives) and hashes its share of
the files. `poll` (after every iteration) asks all ranks, over the default group, whether
their thread is done; once all are, the manifest is written and the checkpoint committed
(`saving.finish_save`), the same atomic commit a synchronous save ends with, so a job
that dies with a save in flight keeps its previous checkpoint, and the staging directory is
garbage the next save removes. `finish` waits for the thread, then commits.

The copy costs the checkpoint's size in host memory until the write is done; a save that
starts while another is in flight first waits for it (there is at most one).
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch
import torch.distributed as dist

from mp import parallel_state
from mp.checkpointing.errors import CheckpointError
from mp.checkpointing.files import Retention
from mp.checkpointing.saving import Ranks, begin_save, describe_share, finish_save
from mp.checkpointing.storage import PlacedTensors, snapshot, write_tensors


class AsyncSave:
    """One checkpoint being written (module doc). Collective: every rank creates it, and
    calls `poll` and `finish`, at the same points."""

    def __init__(self, save_dir: str | Path, iteration: int, tensors: PlacedTensors,
                 meta: dict, retention: Retention):
        self.ranks = Ranks(distributed=True)
        self.save_dir, self.iteration, self.retention = save_dir, iteration, retention
        copies = snapshot(tensors)
        staging = begin_save(self.ranks, save_dir, iteration, meta)
        self.group = parallel_state.get_checkpoint_writer_group()
        self.described: dict[str, dict] | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._write, args=(staging, copies),
                                       name=f"mp-save-{iteration}", daemon=True)
        self.thread.start()

    def _write(self, staging: Path, copies: PlacedTensors) -> None:
        try:
            write_tensors(staging, copies, distributed=True, group=self.group)
            self.described = describe_share(self.ranks, staging)
        except BaseException as error:  # reported by `finish` on every rank
            self.error = error

    def poll(self) -> Path | None:
        """Commit the checkpoint if every rank's write is done; its path then, else None."""
        done = torch.tensor([0 if self.thread.is_alive() else 1])
        dist.all_reduce(done, op=dist.ReduceOp.MIN)
        return self.finish() if done.item() else None

    def finish(self) -> Path:
        """Wait for this rank's write, then commit (every rank raises if any rank's write
        failed); the committed checkpoint's path."""
        self.thread.join()
        self.ranks.agree([] if self.error is None else [f"rank {self.ranks.rank}: "
                                                         f"{self.error!r}"],
                         CheckpointError, f"the asynchronous save of iteration "
                         f"{self.iteration} failed; the previous checkpoint stands")
        return finish_save(self.ranks, self.save_dir, self.iteration, self.retention,
                           self.described)
