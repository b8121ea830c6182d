"""moe-bench results as a Markdown report and PNG plots, and the README section made from them."""

from __future__ import annotations

import re
from pathlib import Path

START, END = "<!-- moe-bench:start -->", "<!-- moe-bench:end -->"


def _row(cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def _servers(name: str) -> str:
    """ "N/mode" -> "N expert server(s), mode M"."""
    n, mode = name.split("/")
    return f"{n} expert server{'s' if n != '1' else ''}, mode {mode}"


def markdown(result: dict, plots: dict[str, str] | None = None) -> str:
    """The report: the run's setup, the measured table, validation, simulation, efficiency."""
    w, m = result["workload"], result["machine"]
    out = [
        f"Command: `{result['command']}`  ",
        f"Machine: {m['description']}; {result['date']}.  ",
        f"Model `{result['model']}` ({result['num_experts']} experts x {result['num_sparse_layers']} sparse layers); "
        f"{result['expert_servers']} expert servers, replica memory {result['replica_memory']} each, "
        f"policy `{result['policy']}`, replica sharing `{result.get('replica_sharing', 'auto')}`; requests of {w['batch_size']} prompts x {w['prompt_tokens']} tokens, "
        f"{w['new_tokens']} new tokens, {w['clients']} clients, {w['requests']} measured requests "
        f"after {w['warmup']} warm-up. Forecaster: {result['forecaster']}.",
        *([f"Serving path: device `{sv['device']}`, expert kernel `{sv['expert_kernel']}`, wire dtype "
           f"`{sv['wire_dtype']}`, transport `{sv['transport']}`, scheduler `{sv.get('scheduler', 'static')}`. "
           f"One forward pass against the single-process "
           f"model: max abs logit difference {sv['max_abs_logit_diff']:.2e}"
           f"{' (bit for bit equal)' if sv['logits_equal'] else ''}, argmax agreement {sv['argmax_agreement']:.1%}."]
          if (sv := result.get("serving")) and "max_abs_logit_diff" in sv else []),
        "",
        _row(["", "tokens/s total", "prefill", "decode", "vs single-process", "p50 ms", "p99 ms", "balancedness",
              "busiest server busy", "weights moved MB", "prefetch hits", "identical"]),
        _row(["---"] * 12),
    ]
    mono = result["monolithic"]
    out.append(_row(["single-process HF", f"{mono['tokens_per_s']['total']:.0f}", f"{mono['tokens_per_s']['prefill']:.0f}",
                     f"{mono['tokens_per_s']['decode']:.0f}", "1.00x", f"{mono['p50_ms']:.0f}", f"{mono['p99_ms']:.0f}",
                     "", "", "", "", "reference"]))
    for name, r in result["modes"].items():
        out.append(_row([
            name, f"{r['tokens_per_s']['total']:.0f}", f"{r['tokens_per_s']['prefill']:.0f}",
            f"{r['tokens_per_s']['decode']:.0f}", f"{r['vs_monolithic']:.2f}x", f"{r['p50_ms']:.0f}", f"{r['p99_ms']:.0f}",
            f"{r['balancedness']:.3f}", f"{max(r['busy_share']):.0%}", f"{r['weights_moved_bytes'] / 1e6:.0f}",
            f"{r['prefetch_hit_rate']:.0%}" if name != "off" else "", "yes" if r["identical_to_reference"] else
            f"**no**: {r.get('rows_identical', 0)}/{r.get('rows', 0)} rows"]))
    if (nz := result.get("noise")) and nz.get("flagged"):
        base = nz["baseline_spread"]
        out += ["", "**Noisy**: rounds that differ by more than the single-process model's rounds "
                    f"({f'{base:.0%}' if base is not None else 'one round'}, this run's noise): "
                    + ", ".join(f"{_servers(name)} {s:.0%}" for name, s in nz["flagged"].items())
                    + "; read those figures as uncertain by that much."]
    out += ["", "Where the distributed forward spends its time (share of the gateway's forward time):", "",
            _row(["", "gateway compute", "expert compute", "waiting on slowest server", "transport + serialization"]),
            _row(["---"] * 5)]
    for name, r in result["modes"].items():
        t = r["time_split"]
        out.append(_row([name, f"{t['gateway_compute']:.0%}", f"{t['expert_compute']:.0%}",
                         f"{t['waiting_on_slowest_server']:.0%}", f"{t['transport_and_serialization']:.0%}"]))
    if result.get("one_server"):
        one = result["one_server"]
        noisy_one = (result.get("noise") or {}).get("flagged", {}).get("1/off")
        out += ["", f"One expert server, mode off: {one['tokens_per_s']['total']:.0f} tokens/s, "
                    f"**{one['vs_monolithic']:.2f}x** the single-process model"
                    + (f" (noisy: its rounds differ by {noisy_one:.0%})." if noisy_one is not None else ".")]
    e = result["efficiency"]
    out += ["", f"Expert compute efficiency ({e['device']}, {e['threads']} thread(s), one layer's routed batch: "
                f"{e['tokens']} tokens over {e['experts']} experts, largest group {e['largest_group']}): "
                f"{e['expert_gflops']:.0f} GFLOP/s against {e['dense_gflops']:.0f} GFLOP/s for one dense matmul of "
                f"the same FLOPs, **{e['efficiency']:.0%}**."]
    if result.get("validation"):
        out += ["", "Simulator against measurement (same workload and trace; calibrated on mode off at "
                    f"{result['calibration']['servers']} servers):", "",
                _row(["servers", "mode", "measured tokens/s", "simulated tokens/s", "error",
                      "measured balancedness", "simulated balancedness"]), _row(["---"] * 7)]
        for v in result["validation"]:
            out.append(_row([v["servers"], v["mode"], f"{v['measured']:.0f}", f"{v['simulated']:.0f}",
                             f"{v['error']:+.0%}", f"{v['measured_balancedness']:.3f}", f"{v['simulated_balancedness']:.3f}"]))
    if result.get("simulated"):
        sim = result["simulated"]
        modes = list(next(iter(sim.values())).keys())
        out += ["", f"Simulated, one device per server ({result['simulation_costs']['source']}); tokens/s "
                    f"(balancedness); routing skew of the trace: busiest expert at {result['routing_skew']:.1f}x its "
                    "fair share:", "",
                _row(["servers", *modes, "predictive / off"]), _row(["---"] * (len(modes) + 2))]
        for n, row in sim.items():
            cells = [f"{row[mode]['tokens_per_s']:.0f} ({row[mode]['balancedness']:.2f})" for mode in modes]
            ratio = (row["predictive"]["tokens_per_s"] / row["off"]["tokens_per_s"]
                     if "predictive" in row and "off" in row else float("nan"))
            out.append(_row([n, *cells, f"{ratio:.2f}x"]))
        if result.get("simulated_split"):
            out += ["", "Expert-layer compute only (simulated seconds; prefill = the encoder's sparse layers), mode off "
                        "against predictive with each dispatch policy:", "",
                    _row(["servers", "prefill: off", "predictive whole", "predictive split", "speed-up whole",
                          "speed-up split", "all layers: speed-up whole", "speed-up split", "tokens/s split"]),
                    _row(["---"] * 9)]
            for n, row in result["simulated_split"].items():
                off, whole, split = row["off"], row["whole"], row["split"]
                out.append(_row([n, f"{off['encoder_s']:.3f}", f"{whole['encoder_s']:.3f}", f"{split['encoder_s']:.3f}",
                                 f"{off['encoder_s'] / whole['encoder_s']:.2f}x", f"{off['encoder_s'] / split['encoder_s']:.2f}x",
                                 f"{off['all_s'] / whole['all_s']:.2f}x", f"{off['all_s'] / split['all_s']:.2f}x",
                                 f"{split['tokens_per_s']:.0f}"]))
    if result.get("projection"):
        from moe_bench.projection import markdown as projection_markdown

        out += ["", f"GPU projection ({result['projection']['gateway_source']}):", ""]
        out += projection_markdown(result["projection"])
    if plots:
        out.append("")
        out += [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(out) + "\n"


def plot(result: dict, directory: Path) -> dict[str, Path]:
    """PNG plots: per-server load over time (off vs predictive), tokens/s and balancedness
    per mode, simulated tokens/s against servers. Returns name -> file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directory.mkdir(parents=True, exist_ok=True)
    files = {}
    modes = result["modes"]

    series = [name for name in ("off", "predictive") if name in modes and modes[name].get("load_over_time")]
    if series:
        fig, axes = plt.subplots(1, len(series), figsize=(6 * len(series), 3.5), sharey=True, squeeze=False)
        for ax, name in zip(axes[0], series):
            samples = modes[name]["load_over_time"]
            t = [s[0] for s in samples]
            for server in range(len(samples[0][1])):
                ax.plot(t, [s[1][server] for s in samples], label=f"server {server}")
            ax.set_title(f"{name}: tokens/s per expert server")
            ax.set_xlabel("seconds")
        axes[0][0].set_ylabel("routed tokens/s")
        axes[0][-1].legend(fontsize=8)
        fig.tight_layout()
        files["load over time"] = directory / "load_over_time.png"
        fig.savefig(files["load over time"], dpi=110)
        plt.close(fig)

    names = ["single-process", *modes]
    tps = [result["monolithic"]["tokens_per_s"]["total"], *(r["tokens_per_s"]["total"] for r in modes.values())]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.5))
    a1.bar(names, tps, color=["gray", *["C0"] * len(modes)])
    a1.set_title("tokens/s (measured)")
    a2.bar(list(modes), [r["balancedness"] for r in modes.values()], color="C1")
    a2.set_ylim(0, 1)
    a2.set_title("balancedness (1 = even)")
    fig.tight_layout()
    files["modes"] = directory / "modes.png"
    fig.savefig(files["modes"], dpi=110)
    plt.close(fig)

    if result.get("simulated"):
        sim = result["simulated"]
        servers = [int(n) for n in sim]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        for mode in next(iter(sim.values())):
            ax.plot(servers, [sim[str(n)][mode]["tokens_per_s"] for n in servers], marker="o", label=mode)
        ax.set_xscale("log", base=2)
        ax.set_xticks(servers, [str(n) for n in servers])
        ax.set_xlabel("expert servers (simulated)")
        ax.set_ylabel("tokens/s")
        ax.legend(fontsize=8)
        fig.tight_layout()
        files["simulated"] = directory / "simulated.png"
        fig.savefig(files["simulated"], dpi=110)
        plt.close(fig)
    return files


def update_readme(readme: Path, report: str) -> None:
    """Replace the text between the moe-bench markers in `readme` with `report`."""
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} section to replace")
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: f"{START}\n{report}{END}", text, flags=re.S)
    readme.write_text(new)
