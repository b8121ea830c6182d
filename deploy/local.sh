#!/usr/bin/env bash
# Run the whole stack on this machine: expert servers and the gateway as separate
# processes on loopback. Ctrl-C (or SIGTERM) stops every process it started.
#
#   deploy/local.sh                                   # tiny preset, 2 expert servers, port 50051
#   deploy/local.sh --model /path/to/checkpoint --expert-servers 4 --port 8001
#
# Any moe-serve flag may be given; later flags override the defaults below.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
exec "$PYTHON" -m gateway.launcher --model tiny --expert-servers 2 --port 50051 "$@"
