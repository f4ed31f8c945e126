#!/usr/bin/env bash
# One machine, N workers, through torchrun directly (disttrain launch does the same and
# validates the config first). Usage: launch/single_node.sh [CONFIG] [NPROC] [KEY=VALUE ...]
set -euo pipefail
config=${1:-configs/default.yaml}
nproc=${2:-2}
shift $(( $# < 2 ? $# : 2 ))
disttrain print-config --config "$config" "$@" >/dev/null  # exit 2 on a bad config, before spawning
exec torchrun --standalone --nproc-per-node "$nproc" -m disttrain fit --config "$config" "$@"
