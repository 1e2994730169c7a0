"""What the training loop reports, on one rank: a line every ``log_interval`` iterations,
validation and test results, TensorBoard scalars and the progress bar.

The line (values over the interval since the last line; losses and times averaged)::

    iteration 20/300 | consumed samples 320 | global batch size 16 | lm loss 3.1734E+00 |
    lr 6.667E-04 | grad norm 0.912 | loss scale 1 | 403.1 ms/iter | 5081 tokens/s |
    0.01 TFLOP/s/GPU | MFU - | peak mem 371 MiB

(on one line; the global batch size is the last iteration's, which changes only under
``training.rampup_batch_size``; rates count the interval's own samples; a mixture-of-experts
model's ``load_balancing_loss`` and ``z_loss`` follow the lm loss (each layer's,
``moe/{name}_layer_{i}``, go to TensorBoard and W&B only); with
``training.decoupled_lr`` the embedding's and output layer's rate follows the lr as
``decoupled lr X``; with ``logging.log_num_zeros_in_grad`` / ``log_params_norm``, the last
iteration's ``num zeros N`` / ``params norm X`` follow the grad norm). TFLOP/s per GPU counts
recomputed work (Narayanan et al. 2021, eq. 3); MFU divides the model's own FLOPs (no recompute) by
the device's dense bf16 peak ("-" on the CPU or an unknown GPU). Peak memory is CUDA's max
allocated, or the process's max RSS on the CPU. Evaluation time is left out of ms/iter.

Scalars go to TensorBoard (``logging.tensorboard_dir``, from the reporting rank, which holds
up to ``logging.tensorboard_queue_size`` events before writing them out) and to Weights &
Biases (``logging.wandb_project``, from the last rank, as in Megatron), at Megatron's steps:
the iteration's own losses, ``learning-rate``, ``batch-size``, ``grad-norm``, ``loss-scale``
and ``peak-memory-bytes`` (and ``decoupled-learning-rate``, ``num-zeros``, ``params-norm``,
``world-size`` when asked for)
every ``logging.tensorboard_log_interval`` iterations; the interval's ``iteration-time-ms``,
``tokens-per-second``, ``tflops-per-gpu``, ``mfu`` and ``skipped-iterations`` with each line.
Evaluations write ``validation lm loss`` / ``test lm loss`` and their ``... PPL`` (Megatron
writes both splits under ``lm loss validation``, the test point overwriting the validation one
at the same step; mp keeps them apart), except under ``training.skip_train`` (as in Megatron:
an evaluation-only run adds no points to the training run's curves). With
``data.multiple_validation_sets`` each validation set ``i`` (in ``data.valid_data_path`` order)
gets Megatron's line ``validation-<i> loss at iteration N | lm loss value: X | lm loss PPL: Y |``
and Megatron's scalars ``lm loss validation-<i>`` and ``lm loss validation-<i> ppl`` (Megatron
writes the latter with ``--log-validation-ppl-to-tensorboard``; mp always does, as for the
single validation split). The W&B rank starts a run
of ``wandb_entity`` (a team or user; None: W&B's default) named ``wandb_exp_name`` (None: W&B
picks one) in ``wandb_save_dir`` (default
``<training.save>/wandb`` as in Megatron, else W&B's own default), with the resolved job config
as its config, and finishes it at the end. Without ``wandb`` installed (``pip install wandb``,
mp's ``wandb`` extra) it says so in one line and the job runs. When ``wandb.init`` fails there
(no login, no network), every rank raises before training starts, the W&B rank with W&B's
reason, the others naming that rank (`open_wandb_everywhere`).

With ``logging.record_memory_history`` (Megatron's ``--record-memory-history``) on CUDA,
`record_memory_history` (called by `mp.training.pretrain.pretrain` before the model is built,
where Megatron's ``model_provider`` does) starts CUDA's allocator history on every rank
(``torch.cuda.memory._record_memory_history``, the last 100000 events with their stacks) and
attaches an out-of-memory observer that dumps the rank's snapshot to
``oom_rank-<rank>_<name>`` beside ``logging.memory_snapshot_path`` (Megatron prefixes the whole
path, which breaks one with a directory); the last rank dumps the snapshot
(``torch.cuda.memory._dump_snapshot``) to ``memory_snapshot_path`` with each log line, as
Megatron's ``training_log`` does (the dump is left out of ms/iter). Open it at
https://pytorch.org/memory_viz. On the CPU there is no such history: rank 0 says so in one line
and nothing else happens.
"""

from __future__ import annotations

import math
import os
import resource
import sys
import time

import torch
import torch.distributed as dist

from mp.config import JobConfig
from mp.training.flops import num_floating_point_operations, peak_tflops
from mp.training.progress import ProgressBar


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA's max allocated bytes on ``device``; on the CPU the process's max resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, KiB on Linux


def record_memory_history(cfg: JobConfig, device: torch.device) -> bool:
    """Start recording CUDA's allocator history and attach the out-of-memory dump when
    ``logging.record_memory_history`` asks and ``device`` is a GPU (the module doc); on the CPU
    print the one-line notice on rank 0. Whether it started."""
    lg = cfg.logging
    if not lg.record_memory_history:
        return False
    rank = dist.get_rank() if dist.is_initialized() else 0
    if device.type != "cuda":
        if rank == 0:
            print(f"logging.record_memory_history is set but the job runs on {device.type}: "
                  "only CUDA records an allocator history, so no memory snapshot is written",
                  flush=True)
        return False
    torch.cuda.memory._record_memory_history(enabled="all", max_entries=100000)
    head, name = os.path.split(lg.memory_snapshot_path)
    oom_path = os.path.join(head, f"oom_rank-{rank}_{name}")

    def dump_on_oom(device_index, alloc, device_alloc, device_free):
        print(f"rank {rank}: out of memory; memory snapshot in {oom_path}", flush=True)
        torch.cuda.memory._dump_snapshot(oom_path)

    torch._C._cuda_attach_out_of_memory_observer(dump_on_oom)
    return True


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def _open_tensorboard(directory: str | None, max_queue: int):
    if directory is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as error:
        print(f"logging.tensorboard_dir={directory!r} is set but TensorBoard is not usable "
              f"({error}); pip install tensorboard to get its scalars", flush=True)
        return None
    return SummaryWriter(log_dir=directory, max_queue=max_queue)


def _is_last_rank() -> bool:
    """Megatron's W&B rank: the last one (a process without ``torch.distributed`` is)."""
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1


def _open_wandb(cfg: JobConfig):
    """A W&B run of ``cfg`` (see the module doc), or None when ``wandb`` cannot be imported."""
    lg = cfg.logging
    try:
        import wandb
    except ImportError as error:
        print(f"logging.wandb_project={lg.wandb_project!r} is set but wandb is not usable "
              f"({error}); pip install wandb to log there", flush=True)
        return None
    directory = lg.wandb_save_dir
    if directory is None and cfg.training.save is not None:
        directory = os.path.join(cfg.training.save, "wandb")
    if directory is not None:
        os.makedirs(directory, exist_ok=True)
    return wandb.init(project=lg.wandb_project, entity=lg.wandb_entity, name=lg.wandb_exp_name,
                      dir=directory, config=cfg.to_dict())


def open_wandb_everywhere(cfg: JobConfig, device: torch.device):
    """`_open_wandb` on the last rank, agreed on by every rank of the job (one all-reduce on
    ``device``): the last rank's run, None on the others. When it fails there, every rank
    raises here, before the first training step, so no rank is left waiting in a collective
    the W&B rank never reaches."""
    run, error = None, None
    if _is_last_rank():
        try:
            run = _open_wandb(cfg)
        except Exception as caught:  # W&B raises its own UsageError, CommError, ...
            error = caught
    failed = error is not None
    if dist.is_initialized():
        flag = torch.tensor([int(failed)], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        failed = bool(flag.item())
    project = cfg.logging.wandb_project
    if error is not None:
        raise RuntimeError(
            f"logging.wandb_project={project!r}: wandb.init failed on this rank, which logs to "
            f"W&B ({type(error).__name__}: {error}); run `wandb login` or set WANDB_API_KEY, or "
            "log offline with WANDB_MODE=offline, or drop --wandb-project") from error
    if failed:
        raise RuntimeError(
            f"logging.wandb_project={project!r}: wandb.init failed on the last rank "
            f"({dist.get_world_size() - 1}), which logs to W&B; its error says why")
    return run


class TrainingLogger:
    """Reports for a job of ``world_size`` ranks on ``device``. Only the rank constructed
    with ``enabled=True`` prints and writes TensorBoard scalars, and only the last rank logs to
    W&B; the others only keep the interval timer."""

    def __init__(self, cfg: JobConfig, world_size: int, device: torch.device, *,
                 enabled: bool, start_iteration: int = 0):
        self.cfg, self.world_size, self.device, self.enabled = cfg, world_size, device, enabled
        self.train_iterations = cfg.train_iterations(world_size)
        self.peak_tflops = peak_tflops(device)
        lg = cfg.logging
        self.writer = _open_tensorboard(lg.tensorboard_dir, lg.tensorboard_queue_size) \
            if enabled else None
        self.wandb = open_wandb_everywhere(cfg, device) if cfg.logging.wandb_project else None
        self.memory_snapshot_path = lg.memory_snapshot_path if lg.record_memory_history and \
            device.type == "cuda" and _is_last_rank() else None  # Megatron's rank for it
        show = cfg.logging.progress
        if show == "auto":
            show = sys.stdout.isatty()
        self.progress = ProgressBar(self.train_iterations, start_iteration) \
            if enabled and show else None
        self._reset_interval()

    def _reset_interval(self) -> None:
        self._loss_sums: dict[str, float] = {}
        self._iterations = self._skipped = self._samples = 0
        self._elapsed, self._started = 0.0, time.perf_counter()

    def pause(self) -> None:
        """Stop the interval clock (around evaluation)."""
        self._elapsed += time.perf_counter() - self._started

    def resume(self) -> None:
        self._started = time.perf_counter()

    def _print(self, line: str) -> None:
        if self.progress is not None:
            self.progress.clear()
        print(line, flush=True)

    def training_iteration(self, iteration: int, consumed_samples: int,
                           losses: dict[str, float], lr: float, grad_norm: float,
                           loss_scale: float, update_successful: bool,
                           global_batch_size: int, *, params_norm: float | None = None,
                           num_zeros_in_grad: int | None = None,
                           decoupled_lr: float | None = None) -> None:
        """Account one finished iteration of ``global_batch_size`` samples; write its scalars
        every ``tensorboard_log_interval`` (with ``decoupled_lr``, ``num_zeros_in_grad`` and
        ``params_norm`` when given: ``training.decoupled_lr``,
        ``logging.log_num_zeros_in_grad``, ``log_params_norm``), and print the line and write
        the interval's rates every ``log_interval``."""
        self._iterations += 1
        self._samples += global_batch_size
        self._skipped += not update_successful
        for key, value in losses.items():
            self._loss_sums[key] = self._loss_sums.get(key, 0.0) + value
        shown = {k: v for k, v in losses.items() if not k.startswith("moe/")}  # not per layer
        if self.progress is not None:
            self.progress.update(iteration, " | ".join(f"{k} {v:.4f}" for k, v in shown.items()))
        lg = self.cfg.logging
        if iteration % lg.tensorboard_log_interval == 0:
            scalars = {**losses, "learning-rate": lr, "batch-size": global_batch_size,
                       "grad-norm": grad_norm, "loss-scale": loss_scale,
                       "peak-memory-bytes": peak_memory_bytes(self.device)}
            for tag, value in (("decoupled-learning-rate", decoupled_lr),
                               ("num-zeros", num_zeros_in_grad), ("params-norm", params_norm),
                               ("world-size", self.world_size
                                if lg.log_world_size_to_tensorboard else None)):
                if value is not None:
                    scalars[tag] = value
            self._write_scalars(scalars, iteration)
        if iteration % lg.log_interval:
            return
        self.pause()
        if self.memory_snapshot_path is not None:
            torch.cuda.memory._dump_snapshot(self.memory_snapshot_path)
        seconds = self._elapsed / self._iterations
        means = {k: v / self._iterations for k, v in self._loss_sums.items()
                 if not k.startswith("moe/")}
        model = self.cfg.model
        per_gpu = self._elapsed * self.world_size * 1e12  # FLOPs -> TFLOP/s per GPU
        tflops = num_floating_point_operations(model, self._samples) / per_gpu
        mfu = None if self.peak_tflops is None else \
            num_floating_point_operations(model, self._samples, recompute=False) / per_gpu \
            / self.peak_tflops
        tokens_per_s = self._samples * model.seq_length / self._elapsed
        memory = peak_memory_bytes(self.device)
        if self.enabled:
            fields = [f"iteration {iteration}/{self.train_iterations}",
                      f"consumed samples {consumed_samples}",
                      f"global batch size {global_batch_size}",
                      *(f"{k} {v:.4E}" for k, v in means.items()),
                      f"lr {lr:.3E}",
                      *([] if decoupled_lr is None else [f"decoupled lr {decoupled_lr:.3E}"]),
                      f"grad norm {grad_norm:.3f}",
                      *([] if num_zeros_in_grad is None else [f"num zeros {num_zeros_in_grad}"]),
                      *([] if params_norm is None else [f"params norm {params_norm:.3f}"]),
                      f"loss scale {loss_scale:g}",
                      f"{1000 * seconds:.1f} ms/iter", f"{tokens_per_s:.0f} tokens/s",
                      f"{tflops:.2f} TFLOP/s/GPU",
                      f"MFU {'-' if mfu is None else f'{100 * mfu:.1f}%'}",
                      f"peak mem {_bytes(memory)}"]
            if self._skipped:
                fields.append(f"skipped {self._skipped}")
            self._print(" | ".join(fields))
        rates = {"iteration-time-ms": 1000 * seconds, "tokens-per-second": tokens_per_s,
                 "tflops-per-gpu": tflops, "skipped-iterations": self._skipped}
        self._write_scalars(rates if mfu is None else {**rates, "mfu": mfu}, iteration)
        self._reset_interval()

    def _write_scalars(self, scalars: dict[str, float], iteration: int) -> None:
        """``scalars`` at step ``iteration`` to TensorBoard and W&B, where they are open."""
        if self.writer is not None:
            for tag, value in scalars.items():
                self.writer.add_scalar(tag, value, iteration)
        if self.wandb is not None:
            self.wandb.log(scalars, step=iteration)

    def evaluation(self, split: str, iteration: int, losses: dict[str, float], *,
                   write: bool = True) -> None:
        """Print the losses and perplexities (``exp(min(20, loss))``, Megatron's) of an
        evaluation of ``split`` (``validation`` or ``test``) at ``iteration``, and write them
        as scalars ``<split> <key>`` unless not ``write``."""
        results = {}
        for key, value in losses.items():
            results[key] = value
            results[f"{key} PPL"] = math.exp(min(20.0, value))
        if self.enabled:
            self._print(f"{split} at iteration {iteration} | "
                        + " | ".join(f"{k} {v:.4E}" for k, v in results.items()))
        if write:
            self._write_scalars({f"{split} {k}": v for k, v in results.items()}, iteration)

    def validation_sets(self, iteration: int, results: list[dict[str, float]], *,
                        write: bool = True) -> None:
        """Print the losses and perplexities of each validation set's evaluation at
        ``iteration`` (``results[i]`` for set ``i``) in Megatron's line, and write them as
        Megatron's scalars (the module doc) unless not ``write``."""
        for index, losses in enumerate(results):
            suffix, fields, scalars = f"-{index}", [], {}
            for key, value in losses.items():
                ppl = math.exp(min(20.0, value))
                fields.append(f"{key} value: {value:.6E} | {key} PPL: {ppl:.6E} |")
                scalars[f"{key} validation{suffix}"] = value
                scalars[f"{key} validation{suffix} ppl"] = ppl
            if self.enabled:
                self._print(f"validation{suffix} loss at iteration {iteration} | "
                            + " ".join(fields))
            if write:
                self._write_scalars(scalars, iteration)

    def early_exit(self, iteration: int, reason: str) -> None:
        """Say that the run stopped after ``iteration`` (of `JobConfig.train_iterations`),
        why, and where its checkpoint is."""
        if not self.enabled:
            return
        save = self.cfg.training.save
        where = f"checkpoint saved in {save}" if save is not None else \
            "no checkpoint (training.save is not set)"
        self._print(f"exiting after iteration {iteration}/{self.train_iterations}: {reason}; "
                    f"{where}")

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
