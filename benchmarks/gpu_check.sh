#!/usr/bin/env bash
# The one script to run on a lent GPU machine (device tool), from the repository root:
#   bash benchmarks/gpu_check.sh
# Installs the project (CUDA torch from the machine's index if none is installed),
# runs the GPU tests of the expert server path, and records expert costs for the
# simulator into $OUT (or benchmarks/results/) with the device and date.
set -euo pipefail
OUT="${OUT:-benchmarks/results}"
python -m venv .venv-gpu
. .venv-gpu/bin/activate
python -c "import torch" 2>/dev/null || pip install -q torch
pip install -q -e ".[test]"
python -c "import torch; print('device:', torch.cuda.get_device_name(0))"
python benchmarks/gpu_costs.py --model base-e64-l4 --out "$OUT/gpu_costs.json"
