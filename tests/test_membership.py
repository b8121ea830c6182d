"""Expert servers joining and leaving a running gateway (gateway/membership.py)."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from conftest import HOST, admin_address, channel, expert_servers, gateway, generated_ids
from gateway.launcher import spawn_gateway
from gateway.membership import resolve
from moe_common.placement import home_placement, moved_experts, rebalance_home
from moe_common.serving import pick_free_port
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

ROOT = Path(__file__).resolve().parents[1]


def test_rebalance_home_join_and_leave_exact():
    home = home_placement(2, 8, 2)
    assert home == [[0, 1, 0, 1, 0, 1, 0, 1], [1, 0, 1, 0, 1, 0, 1, 0]]
    joined = rebalance_home(home, keep=[0, 1], num_new=1)
    # Servers 0 and 1 give up their last experts until all hold 2 or 3 per layer.
    assert joined == [[0, 1, 0, 1, 0, 1, 2, 2], [1, 0, 1, 0, 1, 0, 2, 2]]
    assert moved_experts(home, joined, [0, 1]) == 4
    # Old server 0 leaves: old 1 becomes 0, old 2 becomes 1; only old 0's experts move.
    left = rebalance_home(joined, keep=[1, 2], num_new=0)
    assert left == [[0, 0, 1, 0, 1, 0, 1, 1], [0, 0, 0, 1, 0, 1, 1, 1]]
    assert moved_experts(joined, left, [1, 2]) == 6


def test_rebalance_home_is_balanced_and_only_moves_what_it_must():
    rng = random.Random(0)
    for _ in range(500):
        layers, experts = rng.randint(1, 3), rng.randint(1, 20)
        before = rng.randint(1, 6)
        home = [[rng.randrange(before) for _ in range(experts)] for _ in range(layers)]
        keep = sorted(rng.sample(range(before), rng.randint(0, before)))
        rng.shuffle(keep)
        num_new = rng.randint(0 if keep else 1, 3)
        n = len(keep) + num_new
        after = rebalance_home(home, keep, num_new)
        for row_b, row_a in zip(home, after):
            counts = [row_a.count(s) for s in range(n)]
            assert max(counts) - min(counts) <= 1 and sum(counts) == experts
            held_before = [row_b.count(old) for old in keep] + [0] * num_new
            for new, old in enumerate(keep):
                had = {e for e, s in enumerate(row_b) if s == old}
                has = {e for e, s in enumerate(row_a) if s == new}
                # A staying server only gives up experts (it was over its quota) or only gains.
                assert has <= had or had <= has, (row_b, keep, num_new, row_a)
                if has < had and counts[new] < max(counts):
                    # It gave up down to the floor: every ceil quota went to a server that held as many.
                    assert all(held_before[t] >= len(had) for t in range(n) if counts[t] == max(counts))


def test_resolve_discovery_names():
    assert resolve("127.0.0.1:5000") == ["127.0.0.1:5000"]
    assert "127.0.0.1:5001" in resolve("localhost:5001")
    assert resolve("no-such-host.invalid:5000") == []
    with pytest.raises(ValueError):
        resolve("no-port")


def test_join_and_leave_under_load(tmp_path, tiny):
    """A third server joins and one of the first two leaves (SIGTERM, drained) while clients
    send requests: none fails and every output equals the single-process model's."""
    out = tmp_path / "membership.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "membership.py"), "--model", "tiny", "--cache-dir", str(tiny.path.parents[1]),
         "--clients", "3", "--hold-s", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    # Requests were in flight across both changes (how many in all depends on the machine's speed).
    assert result["requests_during_join"] > 0 and result["requests_during_leave"] > 0, result
    assert result["failed"] == 0, result["failures"]
    assert result["identical_to_reference"]
    assert result["leave_exit_code"] == 0
    assert len(result["changes"]) == 2 and len(result["servers_after"]) == 2
    assert result["changes"][0]["experts_moved"] > 0 and result["join_time_to_traffic_s"] > 0
    assert all(n > 0 for n in result["tokens_per_server_after"])
    assert proc.returncode == 0


def _stub(gw):
    """MembershipService of a gateway: on its admin port, never the client port."""
    return gateway_pb2_grpc.MembershipServiceStub(channel(admin_address(gw)))


def test_membership_errors_and_discovery_at_start(tiny):
    with expert_servers(tiny, 1) as (addresses, _):
        # No --expert-servers: the gateway finds its first server through discovery.
        args = ["--expert-discovery", addresses[0], "--join-timeout-s", "1"]
        with gateway(tiny, [], args) as gw:
            stub = _stub(gw)
            cases = [
                (stub.AddExpertServer, addresses[0], grpc.StatusCode.ALREADY_EXISTS, "already a member"),
                (stub.AddExpertServer, f"{HOST}:{pick_free_port()}", grpc.StatusCode.UNAVAILABLE, "not SERVING"),
                (stub.AddExpertServer, "nonsense", grpc.StatusCode.INVALID_ARGUMENT, "host:port"),
                (stub.RemoveExpertServer, f"{HOST}:1", grpc.StatusCode.NOT_FOUND, "not a member"),
                (stub.RemoveExpertServer, addresses[0], grpc.StatusCode.FAILED_PRECONDITION, "last member"),
            ]
            for call, address, code, words in cases:
                request = (gateway_pb2.AddExpertServerRequest if call == stub.AddExpertServer
                           else gateway_pb2.RemoveExpertServerRequest)(address=address)
                with pytest.raises(grpc.RpcError) as err:
                    call(request, timeout=30)
                assert err.value.code() == code and words in err.value.details(), err.value.details()
            status = gateway_pb2_grpc.GatewayServiceStub(channel(gw)).GetStatus(gateway_pb2.GetStatusRequest())
            assert [s.address for s in status.servers] == addresses and status.healthy


def test_dead_server_is_evicted_and_serving_resumes(tiny, reference):
    """Failover: a killed server's experts move to the survivors; outputs stay exact."""
    model, tokenizer = reference
    prompt = "Failover keeps the model whole."
    want = generated_ids(model, model.generate(**tokenizer([prompt], return_tensors="pt"), max_new_tokens=6,
                                               do_sample=False))[0]
    with expert_servers(tiny, 2) as (addresses, procs):
        with gateway(tiny, addresses, ["--evict-after-s", "1", "--membership-interval-s", "0.2"]) as gw:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel(gw))
            request = gateway_pb2.GenerateRequest(prompts=[prompt], parameters=gateway_pb2.GenerationParameters(max_new_tokens=6))
            assert list(stub.Generate(request).generations[0].token_ids) == want
            procs[1].send_signal(signal.SIGKILL)
            procs[1].wait()
            deadline = time.monotonic() + 60
            while len(stub.GetStatus(gateway_pb2.GetStatusRequest()).servers) != 1:
                assert time.monotonic() < deadline, "the dead server was not evicted"
                time.sleep(0.1)
            assert list(stub.Generate(request).generations[0].token_ids) == want
            status = stub.GetStatus(gateway_pb2.GetStatusRequest())
            assert status.healthy and [s.address for s in status.servers] == addresses[:1]
            # Every expert of the dead server (half of them) moved to the survivor.
            assert status.membership_changes[-1].experts_moved == len(status.placement) * status.num_experts // 2


def _variant(tiny, directory: Path, change) -> Path:
    """A copy of the tiny checkpoint, saved through HF's own code, with `change(name,
    tensor)` applied to every parameter (in place)."""
    import torch
    from transformers import AutoTokenizer, SwitchTransformersForConditionalGeneration

    model = SwitchTransformersForConditionalGeneration.from_pretrained(tiny.path)
    with torch.no_grad():
        for name, tensor in model.named_parameters():
            change(name, tensor)
    model.save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny.path).save_pretrained(directory)
    return directory


def test_gateway_refuses_expert_servers_of_another_checkpoint(tiny, tmp_path):
    """Another fine-tune (other routers) is refused with FAILED_PRECONDITION at start and
    at join. One that differs only in expert weights has the same identity today: the
    identity covers config.json and the routers, not the experts (README, Scaling)."""
    from moe_common.model_source import ModelSource, model_identity

    def other_routers(name, tensor):
        if name.endswith("router.classifier.weight"):
            tensor.add_(0.5)

    def other_experts(name, tensor):
        if ".experts." in name:
            tensor.mul_(2.0)

    other = _variant(tiny, tmp_path / "other-routers", other_routers)
    assert model_identity(other) != tiny.model_id
    assert model_identity(_variant(tiny, tmp_path / "other-experts", other_experts)) == tiny.model_id

    with expert_servers(ModelSource(str(other), other, model_identity(other)), 1) as (foreign, _):
        # At start: the gateway exits and says why.
        log_path = tmp_path / "gateway.log"
        with log_path.open("w") as log_file:
            proc = spawn_gateway(tiny.path, HOST, pick_free_port(HOST), foreign, log_file=log_file)
        try:
            assert proc.wait(timeout=120) != 0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert "serves model" in log_path.read_text(), log_path.read_text()[-2000:]

        # At join: refused, and the gateway serves on with its own servers.
        with expert_servers(tiny, 1) as (own, _), gateway(tiny, own) as gw:
            with pytest.raises(grpc.RpcError) as err:
                _stub(gw).AddExpertServer(gateway_pb2.AddExpertServerRequest(address=foreign[0]), timeout=60)
            assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and "serves model" in err.value.details()
            status = gateway_pb2_grpc.GatewayServiceStub(channel(gw)).GetStatus(gateway_pb2.GetStatusRequest())
            assert [s.address for s in status.servers] == own and status.healthy
