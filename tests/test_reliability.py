"""Riding through an expert server crash (benchmarks/crash.py on the tiny preset): no
request fails and every output equals the single-process model's, whether the dead
server comes back on its address, is evicted, is restarted by moe-serve, or its experts
have standby replicas (--redundancy 2)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import HOST, channel, expert_servers, generated_ids, stop
from gateway.launcher import spawn_gateway, wait_ready
from moe_common.serving import pick_free_port
from moe_protos.moe.expert.v1 import expert_pb2, expert_pb2_grpc
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def crash(tmp_path, tiny, *args) -> dict:
    out = tmp_path / "crash.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "crash.py"), "--model", "tiny", "--cache-dir", str(tiny.path.parents[1]),
         "--servers", "3", "--clients", "4", "--hold-s", "2", "--max-new-tokens", "6", "--json", str(out), *args],
        capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["requests"] > 20 and result["in_flight_at_kill"] > 0
    assert result["failed"] == 0, result["failures"]
    assert result["identical_to_reference"]
    assert proc.returncode == 0
    return result


@pytest.mark.parametrize("case", ["restarted", "evicted", "moe-serve", "redundancy"])
def test_a_killed_expert_server_costs_no_request(tmp_path, tiny, case):
    if case == "restarted":
        r = crash(tmp_path, tiny, "--restart-after-s", "0.5", "--after-s", "3")
        # It serves its own experts again once it answers health checks.
        assert r["tokens_per_server_after"][r["servers_after"].index(r["victim"])] > r["tokens_per_server_at_kill"][r["victim"]]
        assert r["membership_changes"] == 0
    elif case == "evicted":
        r = crash(tmp_path, tiny, "--evict-after-s", "1", "--after-s", "4")
        assert r["victim"] not in r["servers_after"] and r["membership_changes"] == 1
    elif case == "moe-serve":
        r = crash(tmp_path, tiny, "--under", "moe-serve", "--after-s", "8")
        assert r["servers_after"] == list(r["tokens_per_server_at_kill"])  # restarted on its address
    else:
        # Every expert on 2 servers: the survivors' standby replicas take over, nothing is loaded.
        r = crash(tmp_path, tiny, "--redundancy", "2", "--replica-memory", "4MB", "--after-s", "3")
        assert r["suspects"] >= 1 and r["stand_in_loads"] == 0 and r["membership_changes"] == 0


def test_a_restarted_gateway_adopts_the_experts_servers_hold(tiny, reference, tmp_path):
    """A new gateway over servers that already hold their home experts and standby
    replicas loads nothing, and answers exactly as the first one did."""

    model, tokenizer = reference
    want = generated_ids(model, model.generate(**tokenizer(["adopt me"], return_tensors="pt"), max_new_tokens=5,
                                               do_sample=False))[0]
    request = gateway_pb2.GenerateRequest(prompts=["adopt me"], parameters=gateway_pb2.GenerationParameters(max_new_tokens=5))

    def held(addresses):
        out = []
        for a in addresses:
            with channel(a) as ch:
                info = expert_pb2_grpc.ExpertServiceStub(ch).GetInfo(expert_pb2.GetInfoRequest())
            out.append((sorted((r.layer, r.expert) for r in info.experts), info.weight_bytes))
        return out

    with expert_servers(tiny, 2, ["--replica-memory", "4MB"]) as (addresses, _):
        logs = []
        for run in range(2):
            port = pick_free_port(HOST)
            log_path = tmp_path / f"gateway-{run}.log"
            with log_path.open("w") as log_file:
                proc = spawn_gateway(tiny.path, HOST, port, addresses, ["--redundancy", "2"], log_file=log_file)
            try:
                wait_ready(proc, f"{HOST}:{port}", 120)
                with channel(f"{HOST}:{port}") as ch:
                    stub = gateway_pb2_grpc.GatewayServiceStub(ch)
                    st = stub.GetStatus(gateway_pb2.GetStatusRequest())
                    experts = len(st.placement) * st.num_experts
                    deadline = time.monotonic() + 60  # standbys load beside serving: one per logical expert
                    while stub.GetStatus(gateway_pb2.GetStatusRequest()).replication.replicas_ready < experts:
                        assert time.monotonic() < deadline, "the standby replicas did not become ready"
                        time.sleep(0.1)
                    assert list(stub.Generate(request).generations[0].token_ids) == want
                    moved = stub.GetStatus(gateway_pb2.GetStatusRequest()).replication.bytes_moved
                    assert (moved > 0) if run == 0 else (moved == 0)  # the second gateway loads no replica
                if run == 0:
                    before = held(addresses)
            finally:
                stop(proc)
            logs.append(log_path.read_text())
        assert held(addresses) == before  # the same experts and replicas, nothing reloaded or dropped
        assert f"{experts} loaded, 0 adopted" in logs[0], logs[0][-2000:]
        assert f"0 loaded, {experts} adopted" in logs[1], logs[1][-2000:]
