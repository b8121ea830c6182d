"""Scrape size and time of the gateway's /metrics at a given model shape.

    python benchmarks/metrics_scrape.py --experts 128 --layers 24 --servers 8

Fills the gateway's metrics as serving would (every layer x expert routed, every
layer's dispatch histogram, every server's RPC histogram and token counter, request
histograms), with the scrape-time collector reading a real ExpertClients (its
DispatchStats filled by LayerCall records; no expert server is called), then times
generate_latest() in-process and GET /metrics over HTTP. The target: under 50 ms.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import torch
from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily

from gateway.dispatch import ExpertClients
from gateway.dispatch_stats import LayerCall
from gateway.engine import RowResult
from gateway.metrics import METRICS, GatewayCollector
from moe_common.metrics import LayerExpertCounter, MetricsServer, exposition
from moe_common.placement import home_placement


def fill(experts: int, layers: int, servers: int, batches: int) -> GatewayCollector:
    addresses = [f"10.0.0.{i}:50061" for i in range(servers)]
    clients = ExpertClients(addresses, home_placement(layers, experts, servers), "bench")
    g = torch.Generator().manual_seed(0)
    for _ in range(batches):
        for layer in range(layers):
            counts = torch.randint(0, 64, (experts,), generator=g)
            METRICS.layer_done(layer, counts, int(2e6))
            loads = [int(x) for x in torch.randint(0, 512, (servers,), generator=g)]
            clients.stats.record(LayerCall(addresses=addresses, loads=loads, compute_ns={s: 1000 for s in range(servers)},
                                           codec_ns=0, tokens=sum(loads), rpcs=servers, bytes_sent=0, bytes_received=0,
                                           bytes_shared=0, wall_ns=int(2e6), gateway_codec_ns=0, replica_tokens=0,
                                           planned_checks=0, planned_ready=0))
        for address in addresses:
            METRICS.rpc_timer(address)("/moe.expert.v1.ExpertService/RunExperts", 0.002)
        METRICS.request_finished([[1] * 32] * 8, [RowResult([2] * 16, "length")] * 8,
                                 dict(queue_ns=int(1e6), first_token_ns=int(5e7), total_ns=int(5e8), batch_size=8))
        METRICS.batch_size.observe(8)
        METRICS.forecast.observe(0.004)
    gateway = SimpleNamespace(engine=SimpleNamespace(clients=clients, replicas=None, observer=None),
                              batcher=SimpleNamespace(_pending=[]))
    collector = GatewayCollector(gateway)
    METRICS.registry.register(collector)
    return collector


def library_exposition(registry) -> bytes:
    """The baseline: every sample formatted by prometheus_client, the layer x expert
    tables as ordinary labelled counter families."""
    families = []
    for family in registry.collect():
        if isinstance(family, LayerExpertCounter):
            c = CounterMetricFamily(family.name, family.documentation, labels=["layer", "expert"])
            for layer, counts in enumerate(family.table.tolist()):
                for e, n in enumerate(counts):
                    c.add_metric([str(layer), str(e)], n)
            family = c
        families.append(family)
    return generate_latest(SimpleNamespace(collect=lambda: families))


def timed(fn, repeats: int) -> tuple[list[float], int]:
    fn()  # warm
    times, size = [], 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        size = len(fn())
        times.append((time.perf_counter() - t0) * 1e3)
    return times, size


def summary(times: list[float]) -> dict:
    times = sorted(times)
    return dict(median_ms=round(statistics.median(times), 2), p90_ms=round(times[int(0.9 * (len(times) - 1))], 2),
                max_ms=round(times[-1], 2))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--layers", type=int, default=24, help="sparse layers")
    p.add_argument("--servers", type=int, default=8)
    p.add_argument("--batches", type=int, default=20, help="batches recorded before scraping")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    a = p.parse_args()
    fill(a.experts, a.layers, a.servers, a.batches)
    baseline, baseline_size = timed(lambda: library_exposition(METRICS.registry), a.repeats)  # every sample by the library
    inproc, size = timed(lambda: exposition(METRICS.registry), a.repeats)
    server = MetricsServer(METRICS.registry, "127.0.0.1", 0)
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        http, http_size = timed(lambda: urllib.request.urlopen(url).read(), a.repeats)
    finally:
        server.stop()
    text = exposition(METRICS.registry).decode()
    samples = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
    result = dict(experts=a.experts, sparse_layers=a.layers, servers=a.servers, samples=samples, bytes=size,
                  exposition=summary(inproc), http_get=summary(http), http_bytes=http_size, target_ms=50,
                  generate_latest_all_samples=summary(baseline),
                  speedup=round(statistics.median(baseline) / statistics.median(inproc), 2))
    print(json.dumps(result, indent=2))
    print(f"scrape of {a.layers} sparse layers x {a.experts} experts, {a.servers} servers: {samples} samples, "
          f"{size / 1e3:.0f} kB; exposition median {result['exposition']['median_ms']} ms "
          f"({result['speedup']}x faster than prometheus_client formatting every sample: "
          f"{result['generate_latest_all_samples']['median_ms']} ms), GET /metrics median "
          f"{result['http_get']['median_ms']} ms (target < 50 ms)")
    if a.out:
        a.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
