#!/usr/bin/env bash
# Quickstart on a fresh machine with only Python: install into .venv, start the stack
# on the tiny preset (2 expert servers + gateway on 127.0.0.1:50051), send one request
# and keep serving until Ctrl-C.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[test]"
PYTHON=.venv/bin/python exec deploy/local/run.sh --demo "$@"
