"""Expert costs of the `grouped` kernel on a GPU, derived from the one grouped GEMM timing
taken there, in the format of benchmarks/gpu_costs.py (for `moe-bench --gpu-costs`).

Why derived and not measured: the only GPU timing of a grouped kernel so far is
`hf_anchors.py`'s `layer_grouped_bf16_ms`: one encoder layer's routed tokens
(`layer_tokens`, over `layer_experts_hit` experts) through torch.nn.functional.grouped_mm
in bf16 on an H200. `benchmarks/gpu_costs.py` measured `group_s` and `token_s` for the
`exact` kernel (HF's ops per group, launch-bound: 0.198 ms per group), which is what the
projection uses today. One timing cannot separate a fixed cost per group from a cost per
token, so this writes one of two splits that both reproduce it exactly:

  token   group_s = 0; every microsecond is per token. Best case for replication:
          splitting an expert across servers costs nothing.
  padded  a grouped GEMM pads each group to its row tile (128 rows on SM90 kernels), so
          on average a group costs half a tile of wasted rows: group_s = 64 rows and
          token_s = 1 row, with the row cost from layer_ms / (tokens + 64 * groups).

Either way it is a projection input, not a measurement: the next GPU session replaces it
with `benchmarks/gpu_costs.py --expert-kernel grouped` (benchmarks/gpu_check.sh).

    python benchmarks/grouped_costs.py --anchors shared/gpu/h200-hf-anchors.json \
        --split token --out /tmp/h200-grouped-token.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

HALF_TILE_ROWS = 64  # half of the 128-row tile of SM90 grouped GEMMs: mean padding per group


def derive(anchors: dict, split: str) -> dict:
    """gpu_costs.py-format costs (group_s, token_s, ...) from an hf_anchors result."""
    seconds = anchors["layer_grouped_bf16_ms"] / 1e3
    tokens, groups = int(anchors["layer_tokens"]), int(anchors["layer_experts_hit"])
    if split == "token":
        group_s, token_s = 0.0, seconds / tokens
    elif split == "padded":
        row_s = seconds / (tokens + HALF_TILE_ROWS * groups)
        group_s, token_s = HALF_TILE_ROWS * row_s, row_s
    else:
        raise ValueError(f"split must be token or padded, not {split!r}")
    return dict(group_s=group_s, token_s=token_s, replica_load_s=0.0, dtype="bfloat16", kernel="grouped",
                device=anchors.get("device", "a GPU"), date=anchors.get("date", ""),
                derived=f"grouped_mm of {tokens} tokens over {groups} experts in {seconds * 1e3:.3f} ms "
                        f"(hf_anchors layer_grouped_bf16_ms), split '{split}'; not a measurement of the kernel")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--anchors", type=Path, required=True, help="hf_anchors.py result (h200-hf-anchors.json)")
    p.add_argument("--split", choices=["token", "padded"], default="token",
                   help="how the one timing is split between a fixed cost per group and a cost per token")
    p.add_argument("--replica-load-s", type=float, default=None,
                   help="seconds to load one replica (default: replica_load_s of --expert-costs, else 0)")
    p.add_argument("--expert-costs", type=Path, default=None,
                   help="gpu_costs.py result from the same GPU, for replica_load_s")
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args(argv)
    d = derive(json.loads(a.anchors.read_text()), a.split)
    if a.replica_load_s is not None:
        d["replica_load_s"] = a.replica_load_s
    elif a.expert_costs:
        d["replica_load_s"] = float(json.loads(a.expert_costs.read_text()).get("replica_load_s", 0.0))
    a.out.write_text(json.dumps(d, indent=1) + "\n")
    print(f"{a.out}: group {d['group_s'] * 1e6:.2f} us, {d['token_s'] * 1e9:.1f} ns per token "
          f"({d['derived']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
