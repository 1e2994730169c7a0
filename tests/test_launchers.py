"""Launching without torchrun: ``mpirun`` (ranks from mpi4py, `mp.launch_env`) and the Slurm
batch script (``launch/slurm_pretrain.sbatch``, checked with fake ``scontrol``/``srun``).

The mpirun tests need Open MPI (Debian: ``openmpi-bin libopenmpi-dev``) and mpi4py
(``pip install -e ".[mpi]"``) and skip without them. They run as root in containers too: the
variables in `MPIRUN_ENV` allow root, launch the local ranks without ssh and keep Open MPI off
the shared-memory transports containers break."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import textwrap

import pytest
from harness import run_distributed
from jobs import ROOT, run_job

from mp import launch_env
from mp.config.job import resolve_world_size
from mp.launch_env import Ranks

MPIRUN_WRAPPER = os.path.join(ROOT, "launch", "mpirun_pretrain.sh")
SLURM_SCRIPT = os.path.join(ROOT, "launch", "slurm_pretrain.sbatch")

# --- what each launcher's variables say, without launching anything ---------------------------

LAUNCHER_ENVS = {
    "Open MPI": ({"OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_RANK": "5",
                  "OMPI_COMM_WORLD_LOCAL_RANK": "1", "OMPI_COMM_WORLD_LOCAL_SIZE": "4",
                  "PMIX_RANK": "5"}, Ranks(5, 8, 1, 4)),
    "MPICH (Hydra PMI)": ({"PMI_SIZE": "6", "PMI_RANK": "4", "MPI_LOCALRANKID": "1",
                           "MPI_LOCALNRANKS": "3"}, Ranks(4, 6, 1, 3)),
    "MVAPICH2": ({"MV2_COMM_WORLD_SIZE": "2", "MV2_COMM_WORLD_RANK": "1",
                  "MV2_COMM_WORLD_LOCAL_RANK": "1", "MV2_COMM_WORLD_LOCAL_SIZE": "2"},
                 Ranks(1, 2, 1, 2)),
    "PMIx": ({"PMIX_RANK": "3", "PMIX_NAMESPACE": "job.1"},  # the size needs MPI
             Ranks(3, None, None, None)),
}


@pytest.mark.parametrize("launcher", list(LAUNCHER_ENVS))
def test_launcher_variables_are_recognised(launcher):
    env, ranks = LAUNCHER_ENVS[launcher]
    assert launch_env.mpi_launcher(env) == launcher
    assert launch_env.needs_mpi_setup(env)
    assert launch_env.ranks_from_env(env) == ranks
    # what the config is checked against before MPI starts
    assert resolve_world_size(environ=env) == (ranks.world_size or 1)


def test_torchrun_wins_and_plain_python_is_a_world_of_one():
    torchrun = {"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    ompi = LAUNCHER_ENVS["Open MPI"][0]
    assert not launch_env.needs_mpi_setup(torchrun | ompi)  # e.g. torchrun under srun --mpi
    assert resolve_world_size(environ=ompi | {"WORLD_SIZE": "3"}) == 3  # torchrun's wins
    for plain in ({}, {"SLURM_PROCID": "0", "SLURM_NTASKS": "2"}):
        assert launch_env.mpi_launcher(plain) is None and not launch_env.needs_mpi_setup(plain)


def test_missing_mpi4py_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "1")
    with pytest.raises(ImportError, match=re.escape('pip install -e ".[mpi]"')) as info:
        launch_env.import_mpi()
    assert "Open MPI" in str(info.value)


class _FakeComm:
    """COMM_WORLD of a world of one (enough for the checks that need no peer)."""

    def __init__(self, size: int = 1):
        self.size = size

    def Get_rank(self):
        return 0

    def Get_size(self):
        return self.size

    def Split_type(self, kind):
        assert kind == _FakeMPI.COMM_TYPE_SHARED
        return _FakeComm(self.size)

    def Free(self):
        pass

    def bcast(self, obj, root):
        return obj


class _FakeMPI:
    COMM_TYPE_SHARED = 7

    def __init__(self, size: int = 1):
        self.COMM_WORLD = _FakeComm(size)


class _FakeMPIOnTwoNodes(_FakeMPI):
    """Two ranks, and rank 0's node holds only itself."""

    def __init__(self):
        self.COMM_WORLD = _FakeComm(2)
        self.COMM_WORLD.Split_type = lambda kind: _FakeComm(1)


def test_setup_from_fake_mpi_respects_user_rendezvous_and_checks_mismatches(monkeypatch):
    env = {"MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "4567", "OMPI_COMM_WORLD_SIZE": "1",
           "OMPI_COMM_WORLD_RANK": "0"}
    assert launch_env.setup_env_from_mpi(env, mpi=_FakeMPI()) == Ranks(0, 1, 0, 1)
    assert {k: env[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                "MASTER_ADDR", "MASTER_PORT")} == {
        "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
        "MASTER_ADDR": "10.1.2.3", "MASTER_PORT": "4567"}
    # an mpi4py built for another MPI sees a world of one where the launcher says four
    with pytest.raises(RuntimeError, match="says rank 2 of 4, mpi4py says rank 0 of 1"):
        launch_env.setup_env_from_mpi({"OMPI_COMM_WORLD_SIZE": "4", "OMPI_COMM_WORLD_RANK": "2"},
                                      mpi=_FakeMPI())
    # several nodes (rank 0's node holds 1 of 2 ranks) and a hostname that means loopback
    monkeypatch.setattr(launch_env.socket, "gethostbyname", lambda host: "127.0.1.1")
    with pytest.raises(ValueError, match="loopback.*set MASTER_ADDR"):
        launch_env.setup_env_from_mpi({}, mpi=_FakeMPIOnTwoNodes())


# --- real mpirun ------------------------------------------------------------------------------

def _mpirun_flavour() -> str | None:
    if shutil.which("mpirun") is None:
        return None
    version = subprocess.run(["mpirun", "--version"], capture_output=True, text=True, timeout=30,
                             check=False)
    return "openmpi" if "Open MPI" in version.stdout + version.stderr else "other"


MPIRUN = _mpirun_flavour()
try:
    import mpi4py  # noqa: F401  (MPI itself is initialised only in the launched ranks)
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False

needs_mpirun = pytest.mark.skipif(
    MPIRUN is None or not HAVE_MPI4PY,
    reason="needs mpirun and mpi4py: apt-get install openmpi-bin libopenmpi-dev; "
           'pip install -e ".[mpi]"')

#: Open MPI in a container, as root, on a 2-core machine.
MPIRUN_ENV = {
    "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
    "OMPI_MCA_rmaps_base_oversubscribe": "1",  # more ranks than cores
    "OMPI_MCA_plm_rsh_agent": "false",  # one node: no ssh needed, none required to be installed
    "OMPI_MCA_btl_vader_single_copy_mechanism": "none",  # CMA needs ptrace rights containers lack
    "OMPI_MCA_btl_base_warn_component_unused": "0", "OMPI_MCA_pml": "ob1",  # no IB/UCX chatter
    "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
}


def launch(command: list[str], timeout: float,
           extra_env: dict | None = None) -> subprocess.CompletedProcess:
    """A launcher's ``command`` (mpirun, the wrapper, torchrun) in a clean environment: no
    torchrun, Slurm or outer MPI variables. On timeout, end the launcher and every rank, and
    fail."""
    env = {k: v for k, v in os.environ.items()
           if not re.match(r"(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|MASTER_ADDR|"
                           r"MASTER_PORT|SLURM_.*|OMPI_.*|PMIX_.*|PMI_.*|MPI_LOCAL.*)$", k)}
    env |= (MPIRUN_ENV if MPIRUN == "openmpi" else {}) | (extra_env or {})
    # on timeout, `timeout` sends the launcher SIGTERM, on which it ends every rank it started
    run = subprocess.run(["timeout", "--kill-after=20", str(timeout), *command], check=False,
                         capture_output=True, text=True, env=env, cwd=ROOT)
    if run.returncode in (124, 137):
        pytest.fail(f"{command[0]} did not finish within {timeout} s:\n"
                    f"{run.stdout[-3000:]}{run.stderr[-3000:]}")
    return run


REPORT_ENV = textwrap.dedent("""
    import json, os, sys
    from mp.launch_env import setup_env_from_mpi
    launcher = {k: os.environ[k] for k in ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE",
                                           "OMPI_COMM_WORLD_LOCAL_RANK") if k in os.environ}
    setup_env_from_mpi()
    from mpi4py import MPI
    mine = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE",
                                       "MASTER_ADDR", "MASTER_PORT")}
    with open(os.path.join(sys.argv[1], str(os.getpid())), "w") as f:  # ranks' stdout may mix
        json.dump({"launcher": launcher, "env": mine, "finalized": MPI.Is_finalized()}, f)
""")


@needs_mpirun
@pytest.mark.parametrize("user_rendezvous", [{}, {"MASTER_ADDR": "localhost",
                                                  "MASTER_PORT": "23456"}])
def test_mpirun_ranks_and_rendezvous_from_mpi4py(user_rendezvous, tmp_path):
    run = launch(["mpirun", "-np", "3", sys.executable, "-c", REPORT_ENV, str(tmp_path)],
                 timeout=120, extra_env=user_rendezvous)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reports = sorted((json.loads(p.read_text()) for p in tmp_path.iterdir()),
                     key=lambda r: int(r["env"]["RANK"]))
    assert [int(r["env"]["RANK"]) for r in reports] == [0, 1, 2]
    for r in reports:
        env = r["env"]
        assert (env["WORLD_SIZE"], env["LOCAL_WORLD_SIZE"]) == ("3", "3")  # one node
        assert r["finalized"] is True  # MPI is done once torchrun's variables are set
        if r["launcher"]:  # Open MPI's own word, independent of mpi4py
            assert env["RANK"] == r["launcher"]["OMPI_COMM_WORLD_RANK"]
            assert env["LOCAL_RANK"] == r["launcher"]["OMPI_COMM_WORLD_LOCAL_RANK"]
        else:
            assert env["LOCAL_RANK"] == env["RANK"]
    rendezvous = {(r["env"]["MASTER_ADDR"], r["env"]["MASTER_PORT"]) for r in reports}
    assert len(rendezvous) == 1, rendezvous  # every rank got rank 0's choice
    addr, port = rendezvous.pop()
    if user_rendezvous:
        assert (addr, port) == ("localhost", "23456")
    else:
        assert addr == "127.0.0.1" and 1024 <= int(port) < 65536


DIES_ON_RANK_1 = textwrap.dedent("""
    import time
    from mp.launch_env import setup_env_from_mpi
    if setup_env_from_mpi().rank == 1:
        raise RuntimeError("planted failure on rank 1")
    time.sleep(600)  # like ranks blocked in a collective with the dead one
""")


@needs_mpirun
def test_mpirun_a_dying_rank_takes_the_job_down():
    """Had MPI stayed initialised, rank 1 would wait at exit in MPI_Finalize for the others,
    which wait for it: the job would hang until the timeout fails this test."""
    run = launch(["mpirun", "-np", "3", sys.executable, "-c", DIES_ON_RANK_1], timeout=90)
    assert run.returncode != 0
    assert "planted failure on rank 1" in run.stdout + run.stderr


TINY = ["--config", os.path.join(ROOT, "configs", "gpt-tiny.yaml"),
        "--tensor-model-parallel-size", "2", "--num-layers", "2", "--hidden-size", "64",
        "--seq-length", "64", "--micro-batch-size", "2", "--global-batch-size", "8",
        "--lr", "3e-3", "--lr-warmup-iters", "2", "--train-iters", "6", "--log-interval", "3",
        "--eval-interval", "6", "--eval-iters", "1"]
# not anchored: Open MPI gives the ranks a terminal, so rank 0's progress bar precedes them
LOG_LINE = re.compile(r"(iteration \d+/6 \|.*?\| lm loss \S+ \|.*?\| grad norm \S+|"
                      r"validation at iteration \d+ \| lm loss \S+)")


@needs_mpirun
def test_mpirun_pretraining_equals_the_simulated_ranks(tmp_path):
    """``launch/mpirun_pretrain.sh 2`` (mpirun -np 2 python launch/pretrain_gpt.py) trains
    DP=2 on the CPU and logs the same losses and grad norms as the launcher's job in the
    simulated ranks (`jobs.run_job`, which computes as torchrun's job does, bit for bit:
    tests/test_checkpoint_resume.py)."""
    args = [*TINY, "--tensor-model-parallel-size", "1", "--data-cache-path", str(tmp_path)]
    wrapper_env = {"PYTHON": sys.executable}
    if MPIRUN == "openmpi":
        wrapper_env["MPIRUN_ARGS"] = "--oversubscribe"
    run = launch(["bash", MPIRUN_WRAPPER, "2", *args], timeout=300, extra_env=wrapper_env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stdout.count("world 2 = TP 1 x PP 1 x DP 2") == 1
    logged = LOG_LINE.findall(run.stdout)
    assert len(logged) == 3, run.stdout[-3000:]  # iterations 3 and 6, validation at 6

    assert logged == LOG_LINE.findall(run_distributed(2, run_job, args)[0])


# --- Slurm ------------------------------------------------------------------------------------

def _fake_slurm_bin(tmp_path) -> str:
    """``scontrol show hostnames LIST`` printing two nodes, and an ``srun`` that records its
    argv (NUL-separated), working directory and a few variables instead of running anything."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(textwrap.dedent("""\
        #!/bin/sh
        [ "$1 $2 $3" = "show hostnames gpu-[07-08]" ] || { echo "scontrol: got $*" >&2; exit 3; }
        printf 'gpu-07\\ngpu-08\\n'
    """))
    (bin_dir / "srun").write_text(textwrap.dedent("""\
        #!/bin/sh
        printf '%s\\0' srun "$@" > "$FAKE_SRUN_OUT/argv"
        { pwd; echo "$OMP_NUM_THREADS $CUDA_DEVICE_MAX_CONNECTIONS $TORCH_NCCL_ASYNC_ERROR_HANDLING"
        } > "$FAKE_SRUN_OUT/env"
    """))
    for tool in ("scontrol", "srun"):
        (bin_dir / tool).chmod(0o755)
    return str(bin_dir)


SLURM_VARS = {"SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_NNODES": "2", "SLURM_JOB_ID": "4242",
              "SLURM_GPUS_ON_NODE": "4", "SLURM_CPUS_PER_TASK": "32"}


def _sbatch(tmp_path, args: list[str], **env) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items()
             if not k.startswith("SLURM_") and k not in ("OMP_NUM_THREADS", "GPUS_PER_NODE",
                                                         "RDZV_PORT", "MP_DRY_RUN", "MP_ROOT")}
    clean |= {"PATH": _fake_slurm_bin(tmp_path) + os.pathsep + os.environ["PATH"],
              "FAKE_SRUN_OUT": str(tmp_path), "SLURM_SUBMIT_DIR": ROOT} | env
    return subprocess.run(["bash", SLURM_SCRIPT, *args], capture_output=True, text=True,
                          timeout=60, env=clean, cwd=str(tmp_path), check=False)


def test_slurm_script_parses_and_sets_sbatch_options():
    assert subprocess.run(["bash", "-n", SLURM_SCRIPT], check=False).returncode == 0
    with open(SLURM_SCRIPT) as f:
        lines = f.read().splitlines()
    first_command = next(i for i, line in enumerate(lines) if line and not line.startswith("#"))
    options = [line.split(None, 1)[1] for line in lines if line.startswith("#SBATCH")]
    assert all(lines.index(f"#SBATCH {o}") < first_command for o in options)  # sbatch sees them
    names = {o.split("=")[0] for o in options}
    assert {"--nodes", "--ntasks-per-node", "--gpus-per-node", "--cpus-per-task",
            "--time"} <= names
    assert "--ntasks-per-node=1" in options  # one torchrun per node


def test_slurm_script_runs_torchrun_with_the_first_node_as_rendezvous(tmp_path):
    args = ["--config", "configs/gpt3-1.3b.yaml", "--data-path", "my corpus_text_document"]
    run = _sbatch(tmp_path, args, **SLURM_VARS)
    assert run.returncode == 0, run.stderr
    argv = (tmp_path / "argv").read_text().split("\0")[:-1]
    assert argv == ["srun", "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2",
                    "--nproc-per-node", "4", "--rdzv-id", "4242", "--rdzv-backend", "c10d",
                    "--rdzv-endpoint", "gpu-07:29500", "launch/pretrain_gpt.py", *args]
    cwd, variables = (tmp_path / "env").read_text().splitlines()
    assert os.path.samefile(cwd, ROOT)  # runs where it was submitted from
    assert variables == "8 1 1"  # 32 CPUs over 4 ranks; one CUDA queue; NCCL errors end the job

    dry = _sbatch(tmp_path, ["--lr", "1e-4"], **SLURM_VARS, GPUS_PER_NODE="8", RDZV_PORT="6000",
                  MP_DRY_RUN="1")
    assert dry.returncode == 0, dry.stderr
    assert shlex.split(dry.stdout) == [  # MP_DRY_RUN prints it, quoted for the shell
        "srun", "--kill-on-bad-exit=1", "torchrun", "--nnodes", "2", "--nproc-per-node", "8",
        "--rdzv-id", "4242", "--rdzv-backend", "c10d", "--rdzv-endpoint", "gpu-07:6000",
        "launch/pretrain_gpt.py", "--lr", "1e-4"]


def test_slurm_script_outside_slurm_says_so(tmp_path):
    run = _sbatch(tmp_path, [])
    assert run.returncode != 0 and "not inside a Slurm job" in run.stderr
    assert not (tmp_path / "argv").exists()


def test_mpirun_wrapper_command_line(tmp_path):
    """The wrapper's command for Open MPI (no binding, variables forwarded with -x) and for
    MPICH's Hydra (which forwards the environment itself), from fake launchers' --version."""
    for name, version in (("ompi", "mpirun (Open MPI) 4.1.4"), ("hydra", "HYDRA build details:")):
        fake = tmp_path / name
        fake.write_text(f"#!/bin/sh\necho '{version}'\n")
        fake.chmod(0o755)
    assert subprocess.run(["bash", "-n", MPIRUN_WRAPPER], check=False).returncode == 0
    env = {k: v for k, v in os.environ.items() if not re.match(
        r"(OMP_NUM_THREADS|PYTHONPATH|MASTER_.*|NCCL_.*|CUDA_.*|TORCH_.*|HOSTFILE|MPIRUN_ARGS)$",
        k)}
    env |= {"MP_DRY_RUN": "1", "NCCL_DEBUG": "WARN", "PYTHON": "python3"}
    script, args = f"{ROOT}/launch/pretrain_gpt.py", ["--config", "a b.yaml"]
    expected = {  # MP_DRY_RUN prints the command, quoted for the shell
        "ompi": [str(tmp_path / "ompi"), "-np", "8", "--hostfile", "hosts", "--bind-to", "none",
                 "-x", "NCCL_DEBUG", "-x", "OMP_NUM_THREADS", "--mca", "btl", "self,tcp",
                 "python3", script, *args],
        "hydra": [str(tmp_path / "hydra"), "-np", "8", "--hostfile", "hosts", "-ppn", "4",
                  "python3", script, *args]}
    extra_args = {"ompi": "--mca btl self,tcp", "hydra": "-ppn 4"}
    for name, argv in expected.items():
        run = subprocess.run(["bash", MPIRUN_WRAPPER, "8", *args], check=False,
                             capture_output=True, text=True, timeout=60,
                             env=env | {"MPIRUN": str(tmp_path / name), "HOSTFILE": "hosts",
                                        "MPIRUN_ARGS": extra_args[name]})
        assert run.returncode == 0, run.stderr
        assert shlex.split(run.stdout) == argv
