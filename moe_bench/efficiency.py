"""Expert-server compute: per-token costs for the simulator, and achieved FLOP/s on a
realistic batch against a dense matmul of the same FLOPs on the same machine."""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from expert_server.experts import ExpertStore


def zipf_split(tokens: int, experts: int, s: float = 1.0) -> list[int]:
    """A skewed split of `tokens` over `experts` (Zipf-like, as routers produce); every expert gets >= 1."""
    weights = [1 / (i + 1) ** s for i in range(experts)]
    counts = [max(1, int(tokens * w / sum(weights))) for w in weights]
    counts[0] += tokens - sum(counts)
    return counts


def _median_s(fn, rounds: int, device: torch.device) -> float:
    def timed():
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    timed()  # warm-up
    return statistics.median(timed() for _ in range(rounds))


def measure(store: ExpertStore, counts: list[int], threads: int, rounds: int = 5) -> dict:
    """Run one sparse layer's experts over groups of `counts` tokens (as one RunExperts call
    does) with `threads` torch threads, and a dense FFN matmul of the same total tokens.

    Also fits the simulator's cost model: time of a call = group_s per expert group +
    token_s per token, from single-group calls of several sizes.
    Returns seconds, GFLOP/s, efficiency (expert path / dense) and the fitted costs.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        experts = len(counts)
        store.assign([(0, e) for e in range(experts)])
        tokens = sum(counts)
        dev = store.device
        # As RunExperts gets it: on the CPU (the expert path includes the copies to and from a GPU).
        x = torch.randn(tokens, store.d_model)
        d_ff = store.config.d_ff
        flops = 2 * 2 * tokens * store.d_model * d_ff
        # The dense reference runs where the weights live, in the compute dtype.
        xd = x.to(dev, store.dtype)
        wi = torch.randn(d_ff, store.d_model, device=dev, dtype=store.dtype)
        wo = torch.randn(store.d_model, d_ff, device=dev, dtype=store.dtype)
        groups = list(enumerate(counts))
        with torch.inference_mode():
            expert_s = _median_s(lambda: store.run(0, groups, x), rounds, dev)
            dense_s = _median_s(lambda: store.ffn(xd, wi, wo), rounds, dev)
            sizes = [1, 8, 32, 128, 512]
            xs = torch.randn(max(sizes), store.d_model)
            single = [_median_s(lambda n=n: store.run(0, [(0, n)], xs[:n]), rounds, dev) for n in sizes]
        token_s, group_s = np.polyfit(sizes, single, 1)
        return dict(tokens=tokens, experts=experts, largest_group=max(counts), threads=threads,
                    expert_s=expert_s, dense_s=dense_s,
                    expert_gflops=flops / expert_s / 1e9, dense_gflops=flops / dense_s / 1e9,
                    efficiency=dense_s / expert_s,
                    group_s=max(float(group_s), 0.0), token_s=float(token_s),
                    device=str(store.device), dtype=str(store.dtype).removeprefix("torch."))
    finally:
        torch.set_num_threads(before)
        store.assign([])


def fit_call_costs(store: ExpertStore, rounds: int = 5, groups=(1, 4, 16), sizes=(8, 64, 256)) -> dict:
    """The three-term cost model of one RunExperts call, fitted by least squares over calls
    of G groups of n tokens each: seconds = call_s + G * group_s + G * n * token_s.

    The single-group fit of `measure` folds a call's fixed cost into group_s, which is
    right for the `exact` kernel (its launches are per group) but not for `grouped`, whose
    launches are per call whatever the number of groups. Needs max(groups) experts of
    layer 0 on the store. Returns call_s, group_s, token_s (clipped at 0) and the points.
    """
    dev = store.device
    groups = sorted({min(g, store.num_experts) for g in groups})  # a small model has fewer experts
    store.assign([(0, e) for e in range(max(groups))])
    x = torch.randn(max(groups) * max(sizes), store.d_model)
    rows, seconds = [], []
    try:
        with torch.inference_mode():
            for g in groups:
                for n in sizes:
                    call = [(e, n) for e in range(g)]
                    seconds.append(_median_s(lambda c=call, k=g * n: store.run(0, c, x[:k]), rounds, dev))
                    rows.append((1.0, g, g * n))
    finally:
        store.assign([])
    (call_s, group_s, token_s), *_ = np.linalg.lstsq(np.array(rows), np.array(seconds), rcond=None)
    return dict(call_s=max(float(call_s), 0.0), group_s=max(float(group_s), 0.0), token_s=max(float(token_s), 0.0),
                points=[dict(groups=int(g), tokens=int(t), seconds=s) for (_, g, t), s in zip(rows, seconds)])
