#!/usr/bin/env bash
# Run one command on every worker of a TPU VM pod slice (JAX multi-controller: one process per host).
#
#   TPU_NAME=my-v5p-64 TPU_ZONE=us-east5-a launch/tpu_pod.sh -- \
#       python launch/train.py --config configs/weibo.py:7b \
#           --config.model.weights=hf:/mnt/shared/Qwen2.5-7B-Instruct \
#           --config.data.input=/mnt/shared/events --workdir /mnt/shared/runs/7b
#
# Parameters (flags override the environment):
#   --name NAME     / TPU_NAME      the TPU VM (required)
#   --zone ZONE     / TPU_ZONE      its zone (required)
#   --project P     / TPU_PROJECT   GCP project (default: gcloud's configured one)
#   --repo DIR      / TPU_REPO_DIR  this repository's path on the workers (default: ~/socialalign-jax)
#   --dry-run                       print the gcloud command instead of running it
# Everything after `--` is the command, run from the repository directory on every worker.
#
# Nothing is downloaded: the repository (with its Python environment), the base weights and the
# data must already be on every worker or on a filesystem all workers mount (the workdir too,
# since every process writes its shard of each checkpoint there). On a pod, launch/train.py
# finds the coordinator from the TPU environment (jax.distributed.initialize()), so no
# --config.distributed.* flags are needed.
set -euo pipefail

name="${TPU_NAME:-}"; zone="${TPU_ZONE:-}"; project="${TPU_PROJECT:-}"
repo="${TPU_REPO_DIR:-~/socialalign-jax}"; dry=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="$2"; shift 2 ;;
    --zone) zone="$2"; shift 2 ;;
    --project) project="$2"; shift 2 ;;
    --repo) repo="$2"; shift 2 ;;
    --dry-run) dry=1; shift ;;
    --) shift; break ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    *) echo "error: tpu_pod.sh: unknown argument '$1' (put the command after --)" >&2; exit 2 ;;
  esac
done
[[ -n "$name" ]] || { echo "error: tpu_pod.sh: no TPU name (--name or TPU_NAME)" >&2; exit 2; }
[[ -n "$zone" ]] || { echo "error: tpu_pod.sh: no zone (--zone or TPU_ZONE)" >&2; exit 2; }
[[ $# -gt 0 ]] || { echo "error: tpu_pod.sh: no command given after --" >&2; exit 2; }

remote="cd $repo && $(printf '%q ' "$@")"
cmd=(gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all --command "$remote")
[[ -n "$project" ]] && cmd+=(--project "$project")
if [[ $dry -eq 1 ]]; then
  printf '%q ' "${cmd[@]}"; echo
else
  exec "${cmd[@]}"
fi
