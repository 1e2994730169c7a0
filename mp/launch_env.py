"""Who launched this process, and torchrun's variables for a job started by ``mpirun``.

``torch.distributed`` reads ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``
(``env://``), which ``torchrun`` sets. ``mpirun`` sets its own: Open MPI
``OMPI_COMM_WORLD_{RANK,SIZE,LOCAL_RANK,LOCAL_SIZE}``, MPICH's and Intel MPI's Hydra
``PMI_RANK``/``PMI_SIZE`` (``MPI_LOCALRANKID``/``MPI_LOCALNRANKS``), MVAPICH2
``MV2_COMM_WORLD_*``, a PMIx launcher (Open MPI 5, ``srun --mpi=pmix``) ``PMIX_RANK``.
`mpi_launcher` recognises them; `setup_env_from_mpi` then asks MPI itself (mpi4py, imported only
here) for the rank, the world size and the ranks on this node
(``COMM_WORLD.Split_type(COMM_TYPE_SHARED)``), rank 0 picks the rendezvous address and a free
port and broadcasts them, and torchrun's variables are set, so the process group starts from
``env://`` exactly as under torchrun. MPI carries nothing else: every collective of the job
goes through ``torch.distributed`` (gloo or NCCL).

This module imports neither torch nor mpi4py at import time.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, MutableMapping
from typing import NamedTuple

#: (launcher, its rank variable, world size, local rank, local world size); None: not set by it.
_LAUNCHERS: tuple[tuple[str, str, str | None, str | None, str | None], ...] = (
    ("Open MPI", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
     "OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("MVAPICH2", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE",
     "MV2_COMM_WORLD_LOCAL_RANK", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("MPICH (Hydra PMI)", "PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID", "MPI_LOCALNRANKS"),
    ("PMIx", "PMIX_RANK", None, None, None),
)


class Ranks(NamedTuple):
    """Where a process sits in the job (None: a launcher's variables do not say)."""
    rank: int
    world_size: int | None
    local_rank: int | None
    local_world_size: int | None


def launched_by_torchrun(environ: Mapping[str, str] = os.environ) -> bool:
    """torchrun (or a user) already set the ``env://`` variables."""
    return "RANK" in environ and "WORLD_SIZE" in environ


def needs_mpi_setup(environ: Mapping[str, str] = os.environ) -> bool:
    """Started by an MPI launcher and not by torchrun (whose variables win when both are set)."""
    return not launched_by_torchrun(environ) and mpi_launcher(environ) is not None


def mpi_launcher(environ: Mapping[str, str] = os.environ) -> str | None:
    """The MPI launcher whose variables are in ``environ`` ("Open MPI", "MPICH (Hydra PMI)",
    "MVAPICH2", "PMIx"), or None."""
    return next((name for name, rank_var, *_ in _LAUNCHERS if rank_var in environ), None)


def ranks_from_env(environ: Mapping[str, str] = os.environ) -> Ranks | None:
    """What the launcher's variables say (None outside an MPI launcher). `setup_env_from_mpi`
    checks MPI's own answer against it."""
    for _, *names in _LAUNCHERS:
        if names[0] in environ:
            return Ranks(*(int(environ[n]) if n in environ else None for n in names))
    return None


def launcher_world_size(environ: Mapping[str, str] = os.environ) -> int | None:
    """The world size an MPI launcher announces in ``environ`` (None when none does): what config
    validation, which runs before MPI or any process group starts, takes as the world size
    (`mp.config.resolve_world_size`)."""
    ranks = ranks_from_env(environ)
    return None if ranks is None else ranks.world_size


def import_mpi():
    """``mpi4py.MPI`` (initialises MPI), or an ImportError that says how to get it."""
    try:
        from mpi4py import MPI
    except ImportError as error:
        raise ImportError(
            f"this process was started by an MPI launcher ({mpi_launcher() or 'mpirun'}), and "
            "mp reads the ranks from MPI through mpi4py, which is not installed: "
            'pip install -e ".[mpi]" (or `pip install mpi4py`, built against the MPI that runs '
            "the job), or launch with torchrun") from error
    return MPI


def free_port() -> int:
    """A TCP port that was free a moment ago (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


def rendezvous_address(single_node: bool) -> str:
    """Where the other ranks reach rank 0: loopback when the whole job is on one node, else this
    host's name, which must not resolve to a loopback address (ValueError: set MASTER_ADDR)."""
    if single_node:
        return "127.0.0.1"
    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError as error:
        raise ValueError(f"rank 0's hostname {host!r} does not resolve ({error}); set "
                         f"MASTER_ADDR to an address of rank 0's node that the others reach")
    if address.startswith("127."):
        raise ValueError(f"rank 0's hostname {host!r} resolves to {address}, a loopback address "
                         f"that the other nodes cannot reach; set MASTER_ADDR to rank 0's IP")
    return host


def _rank0_rendezvous(environ: Mapping[str, str],
                      single_node: bool) -> tuple[str | None, str | None, str | None]:
    """Rank 0's ``(MASTER_ADDR, MASTER_PORT, None)``, the user's where set; or
    ``(None, None, what is wrong)``."""
    try:
        addr = environ.get("MASTER_ADDR") or rendezvous_address(single_node)
    except ValueError as error:
        return None, None, str(error)
    return addr, environ.get("MASTER_PORT") or str(free_port()), None


def setup_env_from_mpi(environ: MutableMapping[str, str] = os.environ, mpi=None) -> Ranks:
    """Set ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR`` and
    ``MASTER_PORT`` in ``environ`` from MPI (``mpi``: the ``mpi4py.MPI`` module by default).

    Collective over ``COMM_WORLD``: every rank calls it. Rank 0 chooses the rendezvous (its
    ``MASTER_ADDR``/``MASTER_PORT`` when the user set them, else see `rendezvous_address` and
    `free_port`) and broadcasts it, so all ranks agree; a problem found there is raised on every
    rank, not only on rank 0. A launcher variable that disagrees with MPI is an error too (an
    mpi4py built for another MPI than the one running the job sees a world of one per process).

    MPI is finalized before this returns, unless something else in the process imported
    mpi4py first: it has done its part, and a rank that then dies exits at once (mpirun ends
    the job) instead of waiting in ``MPI_Finalize`` for ranks blocked in a collective with it.
    """
    owns_mpi = mpi is None and "mpi4py.MPI" not in sys.modules  # nobody else uses MPI here
    mpi = import_mpi() if mpi is None else mpi
    try:
        ranks, rendezvous = _ranks_and_rendezvous(mpi, environ)
    finally:
        if owns_mpi:
            mpi.Finalize()
    environ.update(RANK=str(ranks.rank), WORLD_SIZE=str(ranks.world_size),
                   LOCAL_RANK=str(ranks.local_rank), LOCAL_WORLD_SIZE=str(ranks.local_world_size),
                   MASTER_ADDR=rendezvous[0], MASTER_PORT=rendezvous[1])
    return ranks


def _ranks_and_rendezvous(mpi, environ: Mapping[str, str]) -> tuple[Ranks, tuple[str, str]]:
    comm = mpi.COMM_WORLD
    local = comm.Split_type(mpi.COMM_TYPE_SHARED)
    ranks = Ranks(comm.Get_rank(), comm.Get_size(), local.Get_rank(), local.Get_size())
    local.Free()
    from_env = ranks_from_env(environ)
    if from_env is not None and (from_env.rank != ranks.rank
                                 or from_env.world_size not in (None, ranks.world_size)):
        raise RuntimeError(
            f"{mpi_launcher(environ)} says rank {from_env.rank} of {from_env.world_size}, "
            f"mpi4py says rank {ranks.rank} of {ranks.world_size}: mpi4py is built for another "
            f"MPI than the launcher's (reinstall it: `pip install --no-binary mpi4py mpi4py`)")
    if environ.get("WORLD_SIZE", str(ranks.world_size)) != str(ranks.world_size):
        raise RuntimeError(f"WORLD_SIZE={environ['WORLD_SIZE']} is set, but MPI's world has "
                           f"{ranks.world_size} ranks; unset it under mpirun")
    # rank 0's node holds every rank <=> the job is on one node
    rendezvous = comm.bcast(_rank0_rendezvous(environ, ranks.local_world_size == ranks.world_size)
                            if ranks.rank == 0 else None, root=0)
    addr, port, problem = rendezvous
    if problem is not None:
        raise ValueError(f"mpirun rendezvous: {problem}")
    return ranks, (addr, port)

