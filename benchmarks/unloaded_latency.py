"""One request at a time, nothing else running: the stack's latency against HF's.

Starts `--expert-servers` expert servers and a gateway per transport (`--max-batch-size
1`), sends `--requests` single-prompt requests one after another, and runs the same
prompts through the single-process HF model in this process. Prints the median latency
of each and HF's median / the stack's (1.0x = as fast as HF; higher is faster), all
measured in this run, in ABBA order so that drift hits both alike.

    python benchmarks/unloaded_latency.py --model tiny --prompt-tokens 32 --new-tokens 8
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

from gateway.launcher import spawn_expert_server, spawn_gateway, wait_ready  # noqa: E402
from moe_common import model_source  # noqa: E402
from moe_common.serving import message_options, pick_free_port  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    p.add_argument("--expert-servers", type=int, default=2)
    p.add_argument("--transports", default="grpc,auto-grpc,auto",
                   help="gateway --transport per entry; X-grpc: X with --no-local-lane (control messages over gRPC)")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--requests", type=int, default=20)
    p.add_argument("--hf-threads", type=int, default=1, help="torch threads of the HF baseline")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "unloaded_latency.json")
    a = p.parse_args(argv)

    import grpc
    from transformers import SwitchTransformersForConditionalGeneration

    from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    source = model_source.resolve(a.model, a.cache_dir)
    prompts = [[(17 * i + 5 * j) % 250 + 3 for j in range(a.prompt_tokens)] for i in range(a.requests)]
    torch.set_num_threads(a.hf_threads)
    model = SwitchTransformersForConditionalGeneration.from_pretrained(source.path).eval()

    def hf_round() -> list[float]:
        out = []
        for ids in prompts:
            t0 = time.perf_counter()
            with torch.inference_mode():
                model.generate(input_ids=torch.tensor([ids]), max_new_tokens=a.new_tokens, do_sample=False)
            out.append(time.perf_counter() - t0)
        return out

    servers, addresses = [], []
    threads = max(1, 2 // a.expert_servers)
    results: dict[str, list[float]] = {"hf": []}
    try:
        for _ in range(a.expert_servers):
            port = pick_free_port()
            servers.append(spawn_expert_server(source.path, "127.0.0.1", port,
                                               ["--threads", str(threads), "--log-level", "WARNING"]))
            addresses.append(f"127.0.0.1:{port}")
        for proc, address in zip(servers, addresses):
            wait_ready(proc, address, 600)
        transports = a.transports.split(",")
        for order in (transports, transports[::-1]):  # ABBA
            results["hf"] += hf_round()
            for transport in order:
                port = pick_free_port()
                gw = spawn_gateway(source.path, "127.0.0.1", port, addresses,
                                   ["--transport", transport.removesuffix("-grpc"), "--max-batch-size", "1",
                                    "--max-wait-ms", "0", *(["--no-local-lane"] if transport.endswith("-grpc") else []),
                                    "--log-level", "WARNING"])
                try:
                    wait_ready(gw, f"127.0.0.1:{port}", 600)
                    with grpc.insecure_channel(f"127.0.0.1:{port}", options=message_options()) as ch:
                        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
                        params = gateway_pb2.GenerationParameters(max_new_tokens=a.new_tokens)
                        stub.Generate(gateway_pb2.GenerateRequest(token_ids=[gateway_pb2.TokenIds(ids=prompts[0])],
                                                                  parameters=params))  # warm-up
                        for ids in prompts:
                            t0 = time.perf_counter()
                            stub.Generate(gateway_pb2.GenerateRequest(token_ids=[gateway_pb2.TokenIds(ids=ids)],
                                                                      parameters=params))
                            results.setdefault(transport, []).append(time.perf_counter() - t0)
                finally:
                    gw.terminate()
                    gw.wait(timeout=60)
    finally:
        for proc in servers:
            proc.terminate()
        for proc in servers:
            proc.wait(timeout=60)

    hf = statistics.median(results["hf"])
    print(f"{'':10} {'p50 ms':>8} {'HF p50 / p50':>13}")
    summary = {}
    for name, values in results.items():
        med = statistics.median(values)
        summary[name] = dict(p50_ms=med * 1e3, vs_hf=hf / med)
        print(f"{name:10} {med * 1e3:8.1f} {hf / med:12.2f}x")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(model=a.model, date=time.strftime("%Y-%m-%d"), expert_servers=a.expert_servers,
                                     prompt_tokens=a.prompt_tokens, new_tokens=a.new_tokens,
                                     hf_threads=a.hf_threads, summary=summary), indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
