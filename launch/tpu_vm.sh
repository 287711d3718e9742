#!/usr/bin/env bash
# Pretrain (or evaluate: JAXCLR_MODULE) on a Cloud TPU VM pod slice: create
# it, install jaxclr on every worker, run the same command on all workers
# (one JAX process per host; jax.distributed finds its peers through the TPU
# metadata), stream the logs here, and delete the slice afterwards.
#
#   TPU_NAME=simclr ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#   WORKDIR=/mnt/shared/runs/r50 \
#     launch/tpu_vm.sh [--dry-run] [--keep] [--skip-create] [--] [job flags...]
#
# Required environment:
#   TPU_NAME          name of the TPU VM (slice) to create / use
#   ZONE              a zone that has the accelerator, e.g. us-central2-b for v4
#   ACCELERATOR_TYPE  e.g. v4-32 (16 chips, 4 hosts), v5litepod-16, ...
#   WORKDIR           run directory on a filesystem that every worker mounts at
#                     the same path (Filestore NFS, or a gcsfuse mount made by
#                     SETUP_CMD): Orbax checkpoints are written by all hosts.
# Optional environment:
#   PROJECT           gcloud project (default: gcloud's configured project)
#   RUNTIME_VERSION   TPU VM image (default tpu-ubuntu2204-base)
#   JAXCLR_MODULE     the job: jaxclr.main (default, pretraining),
#                     jaxclr.linear_eval, jaxclr.finetune or jaxclr.distill
#   CONFIG            config file in the repo (default configs/imagenet.py;
#                     e.g. configs/linear_eval.py:dataset=imagenet for
#                     jaxclr.linear_eval)
#   JAX_SPEC          pip spec of JAX for TPU (default "jax[tpu]>=0.10.2")
#   SETUP_CMD         extra shell run on every worker before training
#                     (e.g. mounting the shared filesystem)
#   LOG_FILE          local copy of the streamed logs (default
#                     tpu_<TPU_NAME>_<time>.log)
# Flags:
#   --dry-run      print the commands instead of running them (no gcloud needed)
#   --keep         do not delete the slice at the end (also KEEP_TPU=1)
#   --skip-create  use an existing slice named TPU_NAME
# The slice is deleted on exit, also after a failure or Ctrl-C, unless --keep.
set -euo pipefail

dry_run=0
keep=${KEEP_TPU:-0}
skip_create=0
while [[ $# -gt 0 ]]; do
  case $1 in
    --dry-run) dry_run=1; shift ;;
    --keep) keep=1; shift ;;
    --skip-create) skip_create=1; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done

missing=()
for var in TPU_NAME ZONE ACCELERATOR_TYPE WORKDIR; do
  [[ -n ${!var:-} ]] || missing+=("$var")
done
if [[ ${#missing[@]} -gt 0 ]]; then
  echo "tpu_vm.sh: error: set ${missing[*]} (see the header of $0)" >&2
  exit 2
fi
if [[ $WORKDIR == gs://* ]]; then
  echo "tpu_vm.sh: error: WORKDIR=$WORKDIR: jaxclr writes config.json and" \
    "metrics.jsonl with local file I/O; mount the bucket (gcsfuse, via" \
    "SETUP_CMD) and give its path instead" >&2
  exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
runtime_version=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
config=${CONFIG:-configs/imagenet.py}
# shellcheck source=launch/jobs.sh
source "$(dirname "${BASH_SOURCE[0]}")/jobs.sh"
select_job tpu_vm.sh
jax_spec=${JAX_SPEC:-jax[tpu]>=0.10.2}
log_file=${LOG_FILE:-tpu_${TPU_NAME}_$(date +%Y%m%d_%H%M%S).log}
gcloud_common=(--zone="$ZONE")
[[ -n ${PROJECT:-} ]] && gcloud_common+=(--project="$PROJECT")
tpu=(gcloud compute tpus tpu-vm)
tarball=$(mktemp -u /tmp/jaxclr_XXXXXX).tar.gz

# Prints a command, shell-quoted, then runs it unless --dry-run.
run() {
  printf '+'
  printf ' %q' "$@"
  printf '\n'
  [[ $dry_run -eq 1 ]] || "$@"
}

# One shell line for the workers, every word quoted for the remote shell.
quote() {
  local out=() word
  for word in "$@"; do out+=("$(printf '%q' "$word")"); done
  echo "${out[*]}"
}

teardown() {
  local status=$?
  rm -f "$tarball"
  if [[ $keep -eq 1 ]]; then
    echo "tpu_vm.sh: keeping $TPU_NAME (delete it with: ${tpu[*]} delete" \
      "$TPU_NAME ${gcloud_common[*]} --quiet)" >&2
  else
    echo "tpu_vm.sh: deleting $TPU_NAME" >&2
    run "${tpu[@]}" delete "$TPU_NAME" "${gcloud_common[@]}" --quiet || \
      echo "tpu_vm.sh: error: could not delete $TPU_NAME; delete it by hand" \
        "or it keeps costing money" >&2
  fi
  exit "$status"
}

if [[ $skip_create -eq 0 ]]; then
  run "${tpu[@]}" create "$TPU_NAME" "${gcloud_common[@]}" \
    --accelerator-type="$ACCELERATOR_TYPE" --version="$runtime_version"
fi
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The committed tree (git archive), so every worker runs the same code.
run git -C "$repo" archive --format=tar.gz --prefix=jaxclr/ -o "$tarball" HEAD
run "${tpu[@]}" scp "$tarball" "$TPU_NAME:jaxclr.tar.gz" --worker=all \
  "${gcloud_common[@]}"
install="set -euo pipefail; rm -rf ~/jaxclr; tar xzf ~/jaxclr.tar.gz -C ~"
install+="; python3 -m pip install --quiet --upgrade pip"
install+="; python3 -m pip install --quiet $(quote "$jax_spec") -e ~/jaxclr"
[[ -n ${SETUP_CMD:-} ]] && install+="; $SETUP_CMD"
run "${tpu[@]}" ssh "$TPU_NAME" --worker=all "${gcloud_common[@]}" \
  --command="$install"

# Same command on every worker; --distributed=on makes a missing TPU
# environment an error instead of a silent single-host run.
train="cd ~/jaxclr && python3 -m $module --distributed=on"
train+=" $(quote --config "$config" --workdir "$WORKDIR" "$@")"
echo "tpu_vm.sh: training on all workers of $TPU_NAME; log: $log_file" >&2
if [[ $dry_run -eq 1 ]]; then
  run "${tpu[@]}" ssh "$TPU_NAME" --worker=all "${gcloud_common[@]}" \
    --command="$train"
else
  run "${tpu[@]}" ssh "$TPU_NAME" --worker=all "${gcloud_common[@]}" \
    --command="$train" 2>&1 | tee "$log_file"
fi
