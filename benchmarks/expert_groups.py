#!/usr/bin/env python3
"""Expert server: how to run the expert groups of one RunExperts call.

    python benchmarks/expert_groups.py [--model base-e32-l4] [--tokens 1024]

Runs one sparse layer's experts over `--tokens` tokens spread over all experts
with a skewed (Zipf-like, as routers produce) split, with the ExpertStore's
`sequential` executor (one expert after another, all intra-op threads) and its
`threads` executor (experts concurrently on a thread pool), in alternating rounds.
Prints median time, achieved GFLOP/s, and a dense matmul of the same total FLOPs
as the machine's reference.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from expert_server.experts import ExpertStore  # noqa: E402
from moe_bench.efficiency import zipf_split  # noqa: E402
from moe_common import model_source  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base-e32-l4")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    source = model_source.resolve(a.model)
    stores = {mode: ExpertStore(source, group_executor=mode) for mode in ("sequential", "threads")}
    first = stores["sequential"]
    experts = [(0, e) for e in range(first.num_experts)]
    for store in stores.values():
        store.assign(experts)
    counts = zipf_split(a.tokens, first.num_experts)
    groups = list(enumerate(counts))
    x = torch.randn(a.tokens, first.d_model)
    d_ff = first.config.d_ff
    flops = 2 * 2 * a.tokens * first.d_model * d_ff
    wi, wo = torch.randn(d_ff, first.d_model), torch.randn(first.d_model, d_ff)

    def dense():
        return torch.nn.functional.linear(torch.relu(torch.nn.functional.linear(x, wi)), wo)

    runs = {"sequential": lambda: stores["sequential"].run(0, groups, x),
            "threads": lambda: stores["threads"].run(0, groups, x),
            "dense matmul (same FLOPs)": dense}
    times = {name: [] for name in runs}
    for fn in runs.values():
        fn()  # warm-up
    for _ in range(a.rounds):
        for name, fn in runs.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    assert torch.equal(runs["sequential"](), runs["threads"]())
    print(f"{a.model}: {a.tokens} tokens over {len(groups)} experts (largest group {max(counts)}), "
          f"torch threads {torch.get_num_threads()}, median of {a.rounds}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:<28} {med * 1e3:8.1f} ms  {flops / med / 1e9:7.1f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
