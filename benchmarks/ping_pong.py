"""Would ping-pong micro-batches pay here? One batch on one thread against its two halves
on two threads at once, through the gateway's own model and real expert servers.

MegaScale-Infer's ping-pong pipeline splits a batch in two so that one half's expert calls
overlap the other half's attention. Two threads, each running the gateway's model
(Engine.generate_batch) on half the batch, give that overlap without a scheduler: while
one waits for its layer call (the GIL released in the socket read), the other computes.
So their throughput against one thread on the whole batch bounds what a ping-pong
scheduler could gain on this machine. On CUDA each thread issues to its own stream.

Measured rounds alternate (ABBA) so that drift hits both alike; every round checks that
the two halves generated exactly the tokens of the whole batch.

    python benchmarks/ping_pong.py                                   # tiny, 2 servers
    python benchmarks/ping_pong.py --model base-e8-l2 --torch-threads 1
    python benchmarks/ping_pong.py --device cuda --expert-device cuda --model base-e32-l4
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.config import GatewayConfig  # noqa: E402
from gateway.engine import Engine, Sampling  # noqa: E402
from gateway.launcher import expert_servers  # noqa: E402
from moe_common import model_source  # noqa: E402


def run_halves(engine: Engine, batch: list[list[int]], limits: list[int], streams) -> list[list[int]]:
    """Both halves of `batch` at once, the second on this thread; tokens per row, in order."""
    half = len(batch) // 2
    results: list = [None, None]
    errors: list[BaseException] = []

    def run(i: int, rows, lim) -> None:
        try:
            if streams is not None:
                torch.cuda.set_stream(streams[i])  # per thread: this thread's kernels go there
            results[i] = engine.generate_batch(rows, lim, Sampling())
            if streams is not None:
                streams[i].synchronize()
        except BaseException as exc:  # noqa: BLE001 - re-raised on the calling thread
            errors.append(exc)

    other = threading.Thread(target=run, args=(0, batch[:half], limits[:half]))
    other.start()
    run(1, batch[half:], limits[half:])
    other.join()
    if errors:
        raise errors[0]
    return [r.token_ids for r in results[0] + results[1]]


def measure(engine: Engine, batches, limits, streams, a) -> tuple[dict[str, list[float]], int]:
    """Seconds per round of each variant (ABBA) and the ping-pong rows whose tokens differ."""
    def whole(batch):
        return [r.token_ids for r in engine.generate_batch(batch, limits, Sampling())]

    variants = {"one thread": whole, "ping-pong": lambda batch: run_halves(engine, batch, limits, streams)}
    for fn in variants.values():  # warm-up: channels, segments, lanes, kernels
        fn(batches[0])
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    mismatched = 0
    for r in range(a.rounds * 2):
        name = list(variants)[(0, 1, 1, 0)[r % 4]]  # ABBA
        outputs = []
        t0 = time.perf_counter()
        for batch in batches:
            outputs.append(variants[name](batch))
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        seconds[name].append(time.perf_counter() - t0)
        if name == "ping-pong":
            mismatched += sum(x != y for batch, out in zip(batches, outputs) for x, y in zip(whole(batch), out))
        print(f"round {r + 1}: {name:10} {seconds[name][-1]:.2f} s", flush=True)
    return seconds, mismatched


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    p.add_argument("--expert-servers", type=int, default=2)
    p.add_argument("--device", default="cpu", help="the gateway model's device")
    p.add_argument("--expert-device", default="cpu", help="the expert servers' device")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--batches", type=int, default=6, help="batches per round")
    p.add_argument("--rounds", type=int, default=4, help="measured rounds per variant, ABBA")
    p.add_argument("--torch-threads", type=int, default=0, help="intra-op threads of the gateway (0: torch's default)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "ping_pong.json")
    a = p.parse_args(argv)
    if a.batch_size < 2:
        p.error("--batch-size must be at least 2 (two halves)")
    if a.torch_threads:
        torch.set_num_threads(a.torch_threads)

    source = model_source.resolve(a.model, a.cache_dir)
    g = torch.Generator().manual_seed(0)
    batches = [torch.randint(3, 250, (a.batch_size, a.prompt_tokens), generator=g).tolist() for _ in range(a.batches)]
    limits = [a.new_tokens] * a.batch_size
    streams = [torch.cuda.Stream(), torch.cuda.Stream()] if a.device.startswith("cuda") else None

    threads = max(1, (torch.get_num_threads() if a.expert_device == "cpu" else 1) // a.expert_servers)
    server_args = ["--threads", str(threads), "--device", a.expert_device, "--log-level", "WARNING"]
    with expert_servers(source.path, a.expert_servers, server_args) as addresses:
        engine = Engine(GatewayConfig(model=a.model, cache_dir=a.cache_dir, expert_servers=addresses, device=a.device))
        try:
            engine.connect()
            seconds, mismatched = measure(engine, batches, limits, streams, a)
        finally:
            engine.close()

    tokens = a.batches * a.batch_size * a.new_tokens
    base = statistics.median(seconds["one thread"])
    summary = {name: dict(median_s=statistics.median(v), tokens_per_s=tokens / statistics.median(v),
                          x_one_thread=base / statistics.median(v), rounds_s=v) for name, v in seconds.items()}
    print(f"\n{'variant':10} {'tokens/s':>9} {'x one thread':>12}")
    for name, row in summary.items():
        print(f"{name:10} {row['tokens_per_s']:9.0f} {row['x_one_thread']:11.2f}x")
    checked = a.rounds * a.batches * a.batch_size
    print(f"ping-pong rows token-identical to the whole batch's: {checked - mismatched}/{checked}")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(
        date=time.strftime("%Y-%m-%d"), model=a.model, device=a.device, expert_device=a.expert_device,
        expert_servers=a.expert_servers, batch_size=a.batch_size, prompt_tokens=a.prompt_tokens,
        new_tokens=a.new_tokens, batches=a.batches, torch_threads=torch.get_num_threads(),
        rows_identical=checked - mismatched, rows_checked=checked, summary=summary), indent=1))
    print(f"wrote {a.out}")
    return 0 if mismatched == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
