#!/usr/bin/env bash
# The GPU check, for a machine where CUDA torch is installed system-wide and nothing can be
# downloaded (the lent H200: shared/gpu/README.md). From the repository root:
#
#   WHEELS=wheels/ bash benchmarks/gpu_check.sh
#
# It never makes a venv and never installs torch. Steps, each under its own timeout and
# each run even when one before it failed, all within BUDGET_S (under 8 minutes):
#   wheels     with WHEELS: pip install --no-deps --target $DEPS every *.whl there, then
#              PYTHONPATH=$DEPS:<repo> (the services start their children with
#              sys.executable -m, so they inherit it)
#   nvidia-smi recorded when present
#   preflight  benchmarks/gpu_preflight.py: names every package the project needs that is
#              missing or too old, with the version it needs; torch, CUDA, devices
#   pytest     the tests marked gpu (tests/test_gpu.py)
#   expert-kernels  benchmarks/expert_kernels.py --device cuda: HF's loop, exact, grouped, dense
#   layer-call benchmarks/layer_call.py on cuda: gRPC bytes against shared memory per call size
#   gpu-costs  benchmarks/gpu_costs.py: expert costs on the GPU, for moe-bench --gpu-costs
#   gpu-costs-grouped  the same for --expert-kernel grouped in bf16 (replaces the costs that
#              benchmarks/grouped_costs.py derives from one timing, for issue 12's projection)
#   moe-bench  short, everything on the GPU, once moe-bench has --device; again with
#              --expert-kernel grouped and bf16 on the wire where it has those flags
#   ping-pong  benchmarks/ping_pong.py on cuda: a batch's two halves on two threads and
#              streams against the whole batch on one, the bound on what ping-pong
#              micro-batches would gain (last: it runs only if time is left)
#   summary    gpu_check.json: device, date and every step's result
# Without a usable CUDA device the GPU steps are skipped and the summary says why.
#
# Results go into $OUT (default benchmarks/results/gpu/ under the repository root): preflight.json, gpu_costs.json,
# gpu_costs_grouped.json, moe_bench.json, moe_bench_grouped.json, ping_pong.json, pytest-gpu.xml, nvidia-smi.txt, gpu_check.json, logs/<step>.log.
# Exit status: 0 when every step passed; 2 when there is no usable CUDA device; 1 otherwise.
#
# Environment: PYTHON (python3), WHEELS, DEPS (/tmp/moe-gpu-deps), OUT, BUDGET_S (460),
# GPU_COSTS_MODEL (base-e32-l4, the model of shared/gpu/h200-expert-costs.json),
# MOE_BENCH_MODEL (tiny).
#
# The wheels the H200 lacked, fetched on a machine with network (pytest and its own
# dependencies are for the tests; the rest as shared/gpu/README.md lists):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d wheels \
#     transformers==5.24.0 grpcio==1.85.1 grpcio-health-checking==1.85.1 grpcio-reflection==1.85.1 \
#     protobuf==7.35.1 sru==2.6.0 pytest pluggy iniconfig pygments

set -uo pipefail  # no -e: a failed step must not stop the ones after it
cd "$(dirname "$0")/.."
REPO="$PWD"
PY="${PYTHON:-python3}"
OUT="${OUT:-benchmarks/results/gpu}"
DEPS="${DEPS:-/tmp/moe-gpu-deps}"
BUDGET_S="${BUDGET_S:-460}"
GPU_COSTS_MODEL="${GPU_COSTS_MODEL:-base-e32-l4}"
MOE_BENCH_MODEL="${MOE_BENCH_MODEL:-tiny}"
mkdir -p "$OUT/logs"
OUT="$(cd "$OUT" && pwd)"
DEADLINE=$((SECONDS + BUDGET_S))
# Nothing here may reach the network; Python output unbuffered so the logs keep up.
# No progress bars in the logs.
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
export HF_HUB_DISABLE_PROGRESS_BARS=1 TQDM_DISABLE=1
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
STEPS=()  # one "name<TAB>status<TAB>seconds<TAB>note" per step

record() { STEPS+=("$1"$'\t'"$2"$'\t'"$3"$'\t'"$4"); }

# step NAME LIMIT_S COMMAND...: run COMMAND under `timeout` (it stops the whole process
# group: expert servers and gateways the tests started go too), logging into
# $OUT/logs/NAME.log, within what is left of the budget.
step() {
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - SECONDS - 15))  # keep 15 s for the summary
    ((limit > left)) && limit=$left
    if ((limit < 20)); then
        record "$name" SKIPPED 0 "out of time: $((DEADLINE - SECONDS)) s left of $BUDGET_S"
        echo "== $name: skipped, out of time"
        return 1
    fi
    echo "== $name (at most ${limit} s): $*"
    local log="$OUT/logs/$name.log" t0=$SECONDS rc
    timeout -k 15 "$limit" "$@" 2>&1 | tee "$log"
    rc=${PIPESTATUS[0]}
    local note
    note=$(grep -v '^[[:space:]]*$' "$log" | tail -n 1 | cut -c1-240)
    if ((rc == 0)); then
        record "$name" ok $((SECONDS - t0)) "$note"
    elif ((rc == 124 || rc == 137)); then
        record "$name" "TIMED OUT" $((SECONDS - t0)) "after ${limit} s; last line: $note"
    else
        record "$name" "FAILED (exit $rc)" $((SECONDS - t0)) "$note"
    fi
    return "$rc"
}

# --- wheels -------------------------------------------------------------------------
if [ -n "${WHEELS:-}" ]; then
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    shopt -u nullglob
    if ((${#wheels[@]} == 0)); then
        record wheels "FAILED" 0 "WHEELS=$WHEELS holds no *.whl"
    else
        # --upgrade: replace what an earlier run put into $DEPS.
        step wheels 120 "$PY" -m pip install --no-deps --no-index --upgrade --target "$DEPS" "${wheels[@]}"
    fi
    export PYTHONPATH="$DEPS:$PYTHONPATH"
else
    record wheels SKIPPED 0 "no WHEELS given: using the packages installed for $PY"
fi
echo "PYTHONPATH=$PYTHONPATH"

# --- nvidia-smi ---------------------------------------------------------------------
if command -v nvidia-smi >/dev/null; then
    step nvidia-smi 30 nvidia-smi && cp "$OUT/logs/nvidia-smi.log" "$OUT/nvidia-smi.txt"
else
    record nvidia-smi SKIPPED 0 "nvidia-smi is not on PATH (no NVIDIA driver installed?)"
fi

# --- preflight ----------------------------------------------------------------------
step preflight 180 "$PY" benchmarks/gpu_preflight.py --json "$OUT/preflight.json"
if (($? == 2)); then  # the packages are fine; only the device is missing
    IFS=$'\t' read -r name status seconds note <<<"${STEPS[-1]}"
    unset 'STEPS[-1]'
    record "$name" "NO CUDA" "$seconds" "$note"
fi
# Whether the GPU steps can run: the preflight's finding, or torch asked directly when the
# preflight wrote nothing.
NO_CUDA=$("$PY" - "$OUT/preflight.json" 2>&1 <<'EOF'
import json, sys
try:
    cuda = json.load(open(sys.argv[1]))["cuda"]
    print("" if cuda["available"] else cuda["reason"])
except (OSError, ValueError, KeyError):
    try:
        import torch
        print("" if torch.cuda.is_available() else f"torch {torch.__version__} sees no CUDA device")
    except Exception as exc:
        print(f"torch does not import: {exc}")
EOF
)
NO_CUDA=$(printf '%s' "$NO_CUDA" | tail -n 1)

# --- GPU steps ----------------------------------------------------------------------
if [ -n "$NO_CUDA" ]; then
    echo "NO CUDA DEVICE: $NO_CUDA; skipping the GPU steps"
    for name in pytest expert-kernels layer-call gpu-costs gpu-costs-grouped moe-bench moe-bench-grouped ping-pong; do
        record "$name" SKIPPED 0 "no CUDA device: $NO_CUDA"
    done
else
    # Only the modules that hold gpu tests: collecting the whole tree would import the
    # CPU-only tests' packages (hypothesis, tritonclient, ...) that this machine may lack.
    gpu_tests=$(grep -l 'pytest.mark.gpu' tests/test_*.py | tr '\n' ' ')
    # shellcheck disable=SC2086
    step pytest 240 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$OUT/pytest-gpu.xml" ${gpu_tests:-tests/test_gpu.py}

    step expert-kernels 60 "$PY" benchmarks/expert_kernels.py --device cuda --out "$OUT/expert_kernels.json"

    # Same-host transport with the gateway's hidden states and the experts on the GPU.
    step layer-call 90 "$PY" benchmarks/layer_call.py --device cuda --gateway-device cuda --repeats 5 \
        --out "$OUT/layer_call.json"

    step gpu-costs 150 "$PY" benchmarks/gpu_costs.py --model "$GPU_COSTS_MODEL" --out "$OUT/gpu_costs.json"
    step gpu-costs-grouped 60 "$PY" benchmarks/gpu_costs.py --model "$GPU_COSTS_MODEL" --expert-kernel grouped \
        --dtype bfloat16 --out "$OUT/gpu_costs_grouped.json"

    # moe-bench has no __main__ module and is not installed here: call its main().
    bench=("$PY" -c 'import sys; from moe_bench.cli import main; sys.exit(main())')
    bench_help=$("$PY" -c 'from moe_bench.cli import build_parser; print(build_parser().format_help())' 2>/dev/null)
    work=$(mktemp -d /tmp/moe-gpu-bench.XXXXXX)
    short=(--model "$MOE_BENCH_MODEL" --device cuda --expert-servers 2 --modes off,window --batch-size 8
           --prompt-tokens 64 --new-tokens 8 --clients 1 --requests 6 --warmup 1 --rounds 1 --train-docs 16
           --simulate-servers "" --no-one-server --log-level WARNING)
    if [[ "$bench_help" == *--device* ]]; then
        step moe-bench 150 "${bench[@]}" "${short[@]}" --work-dir "$work" \
            --json "$OUT/moe_bench.json" --markdown "$OUT/moe_bench.md"
    else
        record moe-bench SKIPPED 0 "moe-bench has no --device yet (issue 10 item 4)"
    fi
    if [[ "$bench_help" == *--device* && "$bench_help" == *--expert-kernel* && -f "$work/forecaster.pt" ]]; then
        # The grouped kernel with bf16 on the wire, reusing the forecaster trained above.
        wire=()
        [[ "$bench_help" == *--wire-dtype* ]] && wire=(--wire-dtype bfloat16)
        step moe-bench-grouped 120 "${bench[@]}" "${short[@]}" --expert-kernel grouped "${wire[@]}" \
            --predictor-checkpoint "$work/forecaster.pt" \
            --json "$OUT/moe_bench_grouped.json" --markdown "$OUT/moe_bench_grouped.md"
    elif [[ "$bench_help" != *--expert-kernel* ]]; then
        record moe-bench-grouped SKIPPED 0 "moe-bench has no --expert-kernel yet"
    else
        record moe-bench-grouped SKIPPED 0 "the exact moe-bench run left no forecaster to reuse"
    fi

    step ping-pong 60 "$PY" benchmarks/ping_pong.py --device cuda --expert-device cuda --model "$MOE_BENCH_MODEL" \
        --rounds 2 --batches 3 --out "$OUT/ping_pong.json"
fi

# --- summary ------------------------------------------------------------------------
[ -n "${work:-}" ] && rm -rf "$work"
STATUS=0
for s in "${STEPS[@]}"; do
    IFS=$'\t' read -r name status seconds note <<<"$s"
    case "$status" in ok | SKIPPED | "NO CUDA") ;; *) STATUS=1 ;; esac
done
[ -n "$NO_CUDA" ] && STATUS=2
printf '%s\n' "${STEPS[@]}" >"$OUT/logs/steps.tsv"
"$PY" - "$OUT" "$BUDGET_S" "$SECONDS" "$STATUS" "$NO_CUDA" <<'EOF' || echo "(could not write gpu_check.json)"
import json, platform, sys
from datetime import datetime, timezone
from pathlib import Path
out, budget, elapsed, status, no_cuda = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
steps = [dict(step=name, status=status, seconds=int(seconds), note=note) for name, status, seconds, note in
         (line.split("\t", 3) for line in (out / "logs" / "steps.tsv").read_text().splitlines() if line)]
try:
    device = json.loads((out / "preflight.json").read_text())["device"]
except (OSError, ValueError, KeyError):
    device = "unknown (no preflight.json)"
(out / "gpu_check.json").write_text(json.dumps(dict(
    device=device, date=datetime.now(timezone.utc).isoformat(timespec="seconds"), host=platform.node(),
    no_cuda_reason=no_cuda or None, exit_status=status, elapsed_s=elapsed, budget_s=budget, steps=steps,
    files=sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())), indent=1) + "\n")
EOF
echo
echo "== summary ($SECONDS s of $BUDGET_S s; results in $OUT)"
for s in "${STEPS[@]}"; do
    IFS=$'\t' read -r name status seconds note <<<"$s"
    printf '  %-17s %-18s %4ss  %s\n' "$name" "$status" "$seconds" "$note"
done
case $STATUS in
0) echo "GPU check passed." ;;
2) echo "NO CUDA DEVICE: $NO_CUDA. The GPU steps did not run." ;;
*) echo "GPU check FAILED: see the steps above and $OUT/logs/." ;;
esac
exit "$STATUS"
