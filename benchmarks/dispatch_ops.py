"""The gateway's own work around one sparse-layer call, against HF's expert loop.

Both sides get the same routed tokens (HF's routing mask, ~5% dropped) and identity
experts, so only the bookkeeping is timed: HF's SwitchTransformersExperts.forward (a
torch.where, a gather and an index_add per hit expert) against RemoteExperts.forward
(gateway/dispatch.py: Python lists or one sort for the groups, then one index_add over
all rows, or one per expert above its concatenation threshold) with a layer call that
returns the rows unchanged. Outputs are checked bit for bit. Also times RemoteExperts forced to each way
of combining, and group_tokens forced to each way of grouping (Python lists, tensor ops),
which is where their thresholds come from.

    python benchmarks/dispatch_ops.py                       # d_model 64, 8 experts
    python benchmarks/dispatch_ops.py --d-model 768 --experts 32 --tokens 64,1024,4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway import dispatch  # noqa: E402


class _IdentityCall:
    """A layer call whose experts return their rows unchanged."""

    def run_layer(self, layer, hidden, token_lists):
        return {e: hidden[t] for e, t in token_lists}

    def add_dispatch_time(self, ns):
        pass


def per_call_us(fn, repeats: int) -> float:
    for _ in range(max(10, repeats // 10)):
        fn()
    t0 = time.perf_counter_ns()
    for _ in range(repeats):
        fn()
    return (time.perf_counter_ns() - t0) / repeats / 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--d-model", type=int, default=64)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--tokens", default="1,8,32,256,2048", help="routed tokens per call, comma-separated")
    p.add_argument("--repeats", type=int, default=2000)
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "dispatch_ops.json")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import SwitchTransformersConfig
    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersExperts

    hf = SwitchTransformersExperts(SwitchTransformersConfig(d_model=a.d_model, d_ff=4, num_experts=a.experts))
    for e in range(a.experts):
        hf[f"expert_{e}"] = nn.Identity()
    remote = dispatch.RemoteExperts(0, _IdentityCall())
    g = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'tokens':>6} {'HF loop us':>10} {'gateway us':>10} {'x':>6} {'concat us':>10} {'per-expert us':>13} "
          f"{'grouping: python us':>19} {'tensor us':>9}")
    for n in (int(t) for t in a.tokens.split(",")):
        hidden = torch.randn(n, a.d_model, generator=g)
        selected = nn.functional.one_hot(torch.randint(0, a.experts, (n,), generator=g), a.experts)
        if n > 1:
            selected[torch.rand(n, generator=g) < 0.05] = 0  # dropped over capacity
        selected = selected[:, None, :]
        probs = torch.rand(n, 1, generator=g)
        with torch.inference_mode():
            expected = hf(hidden, selected, probs)
            got = remote(hidden, selected, probs)
            assert got.view(torch.int32).tolist() == expected.view(torch.int32).tolist(), "not bit-identical to HF"
            row = dict(tokens=n, hf_us=per_call_us(lambda: hf(hidden, selected, probs), a.repeats),
                       gateway_us=per_call_us(lambda: remote(hidden, selected, probs), a.repeats))
            default = dispatch._CONCAT_ELEMENTS
            try:
                for name, limit in (("concat_us", 1 << 62), ("per_expert_us", 0)):
                    dispatch._CONCAT_ELEMENTS = limit
                    row[name] = per_call_us(lambda: remote(hidden, selected, probs), a.repeats)
            finally:
                dispatch._CONCAT_ELEMENTS = default
            default = dispatch._PYTHON_GROUPING
            onehot = selected[:, 0, :]
            try:
                for name, limit in (("grouping_python_us", 1 << 62), ("grouping_tensor_us", -1)):
                    dispatch._PYTHON_GROUPING = limit
                    row[name] = per_call_us(lambda: dispatch.group_tokens(onehot), a.repeats)
            finally:
                dispatch._PYTHON_GROUPING = default
        rows.append(row)
        print(f"{n:6} {row['hf_us']:10.1f} {row['gateway_us']:10.1f} {row['hf_us'] / row['gateway_us']:5.2f}x "
              f"{row['concat_us']:10.1f} {row['per_expert_us']:13.1f} {row['grouping_python_us']:19.1f} "
              f"{row['grouping_tensor_us']:9.1f}", flush=True)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(dict(date=time.strftime("%Y-%m-%d"), d_model=a.d_model, experts=a.experts,
                                     concat_elements=dispatch._CONCAT_ELEMENTS,
                                     python_grouping=dispatch._PYTHON_GROUPING, results=rows), indent=1))
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
