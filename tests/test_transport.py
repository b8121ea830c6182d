"""The same-host transport: hidden states through shared memory (moe_common/shm.py,
gateway/transport.py) give the same outputs as bytes in the message, under concurrent
layer calls, a server restart and a server that cannot map the gateway's memory."""

from __future__ import annotations

import concurrent.futures
import os
import signal

import grpc
import pytest
import torch

from gateway.dispatch import ExpertClients
from gateway.transport import SegmentPool, Transport
from moe_common import placement, shm
from moe_common.errors import FailedPrecondition, InvalidArgument
from moe_protos.moe.expert.v1 import expert_pb2, expert_pb2_grpc
from tests.conftest import channel, expert_servers, restart_expert_server

D_TINY = 64  # d_model of the tiny preset
pytestmark = pytest.mark.skipif(not shm.available(), reason="this host has no /dev/shm")


# ---- segments and the pool, no processes ----

def test_segment_is_shared_between_mappings_and_checks_regions():
    owner = shm.Segment.create(shm.unique_name("test"), 4096)
    try:
        rows = owner.tensor(0, torch.float32, (4, 8))
        rows.copy_(torch.arange(32, dtype=torch.float32).view(4, 8))
        other = shm.Segment.open(owner.name)
        assert torch.equal(other.tensor(0, torch.float32, (4, 8)), rows)
        other.tensor(64, torch.float32, (2, 8)).fill_(-1)  # a write through one mapping...
        assert rows[2:].eq(-1).all()  # ...shows in the other
        with pytest.raises(InvalidArgument, match="does not fit"):
            other.tensor(4000, torch.float32, (4, 8))
        with pytest.raises(InvalidArgument, match="aligned"):
            other.tensor(2, torch.float32, (1, 8))
    finally:
        owner.unlink()
    for bad in ("../etc/passwd", "x", "moe-a/b", "moe-" + "a" * 300):
        with pytest.raises(InvalidArgument):
            shm.Segment.open(bad)
    with pytest.raises(FailedPrecondition, match=shm.UNREACHABLE):
        shm.Segment.open(owner.name)  # unlinked: as if on another host


def test_pool_reuses_segments_and_never_reuses_a_failed_call_s():
    pool = SegmentPool(max_free=2)
    try:
        a = pool.acquire(1000)
        assert a.size == 1 << 20  # at least 1 MiB
        b = pool.acquire(3 << 20)
        assert b.size == 4 << 20  # next power of two
        pool.release(a)
        assert pool.acquire(10) is a
        pool.release(a)
        assert pool.acquire(2 << 20) is not a  # too small: a new one
        pool.discard(b)
        assert not (shm.SHM_DIR / b.name).exists()
        assert pool.created == 3
        for _ in range(4):
            pool.release(pool.acquire(1 << 20))
    finally:
        pool.close()
    assert not list(shm.SHM_DIR.glob(shm.process_prefix() + "rows-*"))


def test_orphaned_segments_of_dead_gateways_are_removed():
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    orphan = shm.SHM_DIR / f"{shm.process_prefix(dead)}rows-test"
    orphan.write_bytes(b"x")
    mine = shm.Segment.create(shm.unique_name("test"), 16)
    try:
        assert orphan.name in shm.remove_orphans()
        assert not orphan.exists() and (shm.SHM_DIR / mine.name).exists()
    finally:
        mine.unlink()


# ---- against a real expert server ----

def _info(address):
    with channel(address) as ch:
        return expert_pb2_grpc.ExpertServiceStub(ch).GetInfo(expert_pb2.GetInfoRequest(), timeout=10)


def _clients(tiny, addresses, transport):
    """ExpertClients over `addresses` with the default home placement assigned."""
    info = _info(addresses[0])
    home = placement.home_placement(info.num_sparse_layers, info.num_experts, len(addresses))
    clients = ExpertClients(addresses, home, info.model_id, transport=transport, timeout_s=20)
    clients.assign_home_experts()
    return clients


def _layer_call(seed: int, num_experts: int, d_model: int, tokens: int = 40):
    """A random layer call: hidden [tokens, d_model] and [(expert, ascending token indices)]."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, d_model, generator=g)
    experts = torch.randint(0, num_experts, (tokens,), generator=g)
    lists = [(e, (experts == e).nonzero().flatten()) for e in range(num_experts) if (experts == e).any()]
    return hidden, lists


def _run(clients, layer, call):
    hidden, lists = call
    return clients.run_layer(layer, hidden, lists)


def test_shared_memory_equals_bytes_under_concurrency_and_a_restart(tiny, tmp_path):
    with expert_servers(tiny, 2) as (addresses, procs):
        shm_clients = _clients(tiny, addresses, "shm")
        grpc_clients = _clients(tiny, addresses, "grpc")
        try:
            d_model, num_experts = _info(addresses[0]).d_model, len(shm_clients.home[0])
            calls = [(i % len(shm_clients.home), _layer_call(i, num_experts, d_model, 8 + 13 * i)) for i in range(24)]
            want = [_run(grpc_clients, layer, call) for layer, call in calls]
            got = [_run(shm_clients, layer, call) for layer, call in calls]
            for w, g in zip(want, got):
                assert w.keys() == g.keys() and all(torch.equal(w[e], g[e]) for e in w)
            assert [shm_clients.transport.kind(a) for a in addresses] == ["shm", "shm"]
            assert shm_clients.stats.bytes_sent == 0 and grpc_clients.stats.bytes_sent > 0

            # Many layer calls at once: each takes its own segment, none sees another's rows.
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                futures = [pool.submit(_run, shm_clients, layer, call) for layer, call in calls * 3]
                for i, future in enumerate(futures):
                    w, g = want[i % len(calls)], future.result()
                    assert all(torch.equal(w[e], g[e]) for e in w)

            # A server killed and started again on its address opens the segments anew.
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            procs[0] = restart_expert_server(tiny, addresses[0], tmp_path)
            for (layer, call), w in zip(calls, want):
                g = _run(shm_clients, layer, call)
                assert all(torch.equal(w[e], g[e]) for e in w)
            assert shm_clients.transport.kind(addresses[0]) == "shm"
        finally:
            shm_clients.close()
            grpc_clients.close()
    assert not list(shm.SHM_DIR.glob(shm.process_prefix() + "*")), "closing the clients unlinks every segment"


def test_a_server_that_cannot_map_our_memory_gets_bytes_or_a_clear_error(tiny):
    with expert_servers(tiny, 1, ["--no-shared-memory"]) as (addresses, _):
        auto = _clients(tiny, addresses, "auto")
        try:
            call = _layer_call(1, len(auto.home[0]), _info(addresses[0]).d_model)
            out = _run(auto, 0, call)
            assert auto.transport.kind(addresses[0]) == "grpc" and auto.stats.bytes_sent > 0
            assert sum(len(v) for v in out.values()) == 40
        finally:
            auto.close()
        forced = _clients(tiny, addresses, "shm")
        try:
            with pytest.raises(FailedPrecondition, match="cannot map this gateway's shared memory"):
                _run(forced, 0, call)
        finally:
            forced.close()


def test_bad_shared_regions_are_refused_and_the_server_serves_on(tiny):
    with expert_servers(tiny, 1, ["--experts", "all"]) as (addresses, _), channel(addresses[0]) as ch:
        stub = expert_pb2_grpc.ExpertServiceStub(ch)
        segment = shm.Segment.create(shm.unique_name("test"), 4096)
        try:
            def call(name=segment.name, offset=0, rows=4, data=b""):
                return stub.RunExperts(expert_pb2.RunExpertsRequest(
                    layer=0, groups=[expert_pb2.ExpertGroup(expert=0, num_tokens=rows)],
                    hidden_states=expert_pb2.Tensor(dtype=expert_pb2.DTYPE_FLOAT32, shape=[rows, D_TINY], data=data),
                    shared=expert_pb2.SharedRegion(segment=name, offset=offset)), timeout=10)

            cases = [
                (dict(name="../../etc/passwd"), grpc.StatusCode.INVALID_ARGUMENT, "not a name"),
                (dict(name="moe-gw-0-missing"), grpc.StatusCode.FAILED_PRECONDITION, shm.UNREACHABLE),
                (dict(offset=4000), grpc.StatusCode.INVALID_ARGUMENT, "does not fit"),
                (dict(rows=100), grpc.StatusCode.INVALID_ARGUMENT, "does not fit"),
                (dict(data=b"\0" * 4 * 4 * D_TINY), grpc.StatusCode.INVALID_ARGUMENT, "must not carry data"),
            ]
            for kwargs, code, words in cases:
                with pytest.raises(grpc.RpcError) as err:
                    call(**kwargs)
                assert err.value.code() == code and words in err.value.details(), (kwargs, err.value.details())
            segment.tensor(0, torch.float32, (4, D_TINY)).normal_()
            reply = call()  # and a good call still works
            assert reply.outputs_shared and not reply.outputs.data and list(reply.outputs.shape) == [4, D_TINY]
            attach = stub.AttachSharedMemory(expert_pb2.AttachSharedMemoryRequest(segment=segment.name, nonce=b"wrong"))
            assert not attach.attached and "nonce" in attach.reason
        finally:
            segment.unlink()


def test_transport_mode_is_validated():
    with pytest.raises(ValueError, match="transport must be one of"):
        Transport("tcp")
