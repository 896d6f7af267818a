#!/usr/bin/env bash
# ReGrad on several GPU nodes: one process per node, each driving all its GPUs.
#
# Usage:
#   On SLURM (one task per node):
#     sbatch --nodes=2 launch/gpu_multinode.sh STAGE...
#     salloc --nodes=2 --gpus-per-node=8, then: launch/gpu_multinode.sh STAGE...
#   On plain hosts reachable by ssh (no scheduler):
#     HOSTS="gpu-a gpu-b" launch/gpu_multinode.sh STAGE...
#
#   STAGE (run in the order given):
#     meta_train   meta-learn theta*, alpha on all GPUs         (all nodes)
#     build_bank   the Gradient Bank, rows split over the nodes   (all nodes)
#     build_index  the retrieval index                          (first node)
#     evaluate     every method of config.eval.methods           (first node)
#     all          meta_train build_bank build_index evaluate
#
# How the processes find each other: the multi-node launches run with
# --config.distributed=True, so regrad_jax.parallel.maybe_initialize_distributed
# calls jax.distributed.initialize() with the three variables this script sets
# for every process:
#   JAX_COORDINATOR_ADDRESS  host:port of process 0 (the first node; PORT free)
#   JAX_NUM_PROCESSES        the number of nodes
#   JAX_PROCESS_ID           0 .. nodes-1: $SLURM_PROCID under srun, the index
#                            of the host in HOSTS under ssh
# jax.devices() then lists every GPU of every node, and the ("data", "model")
# mesh (config.mesh) spans them: meta_train splits each meta-batch over all
# GPUs (config.meta.batch_size must be a multiple of the GPU count), and
# build_bank has each node compute and write its own share of the documents
# (parallel.process_slice). build_index and evaluate are single-process
# programs: they run on the first node only.
#
# Requirements on every node: the same checkout at REPO_DIR with its venv at
# VENV (`pip install -e . "jax[cuda12]==0.10.2"`), and WORKDIR and the data on a
# filesystem all nodes share (NFS, Lustre...): orbax checkpoints and the
# TensorStore bank are written by every node. Prepare the data once with
#   python -m launch.prepare_data --out=$DATA_DIR
#
# Everything below can be overridden from the environment.
#SBATCH --job-name=regrad
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=24:00:00
set -euo pipefail

HOSTS="${HOSTS:-}"                      # ssh mode: "host0 host1 ..." (host0 = coordinator).
PORT="${PORT:-12355}"                   # Coordinator port on the first node.
# The checkout on every node (sbatch copies this script away: submit from the
# repository root, or set REPO_DIR).
REPO_DIR="${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(cd "$(dirname "$0")/.." && pwd)}}"
VENV="${VENV:-${REPO_DIR}/.venv}"
SHARED="${SHARED:-/shared/regrad}"      # A folder every node sees.
WORKDIR="${WORKDIR:-${SHARED}/runs/smollm2_cpkc}"
DATA_DIR="${DATA_DIR:-${SHARED}/data}"
# Any configs/*.py[:args]; batch=16 (the reference's meta-batch) divides over
# 1, 2, 4, 8 or 16 GPUs.
CONFIG="${CONFIG:-configs/smollm2_cpkc.py:batch=16}"
# Extra config overrides for every stage, e.g. "--config.meta.num_steps=600".
EXTRA_FLAGS="${EXTRA_FLAGS:---config.model.dtype=bfloat16}"

usage() {
  sed -n '2,/^#SBATCH/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

# The python command of a stage, run in REPO_DIR with the venv active.
command_for() {
  local module="$1"
  shift
  echo "cd ${REPO_DIR} && source ${VENV}/bin/activate && exec python -m launch.${module} \
--config=${CONFIG} --config.data.root=${DATA_DIR} --workdir=${WORKDIR} ${EXTRA_FLAGS} $*"
}

# on_all_nodes MODULE [FLAGS...]: one process per node, as one distributed job.
on_all_nodes() {
  local cmd
  cmd="$(command_for "$@" --config.distributed=True)"
  if [[ -n "${HOSTS}" ]]; then
    local hosts=(${HOSTS}) pids=() i status=0
    for i in "${!hosts[@]}"; do
      echo "[gpu_multinode] ${hosts[i]} (process ${i}/${#hosts[@]}): ${cmd}" >&2
      ssh "${hosts[i]}" "export JAX_COORDINATOR_ADDRESS=${hosts[0]}:${PORT} \
JAX_NUM_PROCESSES=${#hosts[@]} JAX_PROCESS_ID=${i}; ${cmd}" &
      pids+=($!)
    done
    for i in "${!pids[@]}"; do
      wait "${pids[i]}" || { echo "[gpu_multinode] ${hosts[i]} failed" >&2; status=1; }
    done
    return "${status}"
  fi
  local head
  head="$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)"
  echo "[gpu_multinode] srun on ${SLURM_JOB_NUM_NODES} nodes: ${cmd}" >&2
  # SLURM_PROCID differs per task: single quotes defer it to the task's shell.
  JAX_COORDINATOR_ADDRESS="${head}:${PORT}" JAX_NUM_PROCESSES="${SLURM_JOB_NUM_NODES}" \
    srun --nodes="${SLURM_JOB_NUM_NODES}" --ntasks="${SLURM_JOB_NUM_NODES}" \
    --ntasks-per-node=1 --export=ALL \
    bash -c 'export JAX_PROCESS_ID=${SLURM_PROCID}; '"${cmd}"
}

# on_first_node MODULE [FLAGS...]: a single process on the first node.
on_first_node() {
  local cmd
  cmd="$(command_for "$@")"
  if [[ -n "${HOSTS}" ]]; then
    local hosts=(${HOSTS})
    echo "[gpu_multinode] ${hosts[0]}: ${cmd}" >&2
    ssh "${hosts[0]}" "${cmd}"
  else
    echo "[gpu_multinode] srun on 1 node: ${cmd}" >&2
    srun --nodes=1 --ntasks=1 --export=ALL bash -c "${cmd}"
  fi
}

run_stage() {
  case "$1" in
    meta_train) on_all_nodes meta_train ;;
    build_bank) on_all_nodes build_bank ;;
    build_index) on_first_node build_index ;;
    evaluate) on_first_node evaluate ;;
    all) for s in meta_train build_bank build_index evaluate; do run_stage "$s"; done ;;
    *) echo "unknown stage '$1'" >&2; usage >&2; exit 2 ;;
  esac
}

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  [[ $# -eq 0 ]] && exit 2 || exit 0
fi
if [[ -z "${HOSTS}" && -z "${SLURM_JOB_ID:-}" ]]; then
  echo "gpu_multinode.sh: set HOSTS=\"host0 host1 ...\" or run inside a SLURM" \
    "allocation (sbatch/salloc)" >&2
  exit 2
fi
for stage in "$@"; do
  run_stage "${stage}"
done
