"""moe-bench: the simulator's arithmetic on a hand-made trace, and one whole run on the tiny preset."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from moe_bench import simulator
from moe_common.traces import ENCODER, Pass, TraceInfo

ROOT = Path(__file__).resolve().parents[1]

# One sparse layer of 4 experts on 2 servers: home placement [0, 1, 0, 1]. Every batch
# routes 6 tokens to expert 0 and 2 to expert 2, so server 0 gets all 8 and server 1 none.
INFO = TraceInfo("m", "hand-made", 16, 4, 64, [0], [], ["encoder.block.1"])


def batch(batch_id: int) -> list[Pass]:
    experts = np.array([[0, 0, 0, 0, 0, 0, 2, 2]], dtype=np.int16)[..., None]  # [B=1, S=8, Lp=1]
    return [Pass(batch_id, ENCODER, 0, np.ones((1, 8), np.int32), np.ones((1, 8), bool), experts,
                 np.zeros_like(experts, dtype=bool))]


def costs(replica_load_s: float = 0.0) -> simulator.Costs:
    # One second per token, nothing else: simulated seconds = sum of the busiest server's tokens.
    return simulator.Costs(group_s=0.0, token_s=1.0, layer_overhead_s=0.0, non_expert_s=0.0,
                           replica_load_s=replica_load_s)


def run(mode, policy="whole", replica_load_s=0.0, slots=1):
    return simulator.simulate(INFO, [batch(0), batch(1)], 2, mode, costs(replica_load_s), slots=slots, policy=policy)


def test_off_keeps_home_placement():
    r = run("off")
    assert r["seconds"] == 16 and r["layer_calls"] == 2
    assert r["balancedness"] == pytest.approx(8 / 16)  # mean 4 over max 8, twice


def test_reactive_replicates_the_hot_expert_for_the_second_batch():
    # Batch 0 has no history: 8. Batch 1 plans from batch 0: with `whole`, a copy of expert 0
    # on server 1 takes its 6 tokens, server 0 keeps 2: 6.
    r = run("reactive")
    assert r["seconds"] == 8 + 6
    assert r["balancedness"] == pytest.approx((4 + 4) / (8 + 6))
    assert r["replicas_loaded"] == 1 and r["prefetch_hit_rate"] == 1.0
    # `split` also splits expert 0's tokens: 4 and 4.
    assert run("reactive", policy="split")["seconds"] == 8 + 4


def test_a_replica_still_loading_is_not_used():
    # The second batch starts at t = 8 s; a replica needing 100 s to load is not ready then.
    r = run("reactive", replica_load_s=100.0)
    assert r["seconds"] == 16 and r["prefetch_hit_rate"] == 0.0


def test_a_replica_loads_while_the_gateway_computes():
    # Non-expert time 10 s over 2 batches: 5 s before each batch's one layer call. Batch 1
    # plans at its start (t = 5 + 8) and its replica needs 3 s: ready at 16, before the
    # layer call at 18, so batch 1 takes 6. Counting only layer time, it would be late.
    c = simulator.Costs(group_s=0.0, token_s=1.0, layer_overhead_s=0.0, non_expert_s=10.0, replica_load_s=3.0)
    r = simulator.simulate(INFO, [batch(0), batch(1)], 2, "reactive", c, slots=1)
    assert r["seconds"] == 10 + 8 + 6 and r["prefetch_hit_rate"] == 1.0
    late = simulator.Costs(group_s=0.0, token_s=1.0, layer_overhead_s=0.0, non_expert_s=10.0, replica_load_s=5.5)
    assert simulator.simulate(INFO, [batch(0), batch(1)], 2, "reactive", late, slots=1)["seconds"] == 10 + 8 + 8


class KnownLoads:
    """A forecaster that knows the hand-made trace's loads: [Lp=1, E=4]."""

    def forecast(self, kind, tokens):
        import torch

        return torch.tensor([[6.0, 0.0, 2.0, 0.0]])


def test_predictive_plans_the_queued_batch_while_the_previous_one_runs():
    # With lookahead, batch 1 is forecast and planned when batch 0 starts (t = 0): its
    # replica of expert 0 loads in 5 s, before batch 1 starts at t = 8, so batch 1 takes 6.
    r = simulator.simulate(INFO, [batch(0), batch(1)], 2, "predictive", costs(5.0), slots=1, forecaster=KnownLoads())
    assert r["seconds"] == 8 + 6 and r["prefetch_hit_rate_by_layer"] == [0.5]  # not ready in batch 0, ready in 1
    # Without (nothing queued): batch 1 is planned from batch 0's loads when it starts,
    # and the replica is still loading while it runs.
    r = simulator.simulate(INFO, [batch(0), batch(1)], 2, "predictive", costs(5.0), slots=1, forecaster=KnownLoads(),
                           lookahead=False)
    assert r["seconds"] == 16 and r["prefetch_hit_rate"] == 0.0


def test_gpu_projection_uses_the_measured_costs(tmp_path):
    from moe_bench import projection

    (tmp_path / "costs.json").write_text(json.dumps(dict(group_s=0.5, token_s=1.0, replica_load_s=0.0, device="X")))
    (tmp_path / "hf.json").write_text(json.dumps({"device": "X", "hf_float32_8x128_s": 10.0,
                                                  "hf_float32_8x128_expert_share": 0.4}))
    expert = projection.expert_costs(tmp_path / "costs.json")
    non_expert, source = projection.non_expert_per_batch(tmp_path / "hf.json", 8, 128, 8)
    assert non_expert == pytest.approx(6.0) and "40% in experts" in source
    with pytest.raises(SystemExit):
        projection.non_expert_per_batch(tmp_path / "hf.json", 16, 128, 8)
    p = projection.project(INFO, [batch(0), batch(1)], KnownLoads(), [2], 1, expert, non_expert, window=4,
                           measured_from=0, lookahead=True)
    rows = p["servers"]["2"]
    # off: two layer calls on server 0 with 2 groups: 2 x (2 x 0.5 + 8) = 18 s; end to end + 2 x 6 s.
    assert rows["off"]["expert_layer_s"] == 18 and rows["off"]["end_to_end_s"] == 30
    # predictive whole: the replica of expert 0 planned for batch 1 at t = 0 loads at once,
    # so both batches run expert 0 on server 1 (0.5 + 6) beside expert 2 on server 0 (2.5).
    assert rows["predictive-whole"]["expert_layer_s"] == 6.5 + 6.5
    assert rows["predictive-whole"]["expert_speedup"] == pytest.approx(18 / 13)
    assert any("| 2 |" in line for line in projection.markdown(p))


def test_a_call_cost_is_paid_once_per_server_with_work_and_in_parallel():
    # call_s is the fixed cost of one server's call (a grouped kernel's launches): off puts
    # all 8 tokens on server 0 (8 + 3 per batch); `split` with a replica of expert 0 gives
    # both servers 4 tokens and each pays the call once, side by side: 4 + 3.
    c = simulator.Costs(group_s=0.0, token_s=1.0, layer_overhead_s=0.0, non_expert_s=0.0, replica_load_s=0.0,
                        call_s=3.0)
    assert simulator.simulate(INFO, [batch(0), batch(1)], 2, "off", c, slots=1)["seconds"] == 2 * (8 + 3)
    r = simulator.simulate(INFO, [batch(0), batch(1)], 2, "reactive", c, slots=1, policy="split")
    assert r["seconds"] == (8 + 3) + (4 + 3)


def test_grouped_costs_reproduce_the_one_timing_they_come_from():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import grouped_costs

    anchors = {"layer_grouped_bf16_ms": 0.5, "layer_tokens": 1000, "layer_experts_hit": 10, "device": "X"}
    for split in ("token", "padded"):
        d = grouped_costs.derive(anchors, split)
        assert 10 * d["group_s"] + 1000 * d["token_s"] == pytest.approx(0.5e-3)
        assert split in d["derived"] and d["kernel"] == "grouped"
    assert grouped_costs.derive(anchors, "token")["group_s"] == 0.0
    padded = grouped_costs.derive(anchors, "padded")  # half a 128-row tile per group: 64 rows
    assert padded["group_s"] == pytest.approx(64 * padded["token_s"])
    with pytest.raises(ValueError):
        grouped_costs.derive(anchors, "halves")


def test_no_slots_no_replicas():
    assert run("reactive", slots=0)["seconds"] == 16


def test_calibration_splits_the_measured_run():
    cal = dict(wall_s=10.0, rpc_wall_s=4.0, compute_max_s=3.0, compute_mean_s=2.0, layer_calls=100, rpcs=200)
    one = dict(wall_s=12.0, rpc_wall_s=5.0, compute_max_s=4.4, compute_mean_s=4.4, layer_calls=100, rpcs=100)
    c = simulator.calibrate(cal, 0.001, 0.0001, 0.5, "cpu", one=one, simulated_compute_mean_s=4.0)
    # 10 ms beyond compute per call with 2 RPCs, 6 ms with 1: 4 ms per RPC, 2 ms per call.
    assert c.rpc_overhead_s == pytest.approx(0.004) and c.layer_overhead_s == pytest.approx(0.002)
    assert c.non_expert_s == pytest.approx(6.0)
    # The servers computed half what the microbenchmark costs predict: costs halve.
    assert (c.group_s, c.token_s, c.replica_load_s) == pytest.approx((0.0005, 0.00005, 0.5))
    alone = simulator.calibrate(cal, 0.001, 0.0001, 0.5, "cpu")
    assert alone.rpc_overhead_s == 0 and alone.layer_overhead_s == pytest.approx(0.01) and alone.token_s == 0.0001


def test_a_second_run_in_the_same_work_dir_replays_only_its_own_requests(tmp_path, tiny):
    from moe_bench.cli import record_trace
    from moe_bench.workload import Monolithic, Workload
    from moe_common.traces import read_passes

    w = Workload(batch_size=2, prompt_tokens=8, new_tokens=2, requests=2, warmup=1)
    requests = [[[5, 6, 7, 8, 9, 10, 11, 1]] * 2 for _ in range(3)]
    mono = Monolithic(tiny.path, "cpu")
    for _ in range(2):
        record_trace(mono, tiny, list(enumerate(requests)), w, tmp_path / "bench-trace")
        assert len(simulator.batches_of(list(read_passes(tmp_path / "bench-trace")))) == 3


def test_moe_bench_on_the_tiny_preset(tmp_path, tiny):
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\n## Performance\n<!-- moe-bench:start -->\nold\n<!-- moe-bench:end -->\n\nafter\n")
    out = tmp_path / "bench.json"
    cmd = [sys.executable, "-m", "moe_bench.cli", "--model", "tiny", "--cache-dir", str(tiny.path.parents[1]),
           "--expert-servers", "2", "--requests", "3", "--warmup", "1", "--batch-size", "4", "--prompt-tokens", "32",
           "--new-tokens", "3", "--train-docs", "20", "--simulate-servers", "8", "--json", str(out),
           "--plots", str(tmp_path / "plots"), "--readme", str(readme), "--work-dir", str(tmp_path / "work")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert set(result["modes"]) == {"off", "reactive", "window", "predictive"}
    for r in [result["monolithic"], *result["modes"].values()]:
        assert set(r["tokens_per_s"]) == {"prefill", "decode", "total"} and r["tokens_per_s"]["total"] > 0
        assert 0 < r["p50_ms"] <= r["p99_ms"]
    for name, r in result["modes"].items():
        assert r["identical_to_reference"], name
        assert 0 < r["balancedness"] <= 1 and len(r["busy_share"]) == 2
        assert sum(r["time_split"].values()) == pytest.approx(1.0)
        assert {"weights_moved_bytes", "prefetch_hit_rate"} <= set(r)
    assert result["modes"]["off"]["weights_moved_bytes"] == 0
    assert result["one_server"]["identical_to_reference"]
    assert 0 < result["efficiency"]["efficiency"] and result["efficiency"]["token_s"] > 0
    assert {v["servers"] for v in result["validation"]} == {1, 2}
    assert set(result["simulated"]) == {"8"} and set(result["simulated"]["8"]) == set(result["modes"])
    for name in ("modes.png", "simulated.png"):
        assert (tmp_path / "plots" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert "old" not in text and "| predictive |" in text and text.endswith("after\n")
    # The closed-loop gateways ran under the gateway's default scheduler, and the report says so.
    assert result["serving"]["scheduler"] == "continuous" and "scheduler `continuous`" in text
    assert "](plots/modes.png)" in text
