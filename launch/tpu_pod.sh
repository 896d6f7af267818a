#!/usr/bin/env bash
# ReGrad on a Cloud TPU pod slice: each stage runs on every host of the slice at once.
#
# Usage:
#   TPU_NAME=my-v5e-16 ZONE=us-west4-a BUCKET=my-bucket launch/tpu_pod.sh STAGE...
#
#   STAGE (run in the order given):
#     setup        copy this checkout to every host, install it (with jax[tpu])
#                  into a venv, mount the bucket, prepare the data once
#     meta_train   meta-learn theta*, alpha on all chips        (all hosts)
#     build_bank   the Gradient Bank, rows split over the hosts   (all hosts)
#     build_index  the retrieval index                          (worker 0)
#     evaluate     every method of config.eval.methods           (worker 0)
#     all          setup meta_train build_bank build_index evaluate
#
#   The TPU VM must exist, e.g.
#     gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" \
#         --accelerator-type=v5litepod-16 --version=v2-alpha-tpuv5-lite
#   Stages are long: run this script from tmux/screen (if the ssh session
#   drops, the remote processes stop).
#
# How the hosts find each other: `gcloud ... ssh --worker=all` runs the same
# command on every host, and --config.distributed=True makes the launch call
# jax.distributed.initialize() with no arguments (regrad_jax.parallel.
# maybe_initialize_distributed). On a TPU VM JAX reads the coordinator address,
# the number of processes and this host's index from the TPU metadata server:
# nothing to set. jax.devices() then lists every chip of the slice, and the
# ("data", "model") mesh of configs/common.py (config.mesh) spans them all:
#   - meta_train splits each meta-batch over the chips (config.meta.batch_size
#     must be a multiple of the chip count: raise it with EXTRA_FLAGS);
#   - build_bank: each host computes and writes its own share of the documents
#     (parallel.process_slice); process 0 writes the manifest;
#   - build_index and evaluate are single-host programs: worker 0 runs them on
#     its own chips. A lone process on one host of a multi-host slice waits
#     forever for the others, unless the TPU runtime is told that this process
#     is the whole slice: SINGLE_HOST_ENV (TPU_PROCESS_BOUNDS=1,1,1 and the
#     host's chips; the default fits hosts of 4 chips in a 2x2 block: v4, v5e,
#     v5p). JAX_PLATFORMS=cpu is the fallback that always works.
#
# Storage: every host must see the same WORKDIR (orbax checkpoints and the
# TensorStore bank are written by all hosts). regrad_jax reads and writes local
# paths (pathlib), not gs:// URLs, so the bucket is mounted with gcsfuse at
# MOUNT on every host and WORKDIR lies inside it. A Filestore (NFS) share
# mounted at MOUNT works too and is faster for the bank's many small writes:
# set MOUNT_CMD to its mount command.
#
# Everything below can be overridden from the environment.
set -euo pipefail

TPU_NAME="${TPU_NAME:-regrad-v5e-16}"      # Name of the TPU VM (pod slice).
ZONE="${ZONE:-us-west4-a}"                 # Its zone.
PROJECT="${PROJECT:-}"                     # GCP project ("" = gcloud's default).
BUCKET="${BUCKET:-my-regrad-bucket}"       # GCS bucket (no gs://) for all outputs.
MOUNT="${MOUNT:-/mnt/regrad}"              # Where every host mounts it.
# NB: orbax commits a checkpoint by renaming its temporary folder, which gcsfuse
# refuses unless --rename-dir-limit exceeds the folder's file count.
MOUNT_CMD="${MOUNT_CMD:-gcsfuse --implicit-dirs --rename-dir-limit=200000 ${BUCKET} ${MOUNT}}"
RUN_NAME="${RUN_NAME:-smollm2_cpkc}"       # Folder of this run in the bucket.
WORKDIR="${WORKDIR:-${MOUNT}/runs/${RUN_NAME}}"  # = gs://$BUCKET/runs/$RUN_NAME
DATA_DIR="${DATA_DIR:-${MOUNT}/data}"      # Prepared data, shared by all hosts.
# Any configs/*.py[:args]; batch=16 (the reference's meta-batch) divides over
# 1, 2, 4, 8 or 16 chips.
CONFIG="${CONFIG:-configs/smollm2_cpkc.py:batch=16}"
# Extra config overrides for every stage, e.g. "--config.meta.num_steps=600".
EXTRA_FLAGS="${EXTRA_FLAGS:---config.model.dtype=bfloat16}"
# Worker 0 alone as a whole slice, for build_index and evaluate (see above);
# "JAX_PLATFORMS=cpu" runs them on its CPUs instead.
SINGLE_HOST_ENV="${SINGLE_HOST_ENV:-TPU_PROCESS_BOUNDS=1,1,1 \
TPU_CHIPS_PER_PROCESS_BOUNDS=2,2,1 TPU_VISIBLE_CHIPS=0,1,2,3}"
REMOTE_DIR="${REMOTE_DIR:-regrad_jax}"     # Checkout on each host (under ~).
VENV="${VENV:-regrad_venv}"                # Virtual environment on each host.
JAX_VERSION="${JAX_VERSION:-0.10.2}"       # = setup.py's pin; adds libtpu.
PYTHON="${PYTHON:-python3.11}"             # setup.py needs Python >= 3.11.

usage() {
  sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
}

# remote WORKER COMMAND: runs COMMAND in the checkout, venv active, on WORKER
# ("all" or a host index).
remote() {
  local worker="$1" command="$2"
  echo "[tpu_pod] worker=${worker}: ${command}" >&2
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" \
    ${PROJECT:+--project="${PROJECT}"} --worker="${worker}" \
    --command="set -euo pipefail; cd ~/${REMOTE_DIR}; source ~/${VENV}/bin/activate; ${command}"
}

# launch WORKER MODULE [FLAGS...]: python -m launch.MODULE on the shared paths;
# on all hosts as one distributed job, or on worker 0 alone.
launch() {
  local worker="$1" module="$2" prefix=""
  shift 2
  [[ "${worker}" == all ]] || prefix="env ${SINGLE_HOST_ENV} "
  remote "${worker}" "${prefix}python -m launch.${module} --config=${CONFIG} \
--config.data.root=${DATA_DIR} --workdir=${WORKDIR} ${EXTRA_FLAGS} $*"
}

setup() {
  # This checkout (committed files only) to every host.
  local tarball script
  tarball="$(mktemp -d)/regrad_jax.tar.gz"
  git -C "$(dirname "$0")/.." archive --format=tar.gz -o "${tarball}" HEAD
  gcloud compute tpus tpu-vm scp "${tarball}" "${TPU_NAME}:~/regrad_jax.tar.gz" \
    --zone="${ZONE}" ${PROJECT:+--project="${PROJECT}"} --worker=all
  # On every host: Python >= 3.11 (TPU VM images ship 3.10), the package with
  # libtpu, gcsfuse, the shared mount. ${...} expands here, \$ on the host.
  script="$(cat <<EOF
set -euo pipefail
command -v ${PYTHON} >/dev/null || {
  sudo apt-get update -q && sudo apt-get install -y -q ${PYTHON} ${PYTHON}-venv; }
if [[ "${MOUNT_CMD}" == gcsfuse* ]] && ! command -v gcsfuse >/dev/null; then
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg |
    sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  apt_repo="https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -cs) main"
  echo "deb [signed-by=/usr/share/keyrings/cloud.google.asc] \${apt_repo}" |
    sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  sudo apt-get update -q && sudo apt-get install -y -q gcsfuse
fi
mkdir -p ~/${REMOTE_DIR} && tar -xzf ~/regrad_jax.tar.gz -C ~/${REMOTE_DIR}
[[ -d ~/${VENV} ]] || ${PYTHON} -m venv ~/${VENV}
source ~/${VENV}/bin/activate
pip install -q -U pip && pip install -q -e ~/${REMOTE_DIR} "jax[tpu]==${JAX_VERSION}"
sudo mkdir -p ${MOUNT} && sudo chown \$(id -u):\$(id -g) ${MOUNT}
mountpoint -q ${MOUNT} || ${MOUNT_CMD}
EOF
)"
  gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone="${ZONE}" \
    ${PROJECT:+--project="${PROJECT}"} --worker=all --command="${script}"
  # The data once, into the shared mount (every host reads it from there).
  remote 0 "python -m launch.prepare_data --out=${DATA_DIR}"
}

run_stage() {
  case "$1" in
    setup) setup ;;
    # NB: --config.distributed=True only for the multi-host launches: it must
    # be on every host of the slice, or jax.distributed.initialize() waits for
    # the missing ones.
    meta_train) launch all meta_train --config.distributed=True ;;
    build_bank) launch all build_bank --config.distributed=True ;;
    build_index) launch 0 build_index ;;
    evaluate) launch 0 evaluate ;;
    all) for s in setup meta_train build_bank build_index evaluate; do run_stage "$s"; done ;;
    *) echo "unknown stage '$1'" >&2; usage >&2; exit 2 ;;
  esac
}

if [[ $# -eq 0 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  [[ $# -eq 0 ]] && exit 2 || exit 0
fi
for stage in "$@"; do
  run_stage "${stage}"
done
