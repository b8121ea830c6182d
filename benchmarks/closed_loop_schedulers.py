"""The closed-loop workload under both gateway schedulers, in one run.

moe-bench's closed loop (requests of --batch-size prompts, --clients clients each sending
its next request when the previous reply is in) runs one --scheduler per run, and runs
minutes apart drift on this shared machine by more than the schedulers differ. Here two
gateways, one per scheduler, serve over the same expert servers at once, and the
measured rounds alternate between them in ABBA order (static, continuous, continuous,
static, ...), so drift hits both alike. Per scheduler: generated tokens/s (over all its
rounds), client latency p50/p99, the ratio of continuous to static (the baseline), and
whether every output equals the single-process HF model on that request alone.

Prompts are seeded random token ids (no corpus: equal lengths, no padding, so each
request is one HF batch exactly as the gateway sees it).

    python benchmarks/closed_loop_schedulers.py                          # tiny, 2 servers
    python benchmarks/closed_loop_schedulers.py --model base-e32-l4 --rounds 6
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import grpc  # noqa: E402

from gateway.launcher import spawn_expert_server, spawn_gateway, wait_ready  # noqa: E402
from moe_bench.workload import Monolithic, drive  # noqa: E402
from moe_common import model_source  # noqa: E402
from moe_common.serving import pick_free_port  # noqa: E402
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc  # noqa: E402

HOST = "127.0.0.1"
SCHEDULERS = ("static", "continuous")  # the first is the baseline


def stop(procs) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except Exception:  # noqa: BLE001 - a process that ignores SIGTERM is killed
            p.kill()
            p.wait()


def sender(stub, new_tokens: int):
    def send(prompts):
        reply = stub.Generate(gateway_pb2.GenerateRequest(
            token_ids=[gateway_pb2.TokenIds(ids=p) for p in prompts],
            parameters=gateway_pb2.GenerationParameters(max_new_tokens=new_tokens)), timeout=600)
        t = reply.timings
        return (t.first_token_ns / 1e9, (t.total_ns - t.queue_ns - t.first_token_ns) / 1e9,
                [list(g.token_ids) for g in reply.generations])
    return send


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    p.add_argument("--expert-servers", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per request = the gateways' --max-batch-size")
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--requests", type=int, default=8, help="requests per round")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds per scheduler, in ABBA order")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    source = model_source.resolve(a.model, a.cache_dir)
    mono = Monolithic(source.path)
    vocab, eos = mono.model.config.vocab_size, mono.model.config.eos_token_id
    rng = random.Random(a.seed)
    requests = [(i, [[rng.randrange(eos + 1, vocab) for _ in range(a.prompt_tokens - 1)] + [eos]
                     for _ in range(a.batch_size)]) for i in range(a.requests)]
    want = {i: mono.send(prompts, a.new_tokens)[2] for i, prompts in requests}

    procs, channels = [], []
    try:
        servers = []
        for _ in range(a.expert_servers):
            port = pick_free_port(HOST)
            procs.append(spawn_expert_server(source.path, HOST, port))
            servers.append(f"{HOST}:{port}")
        for proc, address in zip(procs, servers):
            wait_ready(proc, address, 300)
        stubs = {}
        for name in SCHEDULERS:
            port = pick_free_port(HOST)
            proc = spawn_gateway(source.path, HOST, port, servers,
                                 ["--scheduler", name, "--max-batch-size", str(a.batch_size), "--max-wait-ms", "0",
                                  "--log-level", "WARNING"])
            procs.append(proc)
            wait_ready(proc, f"{HOST}:{port}", 300)
            channels.append(grpc.insecure_channel(f"{HOST}:{port}"))
            stubs[name] = sender(gateway_pb2_grpc.GatewayServiceStub(channels[-1]), a.new_tokens)
        for name in SCHEDULERS:  # warm-up, not measured
            drive(stubs[name], requests[:a.clients], a.clients)
        figures = {name: dict(tokens=0, wall_s=0.0, latencies=[], identical=0, requests=0) for name in SCHEDULERS}
        for r in range(a.rounds):
            for name in (SCHEDULERS if r % 2 == 0 else SCHEDULERS[::-1]):
                records, wall = drive(stubs[name], requests, a.clients)
                f = figures[name]
                f["tokens"] += sum(rec.generated_tokens for rec in records)
                f["wall_s"] += wall
                f["latencies"] += [rec.latency_s for rec in records]
                f["identical"] += sum(rec.outputs == want[rec.request] for rec in records)
                f["requests"] += len(records)
                print(f"round {r} {name}: {sum(rec.generated_tokens for rec in records) / wall:.1f} tokens/s",
                      flush=True)
    finally:
        for ch in channels:
            ch.close()
        stop(procs[::-1])

    base = figures[SCHEDULERS[0]]["tokens"] / figures[SCHEDULERS[0]]["wall_s"]
    print(f"\n{a.model}, {a.expert_servers} expert servers, {a.clients} clients, requests of {a.batch_size} x "
          f"{a.prompt_tokens} tokens, {a.new_tokens} new tokens, {a.rounds} rounds of {a.requests} requests each\n")
    print("| scheduler | generated tokens/s | x | p50 ms | p99 ms | identical to HF alone |")
    print("| --- | --- | --- | --- | --- | --- |")
    result = dict(args={k: str(v) for k, v in vars(a).items()}, schedulers={})
    for name, f in figures.items():
        lat = sorted(f["latencies"])
        rate = f["tokens"] / f["wall_s"]
        row = dict(tokens_per_s=rate, ratio=rate / base, p50_ms=statistics.median(lat) * 1e3,
                   p99_ms=lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3,
                   identical_to_reference=f"{f['identical']}/{f['requests']}")
        result["schedulers"][name] = row
        print(f"| {name} | {rate:.1f} | {row['ratio']:.2f} | {row['p50_ms']:.0f} | {row['p99_ms']:.0f} | "
              f"{row['identical_to_reference']} |")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
