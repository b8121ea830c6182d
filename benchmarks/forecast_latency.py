#!/usr/bin/env python3
"""Forecast latency of the SRU forecaster on this CPU.

    python benchmarks/forecast_latency.py [--tokens 4096 --seq 128 --layers 12 --experts 128]

Builds a forecaster of the default training size (ForecasterConfig defaults, or the
sizes given) with heads for every sparse layer, and times `forecast` for an encoder pass of
tokens/seq sequences of `seq` tokens and for a decoder step, median and p99 of --reps
calls. The weights are random: latency does not depend on them.

--design per-token times the first design instead: every token's distribution from the
token heads, summed (run it with --hidden 64 --sru-layers 2 --embed-dim 64 --bidirectional
for the size that design had).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_common.traces import DECODER, ENCODER  # noqa: E402
from predictor_service.forecaster import Forecaster, ForecasterConfig  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--layers", type=int, default=12, help="sparse layers the pass forecasts")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    p.add_argument("--design", choices=["sequence", "per-token"], default="sequence",
                   help="encoder forecast from the sequence head (in use) or summed per-token heads")
    p.add_argument("--embed-dim", type=int, default=None)
    p.add_argument("--hidden", type=int, default=None)
    p.add_argument("--sru-layers", type=int, default=None)
    p.add_argument("--bidirectional", action="store_true")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    sizes = {k: v for k, v in (("embed_dim", a.embed_dim), ("hidden", a.hidden), ("sru_layers", a.sru_layers))
             if v is not None}
    cfg = ForecasterConfig(a.vocab, a.experts, a.layers, a.layers, 64, bidirectional=a.bidirectional, **sizes)
    model = Forecaster(cfg).eval()
    batch = a.tokens // a.seq
    enc = torch.randint(0, a.vocab, (batch, a.seq))
    dec = torch.randint(0, a.vocab, (batch, 16))
    print(f"forecaster: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M parameters, "
          f"{a.layers} layers x {a.experts} experts, torch threads {torch.get_num_threads()}")
    def per_token(kind, tokens):
        with torch.inference_mode():
            return model.logits(kind, tokens).softmax(-1).sum((0, 1))

    encode = model.forecast if a.design == "sequence" else per_token
    print(f"encoder design: {a.design}; {cfg}")
    for name, kind, tokens in (("encoder pass", ENCODER, enc), ("decoder step", DECODER, dec)):
        fn = encode if kind == ENCODER else model.forecast
        for _ in range(3):
            fn(kind, tokens)
        times = []
        for _ in range(a.reps):
            t0 = time.perf_counter()
            fn(kind, tokens)
            times.append((time.perf_counter() - t0) * 1e3)
        times.sort()
        print(f"  {name:<13} tokens {list(tokens.shape)}: p50 {statistics.median(times):6.2f} ms, "
              f"p99 {times[int(0.99 * (len(times) - 1))]:6.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
