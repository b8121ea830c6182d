#!/usr/bin/env python3
"""How long the replica planner takes, and what it achieves, for 2 to 64 expert servers.

    python benchmarks/planning_time.py --trace WORK/bench-trace     # a trace moe-bench --work-dir WORK recorded

Takes one batch's actual loads (all sparse layers) from a routing trace and plans
replicas with gateway.replication.plan_replicas for each server count and dispatch
policy, with --slots replica slots per server. Prints the trace's routing skew, then
replicas, the forecast makespan
(slowest server's tokens, summed over layers) against no replicas, and planning time.
The gateway plans once per batch on its planner thread (gateway/plan_worker.py), while
the previous batch runs: this time delays when replicas start loading, not a batch.
--group-cost weighs each expert group as that many tokens (--replica-group-cost).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gateway.replication import plan_replicas  # noqa: E402
from moe_bench.simulator import batches_of, skew  # noqa: E402
from moe_common.placement import home_placement  # noqa: E402
from moe_common.traces import ENCODER, load_manifest, read_passes  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trace", type=Path, required=True)
    p.add_argument("--batch", type=int, default=5, help="which recorded batch's loads to plan for")
    p.add_argument("--servers", default="2,4,8,16,64")
    p.add_argument("--slots", type=int, default=8)
    p.add_argument("--group-cost", type=float, default=0.0, help="a group's fixed cost in tokens' worth")
    a = p.parse_args()
    info = load_manifest(a.trace)
    batches = batches_of(list(read_passes(a.trace)))
    loads = np.zeros((info.num_layers, info.num_experts))
    for pas in batches[a.batch]:
        for j, layer in enumerate(info.layers_of(pas.kind)):
            loads[layer] += pas.loads(info.num_experts)[j]
    print(f"{info.model_source}: routing skew (busiest expert / fair share, mean over layer calls): "
          f"{skew(info, batches, ENCODER):.1f}x on encoder passes, {skew(info, batches):.1f}x on all passes")
    print(f"batch {a.batch}: {int(loads.sum())} routed tokens over {info.num_layers} layers, {a.slots} slots per server")
    for n in [int(x) for x in a.servers.split(",")]:
        home = home_placement(info.num_layers, info.num_experts, n)
        for policy in ("whole", "split", "auto"):
            t0 = time.perf_counter()
            plan = plan_replicas(loads.tolist(), home, [a.slots] * n, policy=policy, group_cost=a.group_cost)
            ms = (time.perf_counter() - t0) * 1e3
            print(f"  {n:3d} servers {policy:<5}: {len(plan.replicas):4d} replicas, makespan {plan.makespan:6.0f} "
                  f"vs {plan.baseline_makespan:6.0f} without ({plan.baseline_makespan / max(plan.makespan, 1):.1f}x), "
                  f"{ms:7.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
