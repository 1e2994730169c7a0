"""Start ``torch.distributed`` for a job: from torchrun's environment, from ``mpirun``'s (through
mpi4py), or as a world of one."""

from __future__ import annotations

import os
import tempfile
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from mp import launch_env

if TYPE_CHECKING:
    from mp.config import JobConfig


def initialize_distributed(backend: str | None = None, timeout_minutes: float = 10.0) -> None:
    """Initialise the default process group once.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set) every rank joins the job.
    Under ``mpirun`` (Open MPI, MPICH, Intel MPI, MVAPICH2 or a PMIx launcher, and no
    ``RANK``/``WORLD_SIZE``) mpi4py gives the ranks and rank 0's address and a free port
    (`mp.launch_env.setup_env_from_mpi` sets torchrun's variables; ``MASTER_ADDR`` and
    ``MASTER_PORT`` set by the user win), then the same ``env://`` start follows. Without either
    this process becomes a world of one (benchmarks, notebooks). The backend is NCCL with one
    GPU per local rank when CUDA is available, gloo otherwise. A rank that fails to reach the
    others, or waits longer in a collective, gives up after ``timeout_minutes`` instead of
    hanging forever (a job passes ``training.distributed_timeout_minutes``, Megatron's
    ``--distributed-timeout-minutes``, here and to ``initialize_model_parallel``).
    """
    if dist.is_initialized():
        return
    if launch_env.needs_mpi_setup():
        launch_env.setup_env_from_mpi()
    cuda = torch.cuda.is_available() and os.environ.get("MP_DEVICE", "cuda").startswith("cuda")
    if backend is None:
        backend = "nccl" if cuda else "gloo"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    timeout = timedelta(minutes=timeout_minutes)
    if "WORLD_SIZE" in os.environ:
        dist.init_process_group(backend, init_method="env://", timeout=timeout)
    else:
        store = dist.FileStore(tempfile.mktemp(prefix="mp-world-of-one-"), 1)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)


def initialize_model_parallel_of(cfg: JobConfig) -> None:
    """`mp.parallel_state.initialize_model_parallel` with job ``cfg``'s sizes: tensor,
    pipeline (and virtual), context (and its hierarchical levels) and expert parallelism, the
    distributed optimizer's instances, the rank order (``training.use_tp_pp_dp_mapping``) and
    the collectives' timeout (``training.distributed_timeout_minutes``)."""
    from mp import parallel_state

    m, tr = cfg.model, cfg.training
    parallel_state.initialize_model_parallel(
        m.tensor_model_parallel_size, m.pipeline_model_parallel_size,
        m.virtual_pipeline_model_parallel_size, context_parallel_size=m.context_parallel_size,
        hierarchical_context_parallel_sizes=m.hierarchical_context_parallel_sizes,
        expert_model_parallel_size=m.expert_model_parallel_size,
        expert_tensor_parallel_size=m.expert_tensor_parallel_size,
        distributed_timeout_minutes=tr.distributed_timeout_minutes,
        num_distributed_optimizer_instances=tr.num_distributed_optimizer_instances,
        use_tp_pp_dp_mapping=tr.use_tp_pp_dp_mapping)
