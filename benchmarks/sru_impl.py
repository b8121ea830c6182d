#!/usr/bin/env python3
"""The pure-PyTorch SRU (--sru-impl torch) against sru's C++ kernel (--sru-impl kernel).

    python benchmarks/sru_impl.py [--tokens 4096 --seq 128 --layers 12 --experts 128 --reps 30]

Builds one forecaster of the default training size (as benchmarks/forecast_latency.py) with
each SRU, the same weights loaded into both, and times in interleaved pairs (kernel, torch,
torch, kernel, ...):

- `forecast` of an encoder pass: tokens/seq sequences of `seq` tokens;
- `forecast` of a decoder step: the same sequences, 16 decoder tokens so far;
- one training step (loss, backward) on an encoder batch of the same shape. With grad on,
  sru runs its own Python loop on CPU (its kernel is inference only), so this compares
  two Python loops.

Prints the median ms of each, torch / kernel ratios measured in the same run, and the
largest absolute difference between the two forecasts and gradients (fp32).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from moe_common.traces import DECODER, ENCODER  # noqa: E402
from predictor_service.forecaster import Example, Forecaster, ForecasterConfig, _loss  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="tokens of the encoder pass")
    p.add_argument("--seq", type=int, default=128, help="tokens per sequence")
    p.add_argument("--layers", type=int, default=12, help="sparse layers per stack")
    p.add_argument("--experts", type=int, default=128)
    p.add_argument("--vocab", type=int, default=32128)
    p.add_argument("--reps", type=int, default=30, help="timed pairs per measurement")
    p.add_argument("--bidirectional", action="store_true", help="bidirectional encoder SRU")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    warnings.filterwarnings("ignore", message="Running SRU on CPU with grad_enabled")
    cfg = ForecasterConfig(a.vocab, a.experts, a.layers, a.layers, 64, bidirectional=a.bidirectional)
    kernel = Forecaster(cfg, "kernel").eval()
    torch_sru = Forecaster(cfg, "torch").eval()
    torch_sru.load_state_dict(kernel.state_dict())
    batch = a.tokens // a.seq
    gen = torch.Generator().manual_seed(0)
    enc = torch.randint(0, a.vocab, (batch, a.seq), generator=gen)
    dec = torch.randint(0, a.vocab, (batch, 16), generator=gen)
    targets = torch.randint(0, a.experts, (batch, a.seq, a.layers), generator=gen)
    print(f"forecaster: {sum(p.numel() for p in kernel.parameters()) / 1e6:.1f} M parameters, hidden {cfg.hidden}, "
          f"{'bidirectional' if a.bidirectional else 'causal'} encoder SRU, torch threads {torch.get_num_threads()}")

    def train_step(model):
        model.zero_grad()
        _loss(model, Example(ENCODER, 0, enc, targets)).backward()

    cases = [(f"encoder forecast [{batch}, {a.seq}]", lambda m: m.forecast(ENCODER, enc)),
             (f"decoder forecast [{batch}, 16]", lambda m: m.forecast(DECODER, dec)),
             (f"training step [{batch}, {a.seq}]", train_step)]
    print(f"{'':<32}{'kernel ms':>10}{'torch ms':>10}{'torch/kernel':>14}")
    for name, fn in cases:
        times = {"kernel": [], "torch": []}
        for i in range(a.reps + 3):  # the first three pairs warm up (TorchScript profiles its first calls)
            order = [("kernel", kernel), ("torch", torch_sru)]
            for label, model in order if i % 2 else order[::-1]:
                t0 = time.perf_counter()
                fn(model)
                if i >= 3:
                    times[label].append((time.perf_counter() - t0) * 1e3)
        k, t = statistics.median(times["kernel"]), statistics.median(times["torch"])
        print(f"{name:<32}{k:>10.2f}{t:>10.2f}{t / k:>13.2f}x")

    diff = max((kernel.forecast(kind, x) - torch_sru.forecast(kind, x)).abs().max().item()
               for kind, x in ((ENCODER, enc), (DECODER, dec)))
    train_step(kernel)
    train_step(torch_sru)
    grad = max((pk.grad - pt.grad).abs().max().item() for pk, pt in zip(kernel.parameters(), torch_sru.parameters())
               if pk.grad is not None)
    print(f"largest difference, torch against kernel: forecasts {diff:.2e}, gradients {grad:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
