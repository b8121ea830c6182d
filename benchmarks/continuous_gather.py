"""What gathering the running rows' decoder caches costs per decode step.

The continuous scheduler keeps every row's self-attention keys/values in preallocated
buffers, left-padded to one end column (gateway/decode_cache.RowCaches): a step writes
one column and hands HF views. Against it, in the same run, two ways without buffers:
  concat  - HF's DynamicCache: the whole batch cache is re-concatenated with the new
            column every step (what generate() does; a batch of fixed rows);
  repad   - per-row caches re-padded into a fresh batch every step (what a naive
            continuous batcher does when the set of rows changes).
Per step and per configuration it reports the median over steps of the gather (cache
views, masks, writing the step's column) in microseconds, and the ratio to RowCaches.
Shapes are the model preset's decoder (layers, heads, d_kv); no model is run.

    python benchmarks/continuous_gather.py                       # base-e32-l4, 8 and 32 rows
    python benchmarks/continuous_gather.py --rows 8 --past 64,256
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

from gateway.decode_cache import RowCaches  # noqa: E402
from moe_common.model_source import preset_config_kwargs  # noqa: E402


def bench_rowcaches(layers, heads, d_kv, rows, past, src, steps) -> list[float]:
    caches = RowCaches(layers, heads, d_kv, torch.float32, torch.device("cpu"), rows=rows, width=2 * (past + steps))
    for _ in range(rows):
        caches.add([torch.randn(heads, src, d_kv)] * layers, [torch.randn(heads, src, d_kv)] * layers)
    caches.end = past  # every row has `past` tokens already
    new = torch.randn(rows, heads, 1, d_kv)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        cache, self_mask, enc_mask, _ = caches.step_inputs()
        for layer in range(layers):
            cache.self_attention_cache.layers[layer].update(new, new)
        caches.advance()
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


def bench_concat(layers, heads, d_kv, rows, past, steps) -> list[float]:
    keys = [torch.randn(rows, heads, past, d_kv) for _ in range(layers)]
    values = [torch.randn(rows, heads, past, d_kv) for _ in range(layers)]
    new = torch.randn(rows, heads, 1, d_kv)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        for layer in range(layers):
            keys[layer] = torch.cat([keys[layer], new], dim=-2)
            values[layer] = torch.cat([values[layer], new], dim=-2)
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


def bench_repad(layers, heads, d_kv, rows, past, steps) -> list[float]:
    # Rows of different lengths (past - 0 .. past - rows + 1), re-padded on the left each step.
    per_row = [[[torch.randn(heads, past - r, d_kv) for _ in range(layers)] for r in range(rows)]
               for _ in range(2)]  # [keys | values][row][layer]
    new = torch.randn(heads, 1, d_kv)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter_ns()
        width = max(c[0].shape[1] for c in per_row[0]) + 1
        for kind in per_row:
            for layer in range(layers):
                batch = torch.zeros(rows, heads, width, d_kv)
                for r, c in enumerate(kind):
                    c[layer] = torch.cat([c[layer], new], dim=1)
                    batch[r, :, width - c[layer].shape[1]:] = c[layer]
        times.append((time.perf_counter_ns() - t0) / 1e3)
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="base-e32-l4", help="a preset: its decoder's shapes are used")
    p.add_argument("--rows", default="8,32")
    p.add_argument("--past", default="64,192", help="tokens each row has decoded already")
    p.add_argument("--src", type=int, default=128, help="prompt tokens (cross-attention)")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = preset_config_kwargs(a.model)
    if cfg is None:
        p.error(f"{a.model} is not a preset")
    layers, heads, d_kv = cfg["num_decoder_layers"], cfg["num_heads"], cfg["d_kv"]
    results = []
    print(f"{a.model} decoder: {layers} layers, {heads} heads, d_kv {d_kv}; median us per step over {a.steps} steps")
    print(f"{'rows':>5} {'past':>5} {'RowCaches':>10} {'concat':>10} {'x':>6} {'repad':>10} {'x':>6}")
    for rows in (int(x) for x in a.rows.split(",")):
        for past in (int(x) for x in a.past.split(",")):
            ours = statistics.median(bench_rowcaches(layers, heads, d_kv, rows, past, a.src, a.steps))
            concat = statistics.median(bench_concat(layers, heads, d_kv, rows, past, a.steps))
            repad = statistics.median(bench_repad(layers, heads, d_kv, rows, past, a.steps))
            results.append(dict(rows=rows, past=past, rowcaches_us=ours, concat_us=concat, repad_us=repad))
            print(f"{rows:>5} {past:>5} {ours:>10.0f} {concat:>10.0f} {concat / ours:>6.1f} {repad:>10.0f} {repad / ours:>6.1f}")
    if a.json:
        a.json.write_text(json.dumps(dict(model=a.model, src=a.src, steps=a.steps, results=results), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
