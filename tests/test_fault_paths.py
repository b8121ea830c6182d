"""Regression tests of the fault paths of the gateway and expert servers: each test
reproduces one bug found in review (issue 17) with real processes on loopback, or, where
a race needs a forced interleaving, with a hook injected into the real gateway code."""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import HOST, channel, expert_servers, gateway, generated_ids, restart_expert_server, stop
from gateway.config import GatewayConfig
from gateway.engine import Engine, Sampling
from gateway.launcher import spawn_expert_server, spawn_gateway, wait_ready
from gateway.membership import Membership, to_evict
from moe_common.serving import pick_free_port
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

PROMPT = "Faults must not cost requests."


def want_ids(reference, prompt: str = PROMPT, new_tokens: int = 6) -> list[int]:
    model, tokenizer = reference
    out = model.generate(**tokenizer([prompt], return_tensors="pt"), max_new_tokens=new_tokens, do_sample=False)
    return generated_ids(model, out)[0]


def generate(stub, prompt: str = PROMPT, new_tokens: int = 6, timeout: float | None = 60) -> list[int]:
    request = gateway_pb2.GenerateRequest(prompts=[prompt],
                                          parameters=gateway_pb2.GenerationParameters(max_new_tokens=new_tokens))
    return list(stub.Generate(request, timeout=timeout).generations[0].token_ids)


def status(stub) -> gateway_pb2.GetStatusResponse:
    return stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=30)


# ---- 1. requests cancelled while queued must not keep their handler thread ----

def test_requests_whose_deadline_passes_in_the_queue_release_their_handler_threads(tiny):
    """200 requests whose deadline passes while they wait behind long ones: every handler
    returns (requests_total counts each finished handler), health answers throughout,
    and the gateway stops promptly on SIGTERM."""
    workers, clients, storm = 12, 8, 200
    with expert_servers(tiny, 1) as (addresses, _):
        port = pick_free_port(HOST)
        proc = spawn_gateway(tiny.path, HOST, port, addresses, ["--max-workers", str(workers), "--max-batch-size", "1"])
        address = f"{HOST}:{port}"
        try:
            wait_ready(proc, address, 120)
            ch = channel(address)
            stub, health = gateway_pb2_grpc.GatewayServiceStub(ch), health_pb2_grpc.HealthStub(ch)
            done = threading.Event()
            health_ms, health_failures, long_done = [], [], []

            def keep_busy():  # long requests back to back: the short ones always queue behind one
                while not done.is_set():
                    generate(stub, "keep the batcher busy with a long answer", new_tokens=40, timeout=120)
                    long_done.append(1)

            def probe_health():
                while not done.wait(0.05):
                    t0 = time.monotonic()
                    try:
                        health.Check(health_pb2.HealthCheckRequest(), timeout=2.0)
                        health_ms.append((time.monotonic() - t0) * 1e3)
                    except grpc.RpcError as err:
                        health_failures.append(err.code())

            def short(_):
                try:
                    generate(stub, "no time to wait", new_tokens=4, timeout=0.15)
                    return "ok"
                except grpc.RpcError as err:
                    return err.code()

            busy = threading.Thread(target=keep_busy)
            prober = threading.Thread(target=probe_health)
            busy.start()
            prober.start()
            with ThreadPoolExecutor(clients) as pool:
                codes = list(pool.map(short, range(storm)))
            done.set()
            busy.join()
            prober.join()
            assert codes.count(grpc.StatusCode.DEADLINE_EXCEEDED) > storm // 2, codes
            assert not health_failures, f"health checks failed during the storm: {health_failures}"
            # Every handler finished: the short ones, the long ones and nothing left waiting.
            sent = storm + len(long_done)
            deadline = time.monotonic() + 10
            while status(stub).requests_total < sent:
                assert time.monotonic() < deadline, \
                    f"{sent - status(stub).requests_total} handler threads still blocked after the storm"
                time.sleep(0.1)
            assert status(stub).requests_total == sent
            # All handler threads are free again: `workers - 1` long requests and a health check at once.
            with ThreadPoolExecutor(workers - 1) as pool:
                results = [pool.submit(generate, stub, "after the storm", 4, 60) for _ in range(workers - 1)]
                t0 = time.monotonic()
                health.Check(health_pb2.HealthCheckRequest(), timeout=5.0)
                busy_ms = (time.monotonic() - t0) * 1e3
                assert all(r.result() for r in results)
            print(f"health during the storm: max {max(health_ms):.1f} ms over {len(health_ms)} checks; "
                  f"with {workers - 1} requests in flight {busy_ms:.1f} ms")
            ch.close()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=15) == 0, "the gateway did not stop on SIGTERM"
        finally:
            stop(proc)


# ---- 2. several dead servers are evicted together ----

def test_evict_together_exact():
    since = {"a:1": 0.0, "b:1": 4.0, "c:1": 9.5}
    assert to_evict(since, now=9.9, evict_after_s=10, confirm_s=1) == []  # nobody is due yet
    # a is due; b has missed checks for 6 s and goes with it; c missed one check only.
    assert to_evict(since, now=10.0, evict_after_s=10, confirm_s=1) == ["a:1", "b:1"]
    assert to_evict(since, now=10.5, evict_after_s=10, confirm_s=1) == ["a:1", "b:1", "c:1"]
    assert to_evict({}, now=100, evict_after_s=10, confirm_s=1) == []
    assert to_evict({"a:1": 5.0}, now=5.0, evict_after_s=0, confirm_s=1) == ["a:1"]


def test_two_servers_killed_at_once_are_evicted_and_serving_resumes(tiny, reference):
    want = want_ids(reference)
    evict_after = 1.0
    with expert_servers(tiny, 3) as (addresses, procs):
        args = ["--evict-after-s", str(evict_after), "--membership-interval-s", "0.2"]
        with gateway(tiny, addresses, args) as gw:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel(gw))
            assert generate(stub) == want
            for p in procs[1:]:
                p.send_signal(signal.SIGKILL)
            killed = time.monotonic()
            for p in procs[1:]:
                p.wait()
            while len(status(stub).servers) != 1:
                assert time.monotonic() - killed < evict_after + 2, "the dead servers were not evicted in time"
                time.sleep(0.05)
            evicted_s = time.monotonic() - killed
            assert generate(stub) == want
            st = status(stub)
            assert st.healthy and [s.address for s in st.servers] == addresses[:1]
            assert st.membership_changes_total == 1  # both in one change
            print(f"two dead servers evicted {evicted_s:.2f} s after the kill (evict-after {evict_after} s)")


# ---- 3. a draining server stays until its experts are loaded elsewhere ----

def test_draining_server_waits_while_its_experts_load_elsewhere(tiny, reference, tmp_path):
    """The survivor takes 1.5 s to load the leaving server's experts; the leaving server
    would stop after 0.5 s without calls. It must stay until it is told it holds nothing.
    (Nothing else calls it meanwhile: GetStatus would, so the test does not ask for it.)"""
    want = want_ids(reference)
    ports = [pick_free_port(HOST), pick_free_port(HOST)]
    addresses = [f"{HOST}:{p}" for p in ports]
    leaving_log = tmp_path / "leaving.log"
    with leaving_log.open("w") as log_file:
        procs = [spawn_expert_server(tiny.path, HOST, ports[0], ["--simulate-load-delay-s", "1.5"]),
                 spawn_expert_server(tiny.path, HOST, ports[1], ["--drain-quiet-s", "0.5"], log_file=log_file)]
    try:
        for p, a in zip(procs, addresses):
            wait_ready(p, a, 120)
        with gateway(tiny, addresses, ["--membership-interval-s", "0.2"]) as gw:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel(gw))
            assert generate(stub) == want
            procs[1].send_signal(signal.SIGTERM)
            assert procs[1].wait(timeout=60) == 0
            assert "no gateway is using this server" not in leaving_log.read_text(), \
                "the leaving server stopped for want of calls while its experts were still moving"
            assert generate(stub) == want
            st = status(stub)
            assert [s.address for s in st.servers] == addresses[:1] and len(st.membership_changes) == 1
    finally:
        for p in procs:
            stop(p)


# ---- 4. every restarted server is re-assigned, not just the first ----

def test_all_restarted_servers_get_their_experts_back(tiny, reference, tmp_path):
    want = want_ids(reference)
    with expert_servers(tiny, 2) as (addresses, procs):
        with gateway(tiny, addresses, ["--evict-after-s", "120"]) as gw:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel(gw))
            assert generate(stub) == want
            for p in procs:
                p.send_signal(signal.SIGKILL)
                p.wait()
            for i, address in enumerate(addresses):
                procs[i] = restart_expert_server(tiny, address, tmp_path)
            assert generate(stub) == want  # both came back empty: both are re-assigned


# ---- 5. a replica plan made on a view that changes meanwhile ----

@pytest.fixture
def replica_servers(tiny):
    with expert_servers(tiny, 2, ["--replica-memory", "4MB"]) as (addresses, procs):
        yield addresses, procs


def test_replica_plan_racing_a_membership_change_does_not_fail_the_batch(tiny, reference, replica_servers):
    """The plan is held (injected planner) until a removal ran as far as it can; the batch
    must still succeed and equal the single-process model."""
    addresses, _ = replica_servers
    want = want_ids(reference)
    engine = Engine(GatewayConfig(model=str(tiny.path), expert_servers=addresses, replication="reactive",
                                  replica_sharing="off"))
    membership = Membership(engine)
    try:
        engine.connect()
        membership.start()
        prompt = engine.prompt_ids([PROMPT], [])
        assert engine.generate_batch(prompt, [6], Sampling())[0].token_ids == want  # history to plan from
        real_planner = engine.replicas.planner
        removal = {}

        def planner(*args, **kwargs):
            if not removal:
                removal["thread"] = threading.Thread(target=lambda: membership.remove(addresses[1]))
                removal["thread"].start()
                removal["thread"].join(timeout=3)  # until it finished, or waits for this plan to be sent
            return real_planner(*args, **kwargs)

        engine.replicas.planner = planner
        assert engine.generate_batch(prompt, [6], Sampling())[0].token_ids == want
        removal["thread"].join(timeout=60)
        assert engine.clients.addresses == addresses[:1]
        assert engine.generate_batch(prompt, [6], Sampling())[0].token_ids == want
    finally:
        membership.stop()
        engine.close()


# ---- 6. replicas whose SetReplicas failed are sent again ----

def test_failed_replica_calls_are_sent_again(tiny, reference):
    """The first SetReplicas times out (the server loads for 3 s, the call waits 2 s); the
    plan stays the same batch after batch, and its replicas must still become ready."""
    want = want_ids(reference)
    with expert_servers(tiny, 2, ["--replica-memory", "4MB", "--simulate-load-delay-s", "3"]) as (addresses, _):
        # SetReplicas waits 10 x --expert-timeout-s.
        engine = Engine(GatewayConfig(model=str(tiny.path), expert_servers=addresses, replication="reactive",
                                      replica_sharing="off",
                                      expert_timeout_s=0.2))
        try:
            engine.connect()
            prompt = engine.prompt_ids([PROMPT], [])
            deadline = time.monotonic() + 60
            while engine.replicas.status()["replicas_ready"] == 0:
                assert time.monotonic() < deadline, f"replicas never became ready: {engine.replicas.status()}"
                assert engine.generate_batch(prompt, [6], Sampling())[0].token_ids == want
                time.sleep(0.2)
            st = engine.replicas.status()
            assert st["failures"] >= 1, "the first SetReplicas was meant to time out"
            assert st["replicas_ready"] == st["replicas_planned"] > 0
        finally:
            engine.close()


# ---- 7. a join during the gateway's start-up is applied, not lost ----

def test_join_during_gateway_startup_is_kept(tiny, reference):
    want = want_ids(reference)
    with expert_servers(tiny, 1) as (joining, _):
        first_port = pick_free_port(HOST)
        first = f"{HOST}:{first_port}"
        port, admin_port = pick_free_port(HOST), pick_free_port(HOST)
        # Its first server is not up yet. Joins go to the admin port (the client port has no MembershipService).
        gw_proc = spawn_gateway(tiny.path, HOST, port, [first], ["--admin-port", str(admin_port)])
        gw = f"{HOST}:{port}"
        first_proc = None
        try:
            ch = channel(gw)
            health = health_pb2_grpc.HealthStub(ch)
            deadline = time.monotonic() + 120
            while True:  # bound and answering NOT_SERVING: it waits for its first server
                try:
                    health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    break
                except grpc.RpcError:
                    assert gw_proc.poll() is None and time.monotonic() < deadline
                    time.sleep(0.1)
            joined = gateway_pb2_grpc.MembershipServiceStub(channel(f"{HOST}:{admin_port}")).AddExpertServer.future(
                gateway_pb2.AddExpertServerRequest(address=joining[0]), timeout=300)
            first_proc = spawn_expert_server(tiny.path, HOST, first_port)
            wait_ready(first_proc, first, 120)
            wait_ready(gw_proc, gw, 120)
            assert joined.result().servers == [first, joining[0]]
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)
            assert [s.address for s in status(stub).servers] == [first, joining[0]]
            assert generate(stub) == want
            assert all(s.tokens > 0 for s in status(stub).servers)
        finally:
            stop(gw_proc)
            if first_proc is not None:
                stop(first_proc)


def test_status_keeps_only_recent_changes_and_members(tiny):
    """Bounded state: GetStatus lists at most the last CHANGES_KEPT changes; per-server
    figures and channels are kept for members only."""
    from gateway.membership import CHANGES_KEPT

    with expert_servers(tiny, 2) as (addresses, _):
        engine = Engine(GatewayConfig(model=str(tiny.path), expert_servers=addresses))
        membership = Membership(engine)
        try:
            engine.connect()
            membership.start()
            prompt = engine.prompt_ids([PROMPT], [])
            engine.generate_batch(prompt, [2], Sampling())
            for _ in range(CHANGES_KEPT // 2 + 1):
                membership.remove(addresses[1])
                membership.add(addresses[1])
            assert membership.changes_total == 2 * (CHANGES_KEPT // 2 + 1)
            assert len(membership.changes) == CHANGES_KEPT
            membership.remove(addresses[1])
            assert set(engine.clients.stats.tokens_by_server) <= {addresses[0]}
            assert not engine.clients.connections.is_open(addresses[1])
            engine.clients.info(addresses[1])  # a non-member's info opens no lasting channel
            assert not engine.clients.connections.is_open(addresses[1])
        finally:
            membership.stop()
            engine.close()
