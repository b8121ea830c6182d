#!/usr/bin/env python3
"""Expert kernels against HF's per-expert loop on one sparse layer's routed tokens.

    python benchmarks/expert_kernels.py [--model base-e32-l4] [--tokens 512] [--experts 8] [--device cpu|cuda]

The store holds every expert of sparse layer `--layer`; one call routes `--tokens` tokens
over `--experts` of them (picked at random, Zipf-like split as routers produce, groups in
ascending expert order as the gateway sends them). Times, median of `--rounds`:

- HF's loop: the real SwitchTransformersExperts module over the tokens in token order
  (its torch.where per expert, gather, index_add), routing probabilities 1 so that
  its output is the experts' output;
- ExpertStore.run with the `exact` and the `grouped` kernel (rows already grouped by
  expert: grouping is the gateway's work);
- one dense FFN matmul of the same FLOPs (fp32; on CUDA also bf16);
- on CUDA also the two kernels alone, on rows already on the GPU (the store's rows
  include the copies of its input from and output to the host, as the server makes them),
  and exact with its other group executors: 4 threads, and 4 CUDA streams.

Prints ms, speedup against HF's loop measured in the same run, and max abs difference
against HF. Then the store's own overhead beyond the matmuls for a small call (64
tokens over 4 experts): ExpertStore.run minus the bare matmuls of the same kernel, in
interleaved pairs (median and quartiles of the differences; on CUDA, run includes the
host-device copies the server makes). It is measured on --overhead-model (tiny:
d_model 64), because with switch-base shapes on a CPU one call's matmul time varies by
more than the whole overhead. Writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from expert_server.experts import ExpertStore  # noqa: E402
from expert_server.kernels import group_offsets, run_exact, run_grouped, stack_layer  # noqa: E402
from moe_bench.efficiency import zipf_split  # noqa: E402
from moe_common import model_source  # noqa: E402


def timer(device: torch.device):
    def timed(fn) -> float:
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0
    return timed


def hf_module(store: ExpertStore, layer: int):
    """HF's SwitchTransformersExperts holding the store's weights of `layer` (shared, not copied)."""
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersExperts

    with torch.device("meta"):  # no random init: every weight is replaced below
        module = SwitchTransformersExperts(store.config).eval()
    for e in range(store.num_experts):
        wi, wo = store.weights_of((layer, e))
        module[f"expert_{e}"].wi.weight = torch.nn.Parameter(wi, requires_grad=False)
        module[f"expert_{e}"].wo.weight = torch.nn.Parameter(wo, requires_grad=False)
    return module


def routed_call(store: ExpertStore, tokens: int, experts: int, seed: int):
    """One layer call: hidden [N, d_model] in token order, HF's routing tensors, and the
    store's view of it: groups [(expert, n)] ascending and the row order that groups them."""
    rng = random.Random(seed)
    chosen = sorted(rng.sample(range(store.num_experts), experts))
    counts = zipf_split(tokens, experts)
    rng.shuffle(counts)  # the largest group is not always the lowest expert
    assignment = torch.tensor([e for e, n in zip(chosen, counts) for _ in range(n)])
    assignment = assignment[torch.randperm(tokens, generator=torch.Generator().manual_seed(seed))]  # [N]
    hidden = torch.randn(tokens, store.d_model, generator=torch.Generator().manual_seed(seed + 1)).to(store.dtype)
    selected = F.one_hot(assignment, store.num_experts)[:, None, :]  # [N, 1, E]
    probs = torch.ones(tokens, 1, dtype=store.dtype)  # [N, 1]: HF's output is then the experts' output
    order = torch.argsort(assignment, stable=True)  # [N]: rows grouped by expert, ascending
    groups = [(e, n) for e, n in zip(chosen, [int((assignment == e).sum()) for e in chosen])]
    return hidden, selected, probs, order, groups


def bare_exact(store: ExpertStore, layer: int, x: torch.Tensor, groups):
    """Only the matmuls (and activation) of the exact kernel, slices made beforehand."""
    parts, start = [], 0
    for e, n in groups:
        parts.append((x[start:start + n], *store.weights_of((layer, e))))
        start += n
    act = store.act
    return lambda: [F.linear(act(F.linear(xs, wi)), wo) for xs, wi, wo in parts]


def bare_grouped(store: ExpertStore, layer: int, x: torch.Tensor, groups):
    """Only the two grouped_mm calls (and activation) of the grouped kernel, offsets made beforehand."""
    stacked = stack_layer({e: store.weights_of((layer, e)) for l, e in store.held() if l == layer})  # as the store's
    offsets, _ = group_offsets(groups, stacked.slot, len(stacked.experts))
    offs = torch.tensor(offsets, dtype=torch.int32, device=x.device)
    xs = x.to(stacked.wi.dtype)
    wi, wo, act = stacked.wi.transpose(-2, -1), stacked.wo.transpose(-2, -1), store.act
    return lambda: F.grouped_mm(act(F.grouped_mm(xs, wi, offs=offs)), wo, offs=offs)


def overhead(stores: dict[str, ExpertStore], layer: int, tokens: int, experts: int, reps: int, device) -> dict:
    """Store overhead beyond the matmuls for one small call, per kernel, in microseconds."""
    timed = timer(device)
    out = {}
    for kernel, store in stores.items():
        _, _, _, _, groups = routed_call(store, tokens, experts, seed=7)
        x = torch.randn(tokens, store.d_model, dtype=store.dtype)  # as decoded by the servicer: on CPU
        bare = (bare_exact if kernel == "exact" else bare_grouped)(store, layer, x.to(device), groups)
        call = lambda: store.run(layer, groups, x)  # noqa: E731
        with torch.inference_mode():
            for fn in (call, bare, call, bare):
                fn()  # warm-up
            runs, bares = [], []
            for _ in range(reps):  # interleaved pairs: drifts in machine load hit both
                runs.append(timed(call))
                bares.append(timed(bare))
        diffs = sorted((r - b) * 1e6 for r, b in zip(runs, bares))
        q1, med, q3 = statistics.quantiles(diffs, n=4)
        out[kernel] = dict(groups=groups, reps=reps, run_us=statistics.median(runs) * 1e6,
                           matmuls_us=statistics.median(bares) * 1e6, overhead_us=med,
                           overhead_q1_us=q1, overhead_q3_us=q3)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base-e32-l4", help="preset or checkpoint (base-e32-l4: d_model 768, d_ff 3072)")
    p.add_argument("--layer", type=int, default=0, help="sparse layer whose experts run")
    p.add_argument("--tokens", type=int, default=512, help="routed tokens in the call")
    p.add_argument("--experts", type=int, default=8, help="experts the tokens are routed to (of those in the layer)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--overhead-tokens", type=int, default=64)
    p.add_argument("--overhead-experts", type=int, default=4)
    p.add_argument("--overhead-reps", type=int, default=1000)
    p.add_argument("--overhead-model", default="tiny",
                   help="model to measure the overhead on ('' to skip); the benchmark's own model works too")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "expert_kernels.json")
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device")

    source = model_source.resolve(a.model, a.cache_dir)
    stores = {k: ExpertStore(source, a.device, kernel=k) for k in ("exact", "grouped")}
    if not 0 < a.experts <= stores["exact"].num_experts:
        p.error(f"--experts must be 1..{stores['exact'].num_experts}")
    held = [(a.layer, e) for e in range(stores["exact"].num_experts)]
    assign_s = {}
    for kernel, s in stores.items():
        t0 = time.perf_counter()
        s.assign(held)  # grouped: also stacks the layer
        assign_s[kernel] = time.perf_counter() - t0
    store = stores["exact"]
    d_model, d_ff = store.d_model, store.config.d_ff

    hidden, selected, probs, order, groups = routed_call(store, a.tokens, a.experts, seed=0)
    grouped_rows = hidden[order]  # [N, d_model]: what the gateway sends
    hf = hf_module(store, a.layer)
    hd, sd, pd = hidden.to(device), selected.to(device), probs.to(device)
    g = torch.Generator().manual_seed(1)
    dense = {"fp32": tuple(torch.randn(*shape, generator=g).to(device)
                           for shape in ((a.tokens, d_model), (d_ff, d_model), (d_model, d_ff)))}
    if device.type == "cuda":
        dense["bf16"] = tuple(t.bfloat16() for t in dense["fp32"])

    runs = {
        "HF per-expert loop": lambda: hf(hd, sd, pd),
        "exact": lambda: stores["exact"].run(a.layer, groups, grouped_rows),
        "grouped": lambda: stores["grouped"].run(a.layer, groups, grouped_rows),
        **{f"dense matmul {k} (same FLOPs)": (lambda t=t: F.linear(torch.relu(F.linear(t[0], t[1])), t[2]))
           for k, t in dense.items()},
    }
    if device.type == "cuda":
        # The kernels alone on rows already on the GPU: the store's rows above include the
        # host-device copies of its input and output that the server makes.
        rows_dev, counts = grouped_rows.to(device), [n for _, n in groups]
        weights = [store.weights_of((a.layer, e)) for e, _ in groups]
        stacked = stack_layer({e: store.weights_of((a.layer, e)) for _, e in held})
        runs["exact kernel, on device"] = lambda: run_exact(rows_dev, weights, counts, store.act)
        # The other group executors of exact (--group-executor): 4 threads, or 4 CUDA streams.
        pool = ThreadPoolExecutor(max_workers=4)
        streams = [torch.cuda.Stream(device) for _ in range(4)]
        runs["exact kernel, threads, on device"] = lambda: run_exact(rows_dev, weights, counts, store.act, pool)
        runs["exact kernel, streams, on device"] = lambda: run_exact(rows_dev, weights, counts, store.act,
                                                                     streams=streams)
        runs["grouped kernel, on device"] = lambda: run_grouped(rows_dev, stacked, groups, store.act)
    timed = timer(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        ref = hf(hd, sd, pd).cpu()
        outputs = {}
        for name, fn in runs.items():
            outputs[name] = fn()  # warm-up
        for _ in range(a.rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn))
    unsorted = torch.empty_like(grouped_rows)
    diffs = {"HF per-expert loop": 0.0}
    for name in runs:
        if name.startswith(("exact", "grouped")):  # rows in grouped order: back to token order
            diffs[name] = float((unsorted.index_copy(0, order, outputs[name].cpu().to(unsorted.dtype)) - ref).abs().max())
    exact_equal = torch.equal(unsorted.index_copy(0, order, outputs["exact"]), ref)

    flops = 2 * 2 * a.tokens * d_model * d_ff
    hf_s = statistics.median(times["HF per-expert loop"])
    rows = []
    for name, ts in times.items():
        med = statistics.median(ts)
        rows.append(dict(path=name, ms=med * 1e3, speedup_vs_hf=hf_s / med, gflops=flops / med / 1e9,
                         max_abs_diff_vs_hf=diffs.get(name)))

    print(f"{a.model} layer {a.layer} on {device}: {a.tokens} tokens over {a.experts} of {store.num_experts} "
          f"held experts (groups {[n for _, n in groups]}), d_model {d_model}, d_ff {d_ff}, {store.dtype}, "
          f"torch threads {torch.get_num_threads()}, median of {a.rounds}")
    print(f"{'path':<32} {'ms':>9} {'vs HF':>7} {'GFLOP/s':>8} {'max |diff| vs HF':>17}")
    for r in rows:
        diff = "" if r["max_abs_diff_vs_hf"] is None else f"{r['max_abs_diff_vs_hf']:.2e}"
        print(f"{r['path']:<32} {r['ms']:9.2f} {r['speedup_vs_hf']:6.2f}x {r['gflops']:8.1f} {diff:>17}")
    print(f"exact bit-identical to HF: {exact_equal}; assign() of {len(held)} experts: exact {assign_s['exact']:.2f} s, "
          f"grouped {assign_s['grouped']:.2f} s (loading, and for grouped stacking them)")

    overheads = {}
    if a.overhead_model:
        small_stores = stores
        if a.overhead_model != a.model:
            small = model_source.resolve(a.overhead_model, a.cache_dir)
            small_stores = {k: ExpertStore(small, a.device, kernel=k) for k in ("exact", "grouped")}
            for s in small_stores.values():
                s.assign([(a.layer, e) for e in range(s.num_experts)])
        experts = min(a.overhead_experts, small_stores["exact"].num_experts)
        overheads[a.overhead_model] = overhead(small_stores, a.layer, a.overhead_tokens, experts, a.overhead_reps,
                                               device)
        print(f"\nstore overhead beyond the matmuls, {a.overhead_model}, {a.overhead_tokens} tokens over {experts} "
              f"experts, {a.overhead_reps} interleaved pairs (medians; run = ExpertStore.run, matmuls = the "
              f"kernel's bare matmuls):")
        print(f"{'kernel':<8} {'run us':>9} {'matmuls us':>11} {'overhead us':>12} {'quartiles':>16}")
        for kernel, o in overheads[a.overhead_model].items():
            print(f"{kernel:<8} {o['run_us']:9.1f} {o['matmuls_us']:11.1f} {o['overhead_us']:12.1f} "
                  f"{o['overhead_q1_us']:7.1f}..{o['overhead_q3_us']:<7.1f}")

    result = dict(
        benchmark="expert_kernels", date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        command=" ".join(sys.argv), device=str(device),
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        torch=torch.__version__, threads=torch.get_num_threads(),
        model=a.model, layer=a.layer, d_model=d_model, d_ff=d_ff, dtype=str(store.dtype).removeprefix("torch."),
        tokens=a.tokens, experts_in_call=a.experts, experts_held=len(held), groups=groups, rounds=a.rounds,
        rows=rows, exact_bit_identical_to_hf=exact_equal, assign_s=assign_s,
        overhead=dict(tokens=a.overhead_tokens, per_model=overheads),
    )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
