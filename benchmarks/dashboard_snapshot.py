"""The Grafana dashboard's queries over a short real run, drawn with matplotlib.

    python benchmarks/dashboard_snapshot.py --seconds 90 --out benchmarks/results/dashboard

Starts a stack (tiny preset, reactive replication, replica memory) with metrics ports,
a real Prometheus server scraping it every second (the `prometheus` binary, as
tests/test_metrics.py), drives it with closed-loop clients, then asks Prometheus for
every expression of deploy/grafana/moe-dashboard.json over the run (query_range;
$__rate_interval = 15s) and draws one subplot per panel: lines for time series, an
image (series x time) for the per-expert heatmap. Writes OUT.png and OUT.json (the
last value of every series). No Grafana runs here; this is its data, not its look.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
import urllib.parse
import urllib.request
from pathlib import Path

import grpc

from gateway.launcher import start_stack
from moe_common.serving import pick_free_port, pick_free_port_run
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"


def api(port: int, path: str, **params) -> list[dict]:
    url = f"http://{HOST}:{port}/api/v1/{path}?" + urllib.parse.urlencode(params)
    reply = json.loads(urllib.request.urlopen(url, timeout=30).read())
    if reply["status"] != "success":
        raise RuntimeError(reply)
    return reply["data"]["result"]


def wait_for(what, check, timeout_s):
    deadline = time.monotonic() + timeout_s
    while not (got := check()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.2)
    return got


def label(metric: dict, legend: str) -> str:
    return legend.replace("{{", "{").replace("}}", "}").format_map(
        type("D", (dict,), {"__missing__": lambda self, k: ""})(metric)) if legend else str(metric)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=90.0, help="length of the run under load")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dashboard")
    p.add_argument("--cache-dir", type=Path, default=None)
    a = p.parse_args()
    binary = shutil.which("prometheus")
    if binary is None:
        raise SystemExit("needs the prometheus binary (apt-get install prometheus)")
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "moe-dashboard.json").read_text())
    base = pick_free_port_run(4)
    kwargs = dict(cache_dir=a.cache_dir) if a.cache_dir else {}
    with tempfile.TemporaryDirectory() as tmp, open(Path(tmp) / "stack.log", "w") as log, \
            start_stack("tiny", 2, metrics_port=base, log_file=log,
                        gateway_args=["--replication", "reactive", "--log-level", "WARNING", "--replica-sharing", "off"],
                        expert_args=["--replica-memory", "1MB", "--log-level", "WARNING"], **kwargs) as stack:
        config = Path(tmp) / "prometheus.yml"
        config.write_text(json.dumps({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
            "scrape_configs": [{"job_name": "moe", "static_configs": [
                {"targets": [f"{HOST}:{port}" for port in stack.metrics_ports.values()]}]}]}))
        prom_port = pick_free_port(HOST)
        prom = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp}/tsdb",
                                 f"--web.listen-address={HOST}:{prom_port}"], stdout=log, stderr=subprocess.STDOUT)
        try:
            def targets_up():
                try:
                    return len(api(prom_port, "query", query="up == 1")) == len(stack.metrics_ports)
                except OSError:
                    return False  # not listening yet

            wait_for("prometheus scraping every service", targets_up, 60)
            stop = threading.Event()
            channel = grpc.insecure_channel(stack.gateway_address)
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)

            def client(i: int) -> None:
                n = 0
                while not stop.is_set():
                    stub.Generate(gateway_pb2.GenerateRequest(
                        prompts=[f"client {i} request {n} " * (1 + n % 5)],
                        parameters=gateway_pb2.GenerationParameters(max_new_tokens=4 + 4 * (n % 4))), timeout=300)
                    n += 1

            threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(a.clients)]
            start = time.time()
            for t in threads:
                t.start()
            time.sleep(a.seconds)  # the run's length: load for this long, then read what Prometheus saw
            stop.set()
            for t in threads:
                t.join(timeout=300)
            channel.close()
            end = time.time() + 2
            time.sleep(2)  # two more scrapes after the last request
            panels, last = [], {}
            for panel in dashboard["panels"]:
                series = []
                for target in panel["targets"]:
                    expr = target["expr"].replace("$__rate_interval", "15s").replace(
                        "$__range", f"{int(end - start)}s")
                    for r in api(prom_port, "query_range", query=expr, start=start, end=end, step=2):
                        name = label(r["metric"], target.get("legendFormat", ""))
                        points = [(float(t), float(v)) for t, v in r["values"]]
                        series.append((name, points))
                        last[f"{panel['title']} :: {name}"] = points[-1][1] if points else None
                panels.append((panel, series))
        finally:
            prom.terminate()
            prom.wait(timeout=30)
    draw(panels, start, a.out.with_suffix(".png"))
    a.out.with_suffix(".json").write_text(json.dumps(dict(seconds=a.seconds, clients=a.clients, last_values=last),
                                                     indent=2) + "\n")
    print(f"wrote {a.out.with_suffix('.png')} and {a.out.with_suffix('.json')}")


def draw(panels, start: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cols = 3
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.2 * rows))
    for ax, (panel, series) in zip(axes.flat, panels):
        ax.set_title(panel["title"], fontsize=9)
        if panel["type"] == "heatmap" and series:
            series = sorted(series, key=lambda s: s[0])
            times = sorted({t for _, pts in series for t, _ in pts})
            index = {t: i for i, t in enumerate(times)}
            grid = np.full((len(series), len(times)), np.nan)
            for row, (_, pts) in enumerate(series):
                for t, v in pts:
                    grid[row, index[t]] = v
            ax.imshow(grid, aspect="auto", cmap="Oranges", interpolation="nearest",
                      extent=(times[0] - start, times[-1] - start, len(series), 0))
            ax.set_ylabel("layer x expert", fontsize=8)
        else:
            for name, pts in series[:12]:
                if pts:
                    ax.plot([t - start for t, _ in pts], [v for _, v in pts], label=name[:40])
            if series:
                ax.legend(fontsize=6, loc="best")
        ax.set_xlabel("s", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)


if __name__ == "__main__":
    main()
