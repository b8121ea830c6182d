"""An expert server SIGKILLed under load: failed requests, exactness, latency around the kill.

    python benchmarks/crash.py --model base-e32-l4 --servers 3 --clients 8 --json benchmarks/results/crash-bare.json
    python benchmarks/crash.py --model base-e32-l4 --under moe-serve --json benchmarks/results/crash-moe-serve.json

Starts a real stack, drives it with --clients closed-loop clients (Generate calls back
to back), SIGKILLs one expert server after --hold-s seconds, and keeps the load on:
  bare       the stack's processes as separate children of this script; with
             --restart-after-s the script starts the killed server again on its
             address after that long (as a supervisor would); without it the gateway
             evicts the dead server after --evict-after-s;
  moe-serve  the stack under moe-serve, whose supervisor restarts the killed server.
Every reply is checked against the single-process HF model on the same prompt (the
gateway runs --max-batch-size 1 so that the reference is HF on that prompt alone).
Reports failed and differing requests, p50/p99 latency in steady state (before the
kill) and in the 10 s around it, and the worst latency of the requests in flight at
the kill against the steady-state p50. --plot draws latency over time. Exit status 1
if any request failed or differed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from gateway.launcher import spawn_expert_server, start_stack, wait_ready  # noqa: E402
from loadgen import Load, add_arguments, prompts_and_reference, save_figure, status  # noqa: E402
from moe_common import model_source, serving  # noqa: E402


def percentiles(latencies: list[float]) -> dict:
    if not latencies:
        return {"n": 0, "p50_ms": None, "p99_ms": None}
    return {"n": len(latencies), "p50_ms": float(np.percentile(latencies, 50) * 1e3),
            "p99_ms": float(np.percentile(latencies, 99) * 1e3)}


class MoeServe:
    """A stack under moe-serve (its supervisor restarts crashed children)."""

    def __init__(self, model: str, servers: int, cache_dir: Path, gateway_port: int, log_file, extra: list[str],
                 predictor: bool = False):
        import psutil

        self.address = f"127.0.0.1:{gateway_port}"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.launcher", "--model", model, "--cache-dir", str(cache_dir),
             "--expert-servers", str(servers), "--port", str(gateway_port), *([] if predictor else ["--no-predictor"]),
             "--max-batch-size", "1", "--expert-threads", "1", *extra],
            stdout=subprocess.PIPE, stderr=log_file, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("gateway listening"):
            self.stop()
            raise RuntimeError(f"moe-serve did not start: {line!r}; see {log_file.name}")
        self.children = psutil.Process(self.proc.pid).children

    def expert_servers(self) -> list[tuple[int, str]]:
        """(pid, address) of the running expert servers, oldest first."""
        found = []
        for c in self.children():
            try:
                cmd = c.cmdline()
                if cmd[2:3] == ["expert_server"] and c.status() != "zombie":
                    found.append((c.pid, f"{cmd[cmd.index('--host') + 1]}:{cmd[cmd.index('--port') + 1]}"))
            except Exception:  # noqa: BLE001 - exited meanwhile
                pass
        return found

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def run(a) -> dict:
    source = model_source.resolve(a.model, a.cache_dir)
    prompts, reference = prompts_and_reference(source, a)
    logs = tempfile.NamedTemporaryFile("w+", prefix="crash-", suffix=".log", delete=False)
    out: dict = {"model": source.spec, "under": a.under, "servers": a.servers, "clients": a.clients,
                 "redundancy": a.redundancy,
                 "max_new_tokens": a.max_new_tokens, "logs": logs.name}
    restarted = None
    if a.under == "moe-serve":
        stack = MoeServe(a.model, a.servers, a.cache_dir, serving.pick_free_port(), logs,
                         ["--redundancy", str(a.redundancy), "--replica-memory", a.replica_memory])
        gateway_address = stack.address
    else:
        stack = start_stack(a.model, a.servers, cache_dir=a.cache_dir, predictor=False, log_file=logs,
                            gateway_args=["--max-batch-size", "1", "--evict-after-s", str(a.evict_after_s),
                                          "--redundancy", str(a.redundancy)],
                            expert_args=["--threads", "1", "--replica-memory", a.replica_memory])
        gateway_address = stack.gateway_address
    load = Load(gateway_address, prompts, a.max_new_tokens, a.clients)
    t0 = time.monotonic()
    try:
        load.start()
        time.sleep(a.hold_s)
        before = status(gateway_address)
        out["tokens_per_server_at_kill"] = dict(zip([s.address for s in before.servers],
                                                    before.replication.tokens_per_server))
        if a.under == "moe-serve":
            victim_pid, victim_address = stack.expert_servers()[-1]
            t_kill = time.monotonic()
            os.kill(victim_pid, signal.SIGKILL)
        else:
            victim = stack.processes[a.servers - 1]
            victim_address = stack.expert_addresses[a.servers - 1]
            t_kill = time.monotonic()
            victim.kill()
            victim.wait()
        print(f"killed an expert server {t_kill - t0:.1f} s into the run", flush=True)
        if a.under == "bare" and a.restart_after_s is not None:
            time.sleep(a.restart_after_s)
            host, port = victim_address.rsplit(":", 1)
            for attempt in range(3):  # the just-freed port may be taken by an outgoing connection: try again
                restarted = spawn_expert_server(source.path, host, int(port), ["--threads", "1"], log_file=logs)
                stack.processes[a.servers - 1] = restarted
                try:
                    wait_ready(restarted, victim_address, 120)
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
            out["restarted_serving_after_kill_s"] = time.monotonic() - t_kill
            print(f"restarted it; SERVING {out['restarted_serving_after_kill_s']:.1f} s after the kill", flush=True)
        time.sleep(a.after_s)
        final = status(gateway_address)
    finally:
        load.stop()
        stack.stop()
    results = load.results
    failed = [r for r in results if r[4]]
    differing = [r for r in results if not r[4] and r[3] != reference[r[2]]]
    steady = [r[1] - r[0] for r in results if r[1] < t_kill]
    around = [r[1] - r[0] for r in results if abs(r[0] - t_kill) <= 5 or abs(r[1] - t_kill) <= 5]
    in_flight = [r[1] - r[0] for r in results if r[0] <= t_kill <= r[1]]
    steady_p = percentiles(steady)
    out.update(
        requests=len(results), failed=len(failed), differing=len(differing),
        identical_to_reference=not differing and bool(results),
        failures=sorted({r[4] for r in failed})[:5],
        steady=steady_p, around_kill=percentiles(around),
        in_flight_at_kill=len(in_flight),
        in_flight_worst_vs_steady_p50=(max(in_flight) * 1e3 / steady_p["p50_ms"]) if in_flight and steady else None,
        servers_after=[s.address for s in final.servers],
        tokens_per_server_after=list(final.replication.tokens_per_server),
        victim=victim_address,
        membership_changes=final.membership_changes_total,
        suspects=final.expert_path.suspects, stand_in_loads=final.expert_path.stand_in_loads,
        timeline=[(r[0] - t0, r[1] - r[0], bool(r[4])) for r in results],
        kill_at_s=t_kill - t0,
    )
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    ok = [(s, lat * 1e3) for s, lat, bad in out["timeline"] if not bad]
    bad = [(s, lat * 1e3) for s, lat, bad in out["timeline"] if bad]
    if ok:
        ax.scatter(*zip(*ok), s=8, label="request (start time, latency)")
    if bad:
        ax.scatter(*zip(*bad), s=16, color="red", marker="x", label="failed request")
    ax.axvline(out["kill_at_s"], color="black", linestyle="--", label="SIGKILL of an expert server")
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel("latency (ms)")
    ax.set_title(f"{out['model']}, {out['servers']} expert servers ({out['under']}), {out['clients']} clients: "
                 f"{out['failed']} failed of {out['requests']}", fontsize=9)
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base-e32-l4")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    p.add_argument("--under", choices=["bare", "moe-serve"], default="bare")
    p.add_argument("--servers", type=int, default=3)
    add_arguments(p, clients=8)
    p.add_argument("--hold-s", type=float, default=8.0, help="load before the kill")
    p.add_argument("--after-s", type=float, default=12.0, help="load after the kill (after the restart, if any)")
    p.add_argument("--restart-after-s", type=float, default=None, help="bare: start the killed server again this long after")
    p.add_argument("--evict-after-s", type=float, default=10.0, help="bare: the gateway's --evict-after-s")
    p.add_argument("--redundancy", type=int, default=1, help="the gateway's --redundancy")
    p.add_argument("--replica-memory", default="0", help="each expert server's --replica-memory (standbys need it)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    a = p.parse_args(argv)
    out = run(a)
    s, k = out["steady"], out["around_kill"]
    print(f"{out['requests']} requests from {a.clients} clients: {out['failed']} failed, "
          f"{out['differing']} differ from the single-process model", flush=True)
    print(f"  latency steady p50 {s['p50_ms']:.0f} ms p99 {s['p99_ms']:.0f} ms; within 5 s of the kill "
          f"p50 {k['p50_ms']:.0f} ms p99 {k['p99_ms']:.0f} ms ({k['n']} requests)", flush=True)
    if out["in_flight_worst_vs_steady_p50"] is not None:
        print(f"  {out['in_flight_at_kill']} requests in flight at the kill; the slowest took "
              f"{out['in_flight_worst_vs_steady_p50']:.1f}x the steady p50", flush=True)
    print(f"  servers after: {dict(zip(out['servers_after'], out['tokens_per_server_after']))}; "
          f"{out['membership_changes']} membership changes; {out['stand_in_loads']} experts loaded on stand-ins",
          flush=True)
    if out["failures"]:
        print(f"  failures: {out['failures']}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    if a.plot:
        plot(out, a.plot)
    return 0 if out["failed"] == 0 and out["identical_to_reference"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
