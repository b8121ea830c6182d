"""Time that replication costs a batch on the request path, with a real predictor.

Starts expert servers and a predictor (with a trained forecaster when given), then
drives an in-process gateway Engine in predictive mode and times what runs on the
request path when each batch's encoder pass starts (PassObserver's start hook): since
the planner thread, sending the pass's forecast call and `batch_started`; before it,
also waiting for this batch's forecast and planning inline (`before_batch`). Run it on
both commits to compare:

    python benchmarks/replication_request_path.py --model base-e32-l4 --servers 2 --batches 12

Prints ms per batch on the request path (median and max) and writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--servers", type=int, default=2)
    p.add_argument("--batches", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--predictor-checkpoint", type=Path, default=None)
    p.add_argument("--predictor-timeout-ms", type=float, default=500.0, help="as moe-bench sets it")
    p.add_argument("--replica-memory", default="160MB")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args()

    from gateway.config import GatewayConfig
    from gateway.engine import Engine, Sampling
    from gateway.launcher import spawn_expert_server, spawn_predictor, wait_ready
    from moe_common import model_source
    from moe_common.corpus import stdlib_documents
    from moe_common.serving import pick_free_port

    source = model_source.resolve(a.model)
    procs, addresses = [], []
    try:
        for _ in range(a.servers):
            port = pick_free_port()
            procs.append(spawn_expert_server(source.path, "127.0.0.1", port,
                                             ["--replica-memory", a.replica_memory, "--log-level", "WARNING"]))
            addresses.append(f"127.0.0.1:{port}")
        port = pick_free_port()
        procs.append(spawn_predictor(source.path, "127.0.0.1", port, a.predictor_checkpoint, ["--log-level", "WARNING"]))
        predictor = f"127.0.0.1:{port}"
        for proc, address in zip(procs, addresses + [predictor]):
            wait_ready(proc, address, 300)
        engine = Engine(GatewayConfig(model=str(source.path), expert_servers=addresses, replication="predictive",
                                      predictor=predictor, predictor_timeout_ms=a.predictor_timeout_ms,
                                      replication_window=4))
        engine.connect()
        hook = "batch_started" if hasattr(engine.replicas, "batch_started") else "before_batch"
        recorder = engine.observer.recorder
        original = recorder.on_start
        times: list[float] = []

        def timed(kind, *args):
            t0 = time.perf_counter()
            try:
                return original(kind, *args)
            finally:
                if kind == 0:  # the encoder pass: where a batch's replication work starts
                    times.append((time.perf_counter() - t0) * 1e3)

        recorder.on_start = timed
        ids = engine.tokenizer(stdlib_documents()[: a.batches * a.batch_size])["input_ids"]
        rows = [row[: a.prompt_tokens] for row in ids]
        batches = [rows[i * a.batch_size:(i + 1) * a.batch_size] for i in range(a.batches)]
        for i, batch in enumerate(batches):
            # As the batcher does: the next batch's prompts are known while this one runs.
            if hasattr(engine, "upcoming") and i + 1 < len(batches):
                engine.upcoming(batches[i + 1])
            engine.generate_batch(batch, [8] * len(batch), Sampling())
        engine.close()
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = dict(commit=commit, hook=hook, model=a.model, servers=a.servers, batches=a.batches,
                  predictor_timeout_ms=a.predictor_timeout_ms, request_path_ms=times,
                  median_ms=statistics.median(times), max_ms=max(times))
    print(f"{commit} {hook}: request path {result['median_ms']:.3f} ms median, {result['max_ms']:.3f} ms max per batch "
          f"over {len(times)} batches")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
