#!/usr/bin/env python3
"""Balance and speed of every replication mode, in one run, against mode off.

    python benchmarks/replication.py --predictor-checkpoint forecaster.pt [--servers 2,4]

For each expert-server count: starts the expert servers (real processes, replica
memory --replica-memory each, the machine's cores split between them) and the
predictor, then for each mode a gateway with --replication MODE, and sends the same
requests: batches of --batch prompts of --seq tokens of held-out text (the standard
library's docstrings after --skip-docs, which the forecaster did not train on),
--new-tokens greedy tokens each. Prints, per mode: tokens/s, balancedness (vLLM's
definition, over every sparse-layer dispatch), tokens per server, prefetch hit rate,
replicas, bytes of weights moved, planning time, and whether every output equals
mode off's. --json writes the same.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base-e32-l4")
    p.add_argument("--servers", default="2,4")
    p.add_argument("--modes", default="off,reactive,window,predictive")
    p.add_argument("--predictor-checkpoint", type=Path, default=None)
    p.add_argument("--replica-memory", default="160MB", help="per expert server (base experts are 18.9 MB)")
    p.add_argument("--policy", default="whole", choices=["whole", "split", "auto"])
    p.add_argument("--replica-sharing", default="auto", choices=["auto", "off"],
                   help="the gateway's --replica-sharing: off plans as if every server had cores of its own")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=4)
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--skip-docs", type=int, default=1000)
    p.add_argument("--window", type=int, default=4)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    import grpc

    from gateway.launcher import spawn_expert_server, spawn_gateway, spawn_predictor, wait_ready
    from moe_common import model_source
    from moe_common.corpus import stdlib_documents
    from moe_common.serving import pick_free_port
    from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    source = model_source.resolve(a.model)
    text = " ".join(stdlib_documents()[a.skip_docs:]).encode()
    chunk = a.seq - 1  # ByT5: one token per byte, plus EOS
    prompts = [text[i * chunk:(i + 1) * chunk].decode("utf-8", "ignore") for i in range(a.requests * a.batch)]
    requests = [prompts[i * a.batch:(i + 1) * a.batch] for i in range(a.requests)]
    modes = a.modes.split(",")
    report = {"model": a.model, "policy": a.policy, "replica_sharing": a.replica_sharing, "batch": a.batch, "seq": a.seq, "new_tokens": a.new_tokens,
              "requests": a.requests, "replica_memory": a.replica_memory, "cores": os.cpu_count(), "runs": {}}
    host = "127.0.0.1"
    for n in [int(x) for x in a.servers.split(",")]:
        procs = []
        try:
            addresses = []
            threads = max(1, (os.cpu_count() or 1) // n)
            for _ in range(n):
                port = pick_free_port()
                procs.append(spawn_expert_server(source.path, host, port, ["--replica-memory", a.replica_memory,
                                                                         "--threads", str(threads), "--log-level", "WARNING"]))
                addresses.append(f"{host}:{port}")
            predictor_port = pick_free_port()
            procs.append(spawn_predictor(source.path, host, predictor_port, a.predictor_checkpoint, ["--log-level", "WARNING"]))
            for proc, address in zip(procs, [*addresses, f"{host}:{predictor_port}"]):
                wait_ready(proc, address)
            reference = None
            for mode in modes:
                if mode == "predictive" and a.predictor_checkpoint is None:
                    print("predictive without --predictor-checkpoint uses the predictor's history method", file=sys.stderr)
                port = pick_free_port()
                gw = spawn_gateway(source.path, host, port, addresses,
                                   ["--replication", mode, "--replica-policy", a.policy, "--replica-sharing", a.replica_sharing,
                                    "--predictor", f"{host}:{predictor_port}",
                                    "--replication-window", str(a.window), "--max-batch-size", str(a.batch),
                                    "--predictor-timeout-ms", "200", "--log-level", "WARNING"])
                try:
                    wait_ready(gw, f"{host}:{port}")
                    with grpc.insecure_channel(f"{host}:{port}") as ch:
                        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
                        outputs, tokens = [], 0
                        t0 = time.perf_counter()
                        for batch in requests:
                            reply = stub.Generate(gateway_pb2.GenerateRequest(
                                prompts=batch, parameters=gateway_pb2.GenerationParameters(max_new_tokens=a.new_tokens)))
                            outputs.append([list(g.token_ids) for g in reply.generations])
                            tokens += sum(g.num_input_tokens + len(g.token_ids) for g in reply.generations)
                        elapsed = time.perf_counter() - t0
                        rep = stub.GetStatus(gateway_pb2.GetStatusRequest()).replication
                finally:
                    gw.terminate()
                    gw.wait(timeout=30)
                if reference is None:
                    reference = outputs
                run = {
                    "tokens_per_s": tokens / elapsed, "seconds": elapsed, "balancedness": rep.balancedness,
                    "tokens_per_server": list(rep.tokens_per_server), "prefetch_hit_rate": rep.prefetch_hit_rate,
                    "replicas_planned": rep.replicas_planned, "replicas_ready": rep.replicas_ready,
                    "replica_tokens": rep.replica_tokens, "bytes_moved": rep.bytes_moved, "plans": rep.plans,
                    "planning_ms_p50": rep.planning_ms_p50, "failures": rep.failures,
                    "identical_to_off": outputs == reference,
                }
                report["runs"].setdefault(str(n), {})[mode] = run
                print(f"{n} servers {mode:<11} {run['tokens_per_s']:8.0f} tok/s  balancedness {run['balancedness']:.3f}  "
                      f"hit {run['prefetch_hit_rate']:.2f}  replicas {run['replicas_ready']}/{run['replicas_planned']}  "
                      f"moved {run['bytes_moved'] / 1e6:7.1f} MB  plan {run['planning_ms_p50']:.1f} ms  "
                      f"identical {run['identical_to_off']}  per server {run['tokens_per_server']}", flush=True)
        finally:
            for proc in procs:
                proc.terminate()
            for proc in procs:
                proc.wait(timeout=30)
    if a.json:
        a.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
