#!/usr/bin/env python3
"""Expert costs on a GPU, for the simulator's projection (moe-bench --gpu-costs FILE).

    python benchmarks/gpu_costs.py --model base-e64-l4 --out benchmarks/results/gpu_costs.json
    python benchmarks/gpu_costs.py --model base-e64-l4 --expert-kernel grouped --dtype bfloat16 \
        --out benchmarks/results/gpu_costs_grouped.json

Runs the expert server's ExpertStore on CUDA (weights loaded through the same code as
`moe-expert-server --device cuda`, replicas on its copy stream from pinned memory) and
measures, as moe-bench does on the CPU: a routed batch's expert path against one dense
matmul of the same FLOPs, the fitted per-group and per-token costs, and the time to
load one replica. With `--expert-kernel grouped` the costs come from a fit with a fixed
cost per call (call_s: the grouped kernel launches once per call, not per group), since
the single-group fit would count that as a cost per group. Also checks that the CUDA experts agree with the CPU ones (float
tolerance: GPU kernels round differently). Writes JSON with the device and the date.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from expert_server.experts import ExpertStore  # noqa: E402
from moe_bench.efficiency import fit_call_costs, measure, zipf_split  # noqa: E402
from moe_common import model_source  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base-e64-l4")
    p.add_argument("--tokens", type=int, default=1024, help="routed tokens of one layer call (8 x 128)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--expert-kernel", choices=["exact", "grouped"], default="exact",
                   help="the expert server's kernel to cost (grouped needs bfloat16 on CUDA)")
    p.add_argument("--device", default="cuda", help="cuda (the point); cpu only to try the script")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_costs.json"))
    a = p.parse_args()
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device here", file=sys.stderr)
        return 2
    source = model_source.resolve(a.model)
    gpu = ExpertStore(source, device=a.device, dtype=a.dtype, kernel=a.expert_kernel)
    cpu = ExpertStore(source)
    counts = zipf_split(a.tokens, gpu.num_experts)
    result = measure(gpu, counts, threads=1)
    result["kernel"] = a.expert_kernel
    if a.expert_kernel == "grouped":
        fit = fit_call_costs(gpu)
        result.update(call_s=fit["call_s"], group_s=fit["group_s"], token_s=fit["token_s"], fit_points=fit["points"])
    # Agreement with the CPU expert path on the same routed batch.
    keys = [(0, e) for e in range(len(counts))]
    gpu.assign(keys)
    cpu.assign(keys)
    x = torch.randn(sum(counts), gpu.d_model)
    groups = list(enumerate(counts))
    diff = (gpu.run(0, groups, x).float() - cpu.run(0, groups, x)).abs().max().item()
    loads = []
    for e in range(5):
        t0 = time.perf_counter()
        gpu.load_weights((1, e))  # what SetReplicas does per replica: read, pin, copy on the copy stream
        loads.append(time.perf_counter() - t0)
    device = torch.cuda.get_device_name(0) if gpu.device.type == "cuda" else "cpu"
    result.update(device=device, date=date.today().isoformat(), model=source.spec,
                  replica_load_s=statistics.median(loads), max_abs_diff_vs_cpu=diff)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
