"""Why a layer call costs more inside a generation than back to back: warm and cold caches.

Two measurements, one run:
  1. ExpertStore.run of one token through one expert, in this process (no server): back
     to back, after sleeping 1 ms before each call, and after touching 32 MB before each
     call (the caches thrashed, as a gateway's attention on the same cores does);
  2. with `--expert-servers` real expert servers and the gateway's Engine in this
     process: ExpertClients.run_layer's wall time per call inside generations (one
     prompt of `--prompt-tokens`, `--new-tokens` new tokens, so mostly one-token decode
     calls) against one-token calls back to back through the same clients.

    python benchmarks/call_warmth.py                 # tiny, 2 expert servers
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

from expert_server.experts import ExpertStore  # noqa: E402
from gateway import dispatch  # noqa: E402
from gateway.config import GatewayConfig  # noqa: E402
from gateway.engine import Engine, Sampling  # noqa: E402
from gateway.launcher import expert_servers  # noqa: E402
from moe_common import model_source  # noqa: E402


def store_run_us(source, repeats: int) -> dict[str, float]:
    """Median us of ExpertStore.run (1 token) back to back, after 1 ms idle, after thrashing."""
    store = ExpertStore(source)
    store.assign([(0, e) for e in range(store.num_experts)])
    x = torch.randn(1, store.d_model)
    big = torch.empty(8 << 20)  # 32 MB: more than this machine's caches
    out = {}
    for name, before in (("back to back", lambda: None), ("after 1 ms idle", lambda: time.sleep(1e-3)),
                         ("after thrashing caches", lambda: big.add_(1.0))):
        times = []
        for i in range(repeats):
            before()
            t0 = time.perf_counter_ns()
            store.run(0, [(i % store.num_experts, 1)], x)
            times.append(time.perf_counter_ns() - t0)
        out[name] = statistics.median(times) / 1e3
    store.close()
    return out


def in_generation_us(engine: Engine, a) -> tuple[float, float]:
    """(median us of ExpertClients.run_layer inside generations of one prompt each, calls a request)."""
    calls: list[int] = []
    run_layer = dispatch.ExpertClients.run_layer

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter_ns()
        try:
            return run_layer(self, *args, **kwargs)
        finally:
            calls.append(time.perf_counter_ns() - t0)

    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 250, (a.requests, a.prompt_tokens), generator=g).tolist()
    engine.generate_batch([prompts[0]], [a.new_tokens], Sampling())  # warm-up
    dispatch.ExpertClients.run_layer = timed
    try:
        for prompt in prompts:
            engine.generate_batch([prompt], [a.new_tokens], Sampling())
    finally:
        dispatch.ExpertClients.run_layer = run_layer
    return statistics.median(calls) / 1e3, len(calls) / len(prompts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    p.add_argument("--expert-servers", type=int, default=2)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--requests", type=int, default=40)
    p.add_argument("--repeats", type=int, default=400, help="calls per back-to-back measurement")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "call_warmth.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    source = model_source.resolve(a.model, a.cache_dir)

    store_us = store_run_us(source, a.repeats)
    print("ExpertStore.run, 1 token (in process), median us:")
    for name, us in store_us.items():
        print(f"  {name:24} {us:7.1f}")

    with expert_servers(source.path, a.expert_servers, ["--threads", "1", "--log-level", "WARNING"]) as addresses:
        engine = Engine(GatewayConfig(model=a.model, cache_dir=a.cache_dir, expert_servers=addresses))
        try:
            engine.connect()
            in_generation, per_request = in_generation_us(engine, a)
            hidden = torch.randn(1, engine.model.config.d_model)
            back = []
            for i in range(a.repeats):
                t0 = time.perf_counter_ns()
                engine.clients.run_layer(0, hidden, [(i % engine.num_experts, torch.tensor([0]))])
                back.append(time.perf_counter_ns() - t0)
            back_to_back = statistics.median(back) / 1e3
        finally:
            engine.close()

    print(f"\nExpertClients.run_layer with {a.expert_servers} expert servers, median us per call:")
    print(f"  inside generations ({per_request:.0f} calls a request) {in_generation:7.1f}")
    print(f"  one-token calls back to back          {back_to_back:7.1f}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(
        date=time.strftime("%Y-%m-%d"), model=a.model, expert_servers=a.expert_servers, store_run_us=store_us,
        layer_call_us=dict(inside_generation=in_generation, back_to_back=back_to_back),
        calls_per_request=per_request), indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
