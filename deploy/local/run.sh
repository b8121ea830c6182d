#!/usr/bin/env bash
# Run the whole stack on this machine: expert servers, the predictor and the gateway
# as separate processes on loopback. Ctrl-C (or SIGTERM) stops every process it started.
#
#   deploy/local/run.sh                                  # the stack in deploy/local/stack.yaml
#   deploy/local/run.sh --model /path/to/checkpoint --expert-servers 4 --port 8001
#   kill -USR1 <pid printed at start>                    # add an expert server while serving
#   kill -USR2 <pid>                                     # remove one (it drains first)
#
# Any moe-serve flag may be given; it overrides the file.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
cd "$here/../.."
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" -m gateway.launcher --config "$here/stack.yaml" "$@"
