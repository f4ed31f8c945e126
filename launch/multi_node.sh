#!/usr/bin/env bash
# Several machines with a c10d rendezvous: run this same command on every node.
#   MASTER=host0:29400 NNODES=2 NPROC=8 launch/multi_node.sh configs/default.yaml
# Node ranks are assigned by the rendezvous; the job id keeps concurrent jobs apart.
set -euo pipefail
config=${1:-configs/default.yaml}
shift || true
: "${MASTER:?set MASTER=host:port of the rendezvous (any node reachable by all)}"
exec disttrain launch --nnodes "${NNODES:-2}" --nproc-per-node "${NPROC:-1}" \
  --rdzv-endpoint "$MASTER" --rdzv-id "${JOB_ID:-disttrain-$(basename "$config" .yaml)}" \
  --max-restarts "${MAX_RESTARTS:-0}" fit --config "$config" "$@"
