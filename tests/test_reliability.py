"""Riding through an expert server crash (benchmarks/crash.py on the tiny preset): no
request fails and every output equals the single-process model's, whether the dead
server comes back on its address, is evicted, is restarted by moe-serve, or its experts
have standby replicas (--redundancy 2)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

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
