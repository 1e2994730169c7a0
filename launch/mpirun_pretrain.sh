#!/usr/bin/env bash
# Pretrain with mpirun instead of torchrun: NP ranks of launch/pretrain_gpt.py.
#
#   launch/mpirun_pretrain.sh NP [pretrain_gpt.py arguments...]
#   launch/mpirun_pretrain.sh 4 --config configs/gpt-tiny.yaml          # one machine, 4 ranks
#   HOSTFILE=hosts launch/mpirun_pretrain.sh 16 --config configs/gpt3-1.3b.yaml
#
# It runs `mpirun -np NP [--hostfile HOSTFILE] --bind-to none <forwarded env> $MPIRUN_ARGS
# python launch/pretrain_gpt.py ARGS`; the plain `mpirun -np 4 python launch/pretrain_gpt.py ...`
# works as well. Each rank reads its rank, the world size and its local rank from MPI through
# mpi4py (`pip install -e ".[mpi]"`, built against the MPI that runs the job), rank 0 broadcasts
# its address and a free port, and torch.distributed starts from env:// as under torchrun (see
# mp/launch_env.py). MASTER_ADDR / MASTER_PORT, when set, win (set MASTER_ADDR when rank 0's
# hostname does not resolve on the other nodes). On GPUs each node needs as many ranks as GPUs
# (local rank i takes GPU i); MPI carries nothing of the training, NCCL or gloo does.
#
# Environment:
#   MPIRUN       the launcher (default: mpirun): Open MPI, MPICH/Hydra, Intel MPI, MVAPICH2
#   MPIRUN_ARGS  more launcher flags, word-split: "--oversubscribe", "--allow-run-as-root",
#                "--mca btl self,tcp", "-ppn 8" ...
#   HOSTFILE     a hostfile for multi-node runs
#   PYTHON       the interpreter on every node (default: python)
#   OMP_NUM_THREADS  CPU threads per rank (default 1, as torchrun's)
#   MP_DRY_RUN=1 print the command instead of running it
#
# Open MPI passes only the variables named by -x to remote nodes: OMP_NUM_THREADS, PYTHONPATH,
# MASTER_ADDR/MASTER_PORT and the NCCL_/CUDA_/TORCH_ variables set here are forwarded. In a
# container as root, Open MPI also wants --allow-run-as-root (or OMPI_ALLOW_RUN_AS_ROOT=1 and
# OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1), and where there is no ssh, OMPI_MCA_plm_rsh_agent=false
# for one-node runs; more ranks than cores needs --oversubscribe.
set -euo pipefail

if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 NP [pretrain_gpt.py arguments...]   (NP: the number of ranks)" >&2
  exit 2
fi
np=$1
shift
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"

mpirun_command() {
  local launcher="${MPIRUN:-mpirun}"
  local -a cmd=("$launcher" -np "$np")
  if [[ -n "${HOSTFILE:-}" ]]; then
    cmd+=(--hostfile "$HOSTFILE")
  fi
  local version forwarded='^(OMP_NUM_THREADS|PYTHONPATH|MASTER_(ADDR|PORT)|(NCCL|CUDA|TORCH)_.*)$'
  version="$("$launcher" --version 2>/dev/null || true)"
  if [[ "$version" == *"Open MPI"* ]]; then
    cmd+=(--bind-to none)
    local name
    for name in $(compgen -e | grep -E "$forwarded"); do
      cmd+=(-x "$name")
    done
  fi  # MPICH / Intel MPI (Hydra) do not bind by default and forward the whole environment
  # shellcheck disable=SC2206  # word-splitting MPIRUN_ARGS is the point
  cmd+=(${MPIRUN_ARGS:-} "${PYTHON:-python}" "$root/launch/pretrain_gpt.py" "$@")
  printf '%s\0' "${cmd[@]}"
}

mapfile -d '' command < <(mpirun_command "$@")
if [[ "${MP_DRY_RUN:-0}" == 1 ]]; then
  printf '%q ' "${command[@]}"
  echo
else
  exec "${command[@]}"
fi
