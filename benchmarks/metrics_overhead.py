"""Throughput with metrics scraped against not scraped, in one stack and one session.

    python benchmarks/metrics_overhead.py --model tiny --phase-s 15 --rounds 3

Starts a stack (moe-serve's start_stack: expert servers, predictor, gateway) with
--metrics-port, drives it with closed-loop Generate clients, and alternates phases:
"off" (nobody scrapes) and "on" (every service's /metrics scraped every
--scrape-interval-s, 1 s by default: 15x Prometheus' default rate). Alternating in
one stack keeps the other load of a shared machine out of the ratio as far as
possible. Prints per phase generated tokens/s and generated tokens per CPU second of
the stack's processes (scrapes included, the scraper not): on a machine shared with
other work the wall-clock rate swings by 10x between phases, while tokens per CPU
second is what bounds throughput on a machine of its own. Ratios: median over rounds
of on/off in the same round.

The recording hooks (histograms, counters) run in both phases: they have no off
switch. Their cost per call is printed too (layer_done, request_finished), against
the measured wall time of a layer dispatch and a request.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import psutil
import torch

from gateway.engine import RowResult
from gateway.launcher import start_stack
from gateway.metrics import GatewayMetrics
from moe_common.serving import pick_free_port_run
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

HOST = "127.0.0.1"


class Load:
    """Closed-loop clients calling GenerateStream; counts tokens as they arrive (counting
    whole replies would quantize a short phase to a few requests)."""

    def __init__(self, address: str, clients: int, max_new_tokens: int):
        self.channel = grpc.insecure_channel(address)
        self.stub = gateway_pb2_grpc.GatewayServiceStub(self.channel)
        self.tokens = 0
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._client, args=(i, max_new_tokens), daemon=True)
                        for i in range(clients)]

    def _client(self, i: int, max_new_tokens: int) -> None:
        n = 0
        while not self.stop.is_set():
            prompt = f"client {i} request {n}: the quick brown fox jumps over the lazy dog " * 2
            for event in self.stub.GenerateStream(gateway_pb2.GenerateRequest(
                    prompts=[prompt], parameters=gateway_pb2.GenerationParameters(max_new_tokens=max_new_tokens)),
                    timeout=300):
                if not event.HasField("timings"):
                    with self.lock:
                        self.tokens += 1
            n += 1

    def count(self) -> int:
        with self.lock:
            return self.tokens


class Scraper:
    def __init__(self, ports: list[int], interval_s: float):
        self.ports, self.interval_s = ports, interval_s
        self.active = threading.Event()
        self.stop = threading.Event()
        self.scrapes, self.bytes, self.seconds = 0, 0, 0.0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.active.is_set():
                for port in self.ports:
                    t0 = time.perf_counter()
                    self.bytes += len(urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read())
                    self.seconds += time.perf_counter() - t0
                    self.scrapes += 1
            self.stop.wait(self.interval_s)


def cpu_seconds(procs) -> float:
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def hook_costs(experts: int) -> dict:
    """Microseconds per call of the per-layer and per-request hooks."""
    m = GatewayMetrics()
    counts = torch.randint(0, 64, (experts,))
    n = 2000
    t0 = time.perf_counter()
    for i in range(n):
        m.layer_done(i % 24, counts, 1_000_000)
    layer_us = (time.perf_counter() - t0) / n * 1e6
    results = [RowResult([1] * 16, "length")] * 4
    timings = dict(queue_ns=1, first_token_ns=2, total_ns=100, batch_size=4)
    t0 = time.perf_counter()
    for _ in range(n):
        m.request_finished([[1] * 32] * 4, results, timings)
    request_us = (time.perf_counter() - t0) / n * 1e6
    return dict(layer_done_us=round(layer_us, 1), request_finished_us=round(request_us, 1), experts=experts)


def call_costs(address: str, calls: int = 300, blocks: int = 6) -> dict:
    """Per-call time of a cheap RPC (GetInfo) to an expert server over a plain channel and
    over the gateway's traced one (request ids in the metadata, timed per server), in
    alternating blocks: what the interceptor adds to every expert call."""
    from gateway.metrics import METRICS
    from moe_common import tracing
    from moe_protos.moe.expert.v1 import expert_pb2, expert_pb2_grpc

    channel = grpc.insecure_channel(address)
    plain = expert_pb2_grpc.ExpertServiceStub(channel)
    traced = expert_pb2_grpc.ExpertServiceStub(tracing.intercept(channel, on_done=METRICS.rpc_timer(address)))
    token = tracing.set_current(",".join(f"{i:032x}" for i in range(8)), "1")  # a batch of 8 requests
    request = expert_pb2.GetInfoRequest()
    times = {"plain": [], "traced": []}
    try:
        for stub in (plain, traced):
            stub.GetInfo(request, timeout=10)  # connect
        for b in range(blocks):
            for name, stub in (("plain", plain), ("traced", traced)) if b % 2 == 0 else (("traced", traced),
                                                                                          ("plain", plain)):
                t0 = time.perf_counter()
                for _ in range(calls):
                    stub.GetInfo(request, timeout=10)
                times[name].append((time.perf_counter() - t0) / calls * 1e6)
    finally:
        tracing.reset_current(token)
        channel.close()
    plain_us, traced_us = statistics.median(times["plain"]), statistics.median(times["traced"])
    return dict(plain_us=round(plain_us, 1), traced_us=round(traced_us, 1), added_us=round(traced_us - plain_us, 1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--expert-servers", type=int, default=2)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--phase-s", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=8, help="off/on pairs (the order alternates)")
    p.add_argument("--scrape-interval-s", type=float, default=1.0)
    p.add_argument("--warmup-s", type=float, default=5.0)
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args()
    base = pick_free_port_run(a.expert_servers + 2)
    kwargs = dict(cache_dir=a.cache_dir) if a.cache_dir else {}
    log = open("/dev/null", "w")
    phases = []
    with start_stack(a.model, a.expert_servers, metrics_port=base, log_file=log,
                     gateway_args=["--log-level", "WARNING"], expert_args=["--log-level", "WARNING"], **kwargs) as stack:
        procs = [psutil.Process(p.pid) for p in stack.processes]
        load = Load(stack.gateway_address, a.clients, a.max_new_tokens)
        scraper = Scraper(list(stack.metrics_ports.values()), a.scrape_interval_s)
        scraper.thread.start()
        # Idle stack: the CPU the services spend answering scrapes, which CPU time measures
        # even on a busy machine (wall-clock rates do not). Scraped 4x a second here so that
        # the difference stands well above the 10 ms tick of process CPU times.
        idle = {}
        scraper.interval_s = 0.25
        for mode in ("off", "on", "off", "on"):
            (scraper.active.set if mode == "on" else scraper.active.clear)()
            s0, c0 = scraper.scrapes, cpu_seconds(procs)
            time.sleep(a.phase_s)
            idle.setdefault(mode, []).append((cpu_seconds(procs) - c0, scraper.scrapes - s0))
        idle_off = sum(c for c, _ in idle["off"]) / (len(idle["off"]) * a.phase_s)  # CPU s per s, idle
        idle_on = sum(c for c, _ in idle["on"]) / (len(idle["on"]) * a.phase_s)
        scrapes_per_s = sum(n for _, n in idle["on"]) / (len(idle["on"]) * a.phase_s)
        cpu_per_scrape = max(0.0, idle_on - idle_off) / scrapes_per_s
        scraper.interval_s = a.scrape_interval_s
        print(f"idle stack: {idle_off:.3f} CPU s/s not scraped, {idle_on:.3f} scraped ({scrapes_per_s:.1f} scrapes/s): "
              f"{cpu_per_scrape * 1e3:.2f} ms of CPU per scrape of one service", flush=True)
        for t in load.threads:
            t.start()
        time.sleep(a.warmup_s)  # a benchmark's warm-up period, not a wait for readiness
        for r in range(a.rounds):
            for mode in (("off", "on") if r % 2 == 0 else ("on", "off")):
                (scraper.active.set if mode == "on" else scraper.active.clear)()
                t0, n0, c0 = time.perf_counter(), load.count(), cpu_seconds(procs)
                time.sleep(a.phase_s)
                tokens, cpu = load.count() - n0, cpu_seconds(procs) - c0
                rate = tokens / (time.perf_counter() - t0)
                phases.append(dict(round=r, metrics=mode, tokens=tokens, tokens_per_s=round(rate, 2),
                                   cpu_s=round(cpu, 2), tokens_per_cpu_s=round(tokens / cpu, 3)))
                print(f"round {r} scraping {mode}: {rate:.1f} generated tokens/s, {tokens / cpu:.2f} per CPU second",
                      flush=True)
        load.stop.set()
        scraper.stop.set()
        for t in load.threads:
            t.join(timeout=300)
        load.channel.close()
        calls = call_costs(stack.expert_addresses[0])
        print(f"GetInfo to an expert server: {calls['plain_us']} us plain, {calls['traced_us']} us with request ids "
              f"and timing (+{calls['added_us']} us a call)", flush=True)
    off = statistics.median(x["tokens_per_s"] for x in phases if x["metrics"] == "off")
    on = statistics.median(x["tokens_per_s"] for x in phases if x["metrics"] == "on")
    def round_ratios(key: str) -> list[float]:
        """on/off per round (the order alternates: round r is off, on for even r)."""
        pairs = [[x[key] for x in phases if x["round"] == r] for r in range(a.rounds)]
        return [(p[1] / p[0] if r % 2 == 0 else p[0] / p[1]) for r, p in enumerate(pairs) if min(p) > 0]

    ratios, cpu_ratios = round_ratios("tokens_per_s"), round_ratios("tokens_per_cpu_s")
    # Serving CPU per second under load (not scraped), and what scraping every service
    # each interval adds to it: the throughput lost where CPU bounds throughput.
    serving_cpu = statistics.median(x["cpu_s"] / a.phase_s for x in phases if x["metrics"] == "off")
    services = len(scraper.ports)
    estimate = {f"{interval:g}s": round(cpu_per_scrape * services / interval / serving_cpu, 5)
                for interval in (1, 5, 15)}
    result = dict(idle_cpu_s_per_s_off=round(idle_off, 4), idle_cpu_s_per_s_on=round(idle_on, 4),
                  cpu_ms_per_scrape=round(cpu_per_scrape * 1e3, 3), serving_cpu_s_per_s=round(serving_cpu, 3),
                  estimated_throughput_cost_by_scrape_interval=estimate, model=a.model, expert_servers=a.expert_servers, clients=a.clients, max_new_tokens=a.max_new_tokens,
                  phase_s=a.phase_s, scrape_interval_s=a.scrape_interval_s, phases=phases,
                  median_tokens_per_s_off=off, median_tokens_per_s_on=on, ratio_of_medians=round(on / off, 4),
                  round_ratios=[round(x, 3) for x in ratios], median_round_ratio=round(statistics.median(ratios), 4),
                  round_cpu_ratios=[round(x, 3) for x in cpu_ratios],
                  median_round_cpu_ratio=round(statistics.median(cpu_ratios), 4),
                  scrapes=scraper.scrapes, mean_scrape_ms=round(scraper.seconds / max(1, scraper.scrapes) * 1e3, 2),
                  mean_scrape_bytes=scraper.bytes // max(1, scraper.scrapes), hooks=hook_costs(128),
                  expert_call=calls)
    print(json.dumps(result, indent=2))
    print(f"throughput with metrics scraped every {a.scrape_interval_s:g} s / not scraped: medians {on:.1f} / {off:.1f} "
          f"tokens/s = {on / off:.3f}; median of the {len(ratios)} rounds' ratios {statistics.median(ratios):.3f}")
    print(f"tokens per CPU second of the stack, scraped / not scraped: median of the rounds' ratios "
          f"{statistics.median(cpu_ratios):.3f} (rounds: {', '.join(f'{x:.3f}' for x in cpu_ratios)})")
    cpu_share = scraper.seconds / max(1e-9, sum(1 for x in phases if x["metrics"] == "on") * a.phase_s)
    print(f"CPU per scrape {cpu_per_scrape * 1e3:.2f} ms x {services} services against {serving_cpu:.2f} CPU s/s "
          f"serving: estimated throughput cost when scraping every 1 / 5 / 15 s: "
          + " / ".join(f"{v:.3%}" for v in estimate.values()))
    print(f"scrapes took {result['mean_scrape_ms']} ms each ({result['mean_scrape_bytes']} bytes): at most "
          f"{cpu_share:.1%} of one core while scraping every {a.scrape_interval_s:g} s")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
