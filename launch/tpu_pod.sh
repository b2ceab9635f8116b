#!/usr/bin/env bash
# Runs the training program on every worker of a Cloud TPU VM pod slice (one process per host).
#
# Usage: launch/tpu_pod.sh TPU_NAME ZONE -- [program flags...]
#   e.g. launch/tpu_pod.sh my-v4-32 us-central2-b -- --config=configs/cifar10.py \
#            --workdir=/mnt/shared/cifar10
#
# Steps: (1) copies this repository (without .git, .venv, workdirs) into $REMOTE_DIR on every
# worker and installs it with "$JAX_PACKAGE" into the virtualenv $REMOTE_DIR/.venv; (2) runs
# `python -m diffusion_jax.train --distributed [program flags...]` on all workers at once:
# jax.distributed.initialize() finds the coordinator and the process ids from the TPU metadata.
# Output of all workers streams back here. The workdir must be one directory shared by all
# workers (e.g. a Filestore or gcsfuse mount at the same path): every process writes its shards
# of each checkpoint into it. The program takes local paths only (no gs:// URLs).
#
# Environment variables:
#   PROJECT       GCP project (default: the gcloud configuration's)
#   REMOTE_DIR    where the repository goes on each worker, relative to the home directory
#                 (default: diffusion_jax)
#   JAX_PACKAGE   pip requirement that brings JAX for TPU (default: jax[tpu])
#   SKIP_INSTALL  1: skip step (1) and reuse what a previous run installed
#   SSH_FLAGS     extra flags for `gcloud compute tpus tpu-vm ssh/scp` (e.g. --internal-ip)
#
# Interrupting this script may leave the remote processes running. To stop a run, send them
# SIGTERM (they save a checkpoint and exit): gcloud compute tpus tpu-vm ssh TPU_NAME
# --zone=ZONE --worker=all --command='pkill -TERM -f diffusion_jax.train'. Rerunning this
# script with the same --workdir resumes from the last checkpoint.
set -euo pipefail

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//' >&2
    exit 2
}

if [[ $# -lt 4 || $3 != "--" ]]; then
    usage
fi
tpu_name=$1
zone=$2
shift 3

remote_dir=${REMOTE_DIR:-diffusion_jax}
jax_package=${JAX_PACKAGE:-jax[tpu]}
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
gcloud_flags=(--zone="$zone" --worker=all)
if [[ -n ${PROJECT:-} ]]; then
    gcloud_flags+=(--project="$PROJECT")
fi
read -r -a ssh_flags <<<"${SSH_FLAGS:-}"

on_all_workers() {
    gcloud compute tpus tpu-vm ssh "$tpu_name" "${gcloud_flags[@]}" "${ssh_flags[@]}" \
        --command="$1"
}

if [[ ${SKIP_INSTALL:-0} != 1 ]]; then
    archive=$(mktemp --suffix=.tar.gz)
    trap 'rm -f "$archive"' EXIT
    tar -czf "$archive" -C "$repo" --exclude=./.git --exclude=./.venv --exclude=./workdirs .
    gcloud compute tpus tpu-vm scp "$archive" "$tpu_name:diffusion_jax.tar.gz" \
        "${gcloud_flags[@]}" "${ssh_flags[@]}"
    on_all_workers "set -euo pipefail
        mkdir -p $(printf '%q' "$remote_dir") && cd $(printf '%q' "$remote_dir")
        tar -xzf ~/diffusion_jax.tar.gz
        python3 -m venv .venv || { sudo apt-get install -y python3-venv && python3 -m venv .venv; }
        .venv/bin/pip install --quiet --upgrade pip
        .venv/bin/pip install --quiet $(printf '%q' "$jax_package") -e ."
fi

on_all_workers "cd $(printf '%q' "$remote_dir") &&
    exec .venv/bin/python -m diffusion_jax.train --distributed $(printf '%q ' "$@")"
