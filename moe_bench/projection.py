"""Projection to a GPU cluster: the simulator (moe_bench/simulator.py) driven by costs
measured on a GPU instead of this machine's.

Inputs (both written on an NVIDIA H200 by the project's own scripts; copies in benchmarks/results/h200/):
  expert costs   `benchmarks/gpu_costs.py`: group_s (fixed cost of one expert group),
                 token_s (per routed token), replica_load_s; `--gpu-costs FILE`.
  gateway costs  `benchmarks/hf_anchors.py`: the single-process HF model's generate() seconds for
                 B x 128 prompts and the share of it inside the experts modules;
                 `--gateway-costs FILE`. Everything but the experts (attention, norms,
                 routers, LM head) is what a gateway on that GPU runs, so the non-expert
                 time of one batch is seconds x (1 - expert share), for the anchor whose
                 batch size and prompt length match the workload.
The per-layer-call transport is not in either file: it is `layer_overhead_s`
(default 0, an ideal data plane; CUDA IPC measured 0.41 ms for 12.6 MB on that host),
stated in the report beside the figures.

Reported per server count: expert-layer seconds and end-to-end seconds of mode off and
of predictive with each dispatch policy, and their speed-ups over off.
"""

from __future__ import annotations

import json
from pathlib import Path

from moe_bench import simulator

POLICIES = ("whole", "split", "auto")


def expert_costs(path: Path) -> dict:
    """group_s, token_s, replica_load_s and where they were measured, from a gpu_costs JSON."""
    d = json.loads(Path(path).read_text())
    missing = {"group_s", "token_s"} - set(d)
    if missing:
        raise SystemExit(f"{path}: not a benchmarks/gpu_costs.py result (no {sorted(missing)})")
    where = f"{d.get('device', 'a GPU')} {d.get('date', '')}".strip()
    kernel = d.get("kernel", "exact")
    # benchmarks/grouped_costs.py writes costs derived from one timing, and says so.
    source = (f"{kernel} expert costs derived from a timing on {where}: {d['derived']}" if "derived" in d
              else f"{kernel} expert costs measured on {where}")
    return dict(group_s=float(d["group_s"]), token_s=float(d["token_s"]), call_s=float(d.get("call_s", 0.0)),
                replica_load_s=float(d.get("replica_load_s", 0.0)), source=source)


def non_expert_per_batch(path: Path, batch_size: int, prompt_tokens: int, new_tokens: int,
                         dtype: str = "float32") -> tuple[float, str]:
    """Seconds per batch outside the experts, from an hf_anchors JSON: (seconds, source).
    The anchors are for prompts of 128 tokens and 8 new tokens; other workloads are refused
    rather than scaled by a guess."""
    d = json.loads(Path(path).read_text())
    key = f"hf_{dtype}_{batch_size}x{prompt_tokens}"
    if new_tokens != 8 or f"{key}_s" not in d or f"{key}_expert_share" not in d:
        have = sorted(k[:-2] for k in d if k.startswith(f"hf_{dtype}_") and k.endswith("_s"))
        raise SystemExit(f"{path} has no anchor for {batch_size} x {prompt_tokens} prompts with {new_tokens} new "
                         f"tokens in {dtype} (it has {have}, all with 8 new tokens)")
    seconds, share = float(d[f"{key}_s"]), float(d[f"{key}_expert_share"])
    return seconds * (1 - share), (f"HF generate() on {d.get('device', 'a GPU')}: {seconds * 1e3:.0f} ms per batch, "
                                   f"{share:.0%} in experts")


def project(info, batches, forecaster, servers: list[int], slots: int, expert: dict, non_expert_batch_s: float,
            *, window: int, measured_from: int, lookahead: bool, layer_overhead_s: float = 0.0,
            progress=None) -> dict:
    """{n: {name: figures}} for name in off, predictive-whole, predictive-split, predictive-auto."""
    measured = len(batches) - measured_from
    costs = simulator.Costs(expert["group_s"], expert["token_s"], layer_overhead_s,
                            non_expert_batch_s * measured, expert["replica_load_s"], expert["source"],
                            call_s=expert.get("call_s", 0.0))
    # The gateway on that GPU is told a group's cost (--replica-group-cost group_s / token_s).
    group_cost = expert["group_s"] / expert["token_s"]
    out = {}
    for n in servers:
        rows = {}
        for name, mode, policy in [("off", "off", "whole")] + [(f"predictive-{p}", "predictive", p) for p in POLICIES]:
            s = simulator.simulate(info, batches, n, mode, costs, slots=slots, policy=policy, window=window,
                                   forecaster=forecaster, measured_from=measured_from, lookahead=lookahead,
                                   group_cost=group_cost)
            rows[name] = dict(expert_layer_s=s["expert_layer_s"], encoder_layer_s=s["encoder_layer_s"],
                              end_to_end_s=s["seconds"], balancedness=s["balancedness"],
                              prefetch_hit_rate=s["prefetch_hit_rate"],
                              prefetch_hit_rate_by_layer=s["prefetch_hit_rate_by_layer"])
            if progress:
                progress(f"{n} servers, {name}: expert layers {s['expert_layer_s'] * 1e3:.1f} ms, "
                         f"balancedness {s['balancedness']:.3f}")
        off = rows["off"]
        for r in rows.values():
            r["expert_speedup"] = off["expert_layer_s"] / r["expert_layer_s"] if r["expert_layer_s"] else 1.0
            r["end_to_end_speedup"] = off["end_to_end_s"] / r["end_to_end_s"] if r["end_to_end_s"] else 1.0
        out[str(n)] = rows
    return dict(costs=costs.to_json(), non_expert_batch_s=non_expert_batch_s, measured_batches=measured,
                group_cost=group_cost,
                slots=slots, lookahead=lookahead, servers=out)


def markdown(p: dict) -> list[str]:
    """The projection as a Markdown table."""
    c = p["costs"]
    lines = [f"Projected with {c['source']} (call {c.get('call_s', 0.0) * 1e3:.3f} ms, group {c['group_s'] * 1e3:.3f} ms, "
             f"{c['token_s'] * 1e6:.3f} us per token, "
             f"replica load {c['replica_load_s'] * 1e3:.1f} ms), non-expert time {p['non_expert_batch_s'] * 1e3:.1f} ms "
             f"per batch, transport {c['layer_overhead_s'] * 1e3:.2f} ms per layer call, {p['slots']} replica slots "
             f"per server, {p['measured_batches']} batches; speed-up over mode off:", "",
             "| servers | off: expert layers ms | " + " | ".join(f"{x}: experts / end to end / balancedness"
                                                           for x in ("whole", "split", "auto")) + " |",
             "| ---: | ---: | " + " | ".join("---" for _ in POLICIES) + " |"]
    for n, rows in p["servers"].items():
        cells = [f"{rows[f'predictive-{x}']['expert_speedup']:.2f}x / {rows[f'predictive-{x}']['end_to_end_speedup']:.2f}x"
                 f" / {rows[f'predictive-{x}']['balancedness']:.2f}" for x in POLICIES]
        lines.append(f"| {n} | {rows['off']['expert_layer_s'] * 1e3:.1f} | " + " | ".join(cells) + " |")
    return lines


def plot(p: dict, path: Path) -> Path:
    """Expert-layer and end-to-end speed-up over mode off against server count, per policy (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    servers = [int(n) for n in p["servers"]]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    for ax, key, title in ((axes[0], "expert_speedup", "expert layers"), (axes[1], "end_to_end_speedup", "end to end")):
        for policy in POLICIES:
            ax.plot(servers, [p["servers"][str(n)][f"predictive-{policy}"][key] for n in servers], marker="o",
                    label=f"predictive, {policy}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("expert servers")
        ax.set_title(f"{title}: speed-up over static placement")
    axes[0].set_ylabel("x mode off")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
