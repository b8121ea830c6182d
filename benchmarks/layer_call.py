"""What one sparse-layer call costs beyond the expert matmuls, by transport and size.

Starts one real expert server holding every expert, then sends layer calls through the
gateway's own dispatch (ExpertClients.run_layer) with each transport: bytes in the gRPC
message, and shared memory (gateway/transport.py). Per call it reports, in the median
over repeats:
  wall      - run_layer's wall time in the gateway (what a layer of the model waits);
  compute   - the expert FFN time the server measured (compute_ns);
  overhead  - wall minus compute: packing, the RPC, the server's own work, unpacking;
  GB/s      - hidden-state bytes moved both ways / overhead.
Ratios are against gRPC bytes measured in the same run.

    python benchmarks/layer_call.py                         # base-e8-l2: 8, 1024, 4096 tokens
    python benchmarks/layer_call.py --model tiny --tokens 8,64
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.dispatch import ExpertClients  # noqa: E402
from gateway.launcher import spawn_expert_server, wait_ready  # noqa: E402
from moe_common import model_source  # noqa: E402
from moe_common.placement import home_placement  # noqa: E402
from moe_common.serving import pick_free_port  # noqa: E402


def layer_call(tokens: int, d_model: int, num_experts: int, seed: int = 0):
    """hidden [tokens, d_model] and [(expert, ascending token indices)], tokens spread evenly."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, d_model, generator=g)
    experts = torch.arange(tokens) % num_experts
    lists = [(e, (experts == e).nonzero().flatten()) for e in range(num_experts) if (experts == e).any()]
    return hidden, lists


def measure(clients: ExpertClients, hidden, lists, repeats: int) -> dict:
    """Median wall, compute and overhead (ms) of `repeats` layer calls, after one warm-up."""
    clients.run_layer(0, hidden, lists)  # warm-up: channel, probe, segments
    walls, computes = [], []
    for _ in range(repeats):
        before = clients.stats.server_compute_ns
        t0 = time.perf_counter_ns()
        clients.run_layer(0, hidden, lists)
        walls.append((time.perf_counter_ns() - t0) / 1e6)
        computes.append((clients.stats.server_compute_ns - before) / 1e6)
    wall, compute = statistics.median(walls), statistics.median(computes)
    overhead = statistics.median(w - c for w, c in zip(walls, computes))
    return dict(wall_ms=wall, compute_ms=compute, overhead_ms=overhead)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base-e8-l2")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    p.add_argument("--tokens", default="8,1024,4096", help="rows per layer call, comma-separated")
    p.add_argument("--experts", type=int, default=4, help="experts the tokens are spread over")
    p.add_argument("--transports", default="grpc,shm-grpc,shm",
                   help="grpc: bytes in the message; shm-grpc: shared memory, control over gRPC; "
                        "shm: shared memory, control over the local lane when the server offers one")
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the expert server")
    p.add_argument("--device", default="cpu", help="the expert server's device: cpu, cuda or cuda:N")
    p.add_argument("--gateway-device", default="cpu", help="where the hidden states live, as in a gateway there")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "layer_call.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    source = model_source.resolve(a.model, a.cache_dir)
    port = pick_free_port("127.0.0.1")
    address = f"127.0.0.1:{port}"
    proc = spawn_expert_server(source.path, "127.0.0.1", port, ["--threads", str(a.threads), "--device", a.device])
    results = []
    try:
        wait_ready(proc, address, 600)
        from transformers import SwitchTransformersConfig

        config = SwitchTransformersConfig.from_pretrained(source.path)
        layers = config.num_sparse_encoder_layers + config.num_sparse_decoder_layers
        home = home_placement(layers, config.num_experts, 1)
        for transport in a.transports.split(","):
            # shm-grpc: rows in shared memory, control message over gRPC (no local lane)
            clients = ExpertClients([address], home, source.model_id, transport=transport.removesuffix("-grpc"))
            clients.transport.local_lane = not transport.endswith("-grpc")
            try:
                clients.assign_home_experts()
                for tokens in (int(t) for t in a.tokens.split(",")):
                    hidden, lists = layer_call(tokens, config.d_model, min(a.experts, config.num_experts))
                    hidden, lists = hidden.to(a.gateway_device), [(e, t.to(a.gateway_device)) for e, t in lists]
                    row = dict(transport=transport, tokens=tokens, mbytes=hidden.nbytes / 1e6,
                               **measure(clients, hidden, lists, a.repeats))
                    row["gb_per_s"] = 2 * hidden.nbytes / 1e9 / max(row["overhead_ms"] / 1e3, 1e-9)
                    row["kind"] = clients.transport.kind(address) + ("+lane" if clients.transport.lane(address) else "")
                    results.append(row)
                    print(f"{transport:8} ({row['kind']}) {tokens:5} tokens {row['mbytes']:6.2f} MB: "
                          f"wall {row['wall_ms']:8.2f} ms, compute {row['compute_ms']:8.2f} ms, "
                          f"overhead {row['overhead_ms']:7.3f} ms ({row['gb_per_s']:.2f} GB/s)", flush=True)
            finally:
                clients.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    base = {r["tokens"]: r for r in results if r["transport"] == "grpc"}
    print(f"\n{'transport':9} {'tokens':>6} {'MB':>6} {'wall ms':>9} {'compute ms':>10} {'overhead ms':>11} "
          f"{'x grpc overhead':>15}")
    for r in results:
        ratio = base[r["tokens"]]["overhead_ms"] / r["overhead_ms"] if r["tokens"] in base else float("nan")
        r["overhead_speedup_vs_grpc"] = ratio
        print(f"{r['transport']:9} {r['tokens']:6} {r['mbytes']:6.2f} {r['wall_ms']:9.2f} {r['compute_ms']:10.2f} "
              f"{r['overhead_ms']:11.3f} {ratio:15.2f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(model=a.model, date=time.strftime("%Y-%m-%d"), threads=a.threads,
                                     device=a.device, gateway_device=a.gateway_device,
                                     repeats=a.repeats, results=results), indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
