#!/usr/bin/env python3
"""Forward-pass throughput of the distributed model against the single-process HF model.

    python benchmarks/forward_throughput.py                      # base-e32-l4, batch 8 x 128
    python benchmarks/forward_throughput.py --model base-e32-l12 --rounds 3

One run measures, interleaved round by round so that machine noise hits all alike:
  monolithic  SwitchTransformersForConditionalGeneration in one process;
  1 server    the gateway's model (RemoteExperts) + 1 expert server process;
  2 servers   the same + 2 expert server processes.
Each configuration runs in its own worker process (so its resident memory is its
own); expert servers are real `moe-expert-server` processes on loopback. A forward
pass is the encoder over [B, S] tokens plus the decoder teacher-forced over [B, S].

Prints tokens/s and the ratio to monolithic, where the distributed forward spends
its time (expert compute on the slowest server vs serialization and transport),
and resident memory against the bytes of weights each process holds. --json
writes the same numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def make_batch(tokenizer, text: str, batch: int, seq: int):
    """[batch, seq] encoder ids and [batch, seq] decoder ids from consecutive text chunks."""
    import torch

    data = text.encode("utf-8")
    chunk = seq * 4  # ByT5 is one token per byte; take more and truncate
    pieces = [data[i * chunk:(i + 1) * chunk].decode("utf-8", "ignore") for i in range(2 * batch)]
    enc = tokenizer(pieces[:batch], return_tensors="pt", max_length=seq, truncation=True, padding="max_length")
    dec = tokenizer(pieces[batch:], return_tensors="pt", max_length=seq, truncation=True, padding="max_length")
    start = torch.zeros((batch, 1), dtype=torch.long)
    decoder_input_ids = torch.cat([start, dec["input_ids"][:, :-1]], dim=1)  # shift right, as HF does
    return enc["input_ids"], enc["attention_mask"], decoder_input_ids


# ---------------------------------------------------------------------------
# worker: one configuration in its own process, driven over stdin/stdout
# ---------------------------------------------------------------------------

def worker(args) -> None:
    import psutil
    import torch

    from moe_common import model_source
    from moe_common.corpus import stdlib_text

    source = model_source.resolve(args.model, args.cache_dir)
    if args.worker == "monolithic":
        from transformers import AutoTokenizer, SwitchTransformersForConditionalGeneration

        model = SwitchTransformersForConditionalGeneration.from_pretrained(source.path, dtype=torch.float32).eval()
        tokenizer = AutoTokenizer.from_pretrained(source.path)
        stats = None

        def forward(i, m, d):
            with torch.inference_mode():
                return model(input_ids=i, attention_mask=m, decoder_input_ids=d).logits
        weight_bytes = sum(p.nbytes for p in model.parameters())
    else:
        from gateway.config import GatewayConfig
        from gateway.engine import Engine

        engine = Engine(GatewayConfig(model=str(source.path), expert_servers=args.worker.split(","), wire_dtype=args.wire_dtype))
        engine.connect()
        tokenizer = engine.tokenizer
        stats = engine.clients.stats
        forward = engine.forward_logits
        weight_bytes = sum(p.nbytes for p in engine.model.parameters())

    batch = make_batch(tokenizer, stdlib_text() if args.corpus is None else Path(args.corpus).read_text(), args.batch, args.seq)
    forward(*batch)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        reps = int(line)
        times, parts = [], []
        for _ in range(reps):
            if stats is not None:
                stats.reset()
            t0 = time.perf_counter_ns()
            forward(*batch)
            times.append(time.perf_counter_ns() - t0)
            if stats is not None:
                parts.append(dict(dispatch=stats.dispatch_ns, rpc_wall=stats.rpc_wall_ns, compute=stats.server_compute_ns,
                                  gateway_codec=stats.gateway_codec_ns, server_codec=stats.server_codec_ns,
                                  bytes=stats.bytes_sent + stats.bytes_received, rpcs=stats.rpcs))
        print(json.dumps({"times_ns": times, "parts": parts, "rss": psutil.Process().memory_info().rss,
                          "weight_bytes": weight_bytes}), flush=True)


# ---------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------

def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base-e32-l4", help="preset or checkpoint (default: switch-base shapes, 32 experts, 4+4 blocks)")
    p.add_argument("--cache-dir", type=Path, default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds over all configurations")
    p.add_argument("--reps", type=int, default=3, help="forward passes per configuration per round")
    p.add_argument("--servers", default="1,2", help="expert-server counts to measure")
    p.add_argument("--wire-dtype", default="float32")
    p.add_argument("--expert-threads", type=int, default=0, help="torch threads per expert server (0 = all cores)")
    p.add_argument("--corpus", default=None, help="text file (default: Python's standard-library docstrings)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    from moe_common import model_source

    if args.cache_dir is None:
        args.cache_dir = model_source.DEFAULT_CACHE_DIR
    if args.worker:
        worker(args)
        return 0

    import psutil
    import grpc

    from gateway.launcher import spawn_expert_server, wait_ready
    from moe_common.serving import pick_free_port
    from moe_protos.moe.expert.v1 import expert_pb2, expert_pb2_grpc

    t0 = time.monotonic()
    source = model_source.resolve(args.model, args.cache_dir)  # builds the preset once
    print(f"model {args.model} at {source.path} ({time.monotonic() - t0:.0f} s to resolve)", file=sys.stderr)
    counts = [int(x) for x in args.servers.split(",")]
    procs: list[subprocess.Popen] = []
    workers: dict[str, subprocess.Popen] = {}
    server_sets: dict[str, list[tuple[str, subprocess.Popen]]] = {}

    def spawn_worker(name: str, spec: str) -> None:
        cmd = [sys.executable, __file__, "--worker", spec, "--model", str(source.path), "--batch", str(args.batch),
               "--seq", str(args.seq), "--wire-dtype", args.wire_dtype, "--cache-dir", str(args.cache_dir)]
        if args.corpus:
            cmd += ["--corpus", args.corpus]
        w = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.append(w)
        workers[name] = w
        assert json.loads(w.stdout.readline())["ready"], name

    try:
        spawn_worker("monolithic", "monolithic")
        for n in counts:
            servers = []
            for _ in range(n):
                port = pick_free_port()
                proc = spawn_expert_server(source.path, "127.0.0.1", port,
                                           ["--log-level", "WARNING", "--threads", str(args.expert_threads)])
                procs.append(proc)
                servers.append((f"127.0.0.1:{port}", proc))
            for address, proc in servers:
                wait_ready(proc, address)
            server_sets[f"{n} server" + ("s" if n > 1 else "")] = servers
            spawn_worker(f"{n} server" + ("s" if n > 1 else ""), ",".join(a for a, _ in servers))

        results: dict[str, dict] = {name: {"times_ns": [], "parts": []} for name in workers}
        for r in range(args.rounds):
            for name, w in workers.items():
                w.stdin.write(f"{args.reps}\n")
                w.stdin.flush()
                got = json.loads(w.stdout.readline())
                results[name]["times_ns"] += got["times_ns"]
                results[name]["parts"] += got["parts"]
                results[name]["rss"] = got["rss"]
                results[name]["weight_bytes"] = got["weight_bytes"]
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)

        tokens = 2 * args.batch * args.seq
        report = {"model": args.model, "expert_threads": args.expert_threads, "batch": args.batch, "seq": args.seq, "wire_dtype": args.wire_dtype,
                  "tokens_per_forward": tokens, "configs": {}}
        mono_s = statistics.median(results["monolithic"]["times_ns"]) / 1e9
        for name, res in results.items():
            med = statistics.median(res["times_ns"]) / 1e9
            entry = {"median_s": med, "tokens_per_s": tokens / med, "vs_monolithic": mono_s / med,
                     "rss_bytes": res["rss"], "weight_bytes": res["weight_bytes"]}
            if res["parts"]:
                entry["share_expert_compute"] = statistics.median(
                    p["compute"] / t for p, t in zip(res["parts"], res["times_ns"]))
                entry["share_serialization_transport"] = statistics.median(
                    (p["rpc_wall"] - p["compute"]) / t for p, t in zip(res["parts"], res["times_ns"]))
                entry["share_serialization"] = statistics.median(
                    (p["gateway_codec"] + p["server_codec"]) / t for p, t in zip(res["parts"], res["times_ns"]))
                entry["wire_bytes_per_forward"] = res["parts"][0]["bytes"]
                entry["rpcs_per_forward"] = res["parts"][0]["rpcs"]
                servers = []
                for address, proc in server_sets[name]:
                    with grpc.insecure_channel(address) as ch:
                        info = expert_pb2_grpc.ExpertServiceStub(ch).GetInfo(expert_pb2.GetInfoRequest())
                    servers.append({"address": address, "rss_bytes": psutil.Process(proc.pid).memory_info().rss,
                                    "weight_bytes": info.weight_bytes})
                entry["expert_servers"] = servers
            report["configs"][name] = entry
    finally:
        for w in workers.values():
            if w.stdin:
                w.stdin.close()
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()

    mb = 1 / 2**20
    print(f"\nforward pass: encoder [{args.batch}, {args.seq}] + decoder [{args.batch}, {args.seq}], "
          f"{args.model}, wire {args.wire_dtype}, expert threads {args.expert_threads or 'all'}, "
          f"median of {args.rounds * args.reps} passes, {os.cpu_count()} cores")
    print(f"{'configuration':<14}{'tokens/s':>10}{'x mono':>8}{'expert%':>9}{'ser+net%':>10}{'codec%':>8}"
          f"{'RSS MiB':>9}{'weights MiB':>13}")
    for name, e in report["configs"].items():
        print(f"{name:<14}{e['tokens_per_s']:>10.0f}{e['vs_monolithic']:>8.2f}"
              f"{100 * e.get('share_expert_compute', 0):>9.1f}{100 * e.get('share_serialization_transport', 0):>10.1f}"
              f"{100 * e.get('share_serialization', 0):>8.1f}{e['rss_bytes'] * mb:>9.0f}{e['weight_bytes'] * mb:>13.0f}")
        for s in e.get("expert_servers", []):
            print(f"  expert server {s['address']:<22} RSS {s['rss_bytes'] * mb:>7.0f} MiB, expert weights {s['weight_bytes'] * mb:>7.0f} MiB")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
