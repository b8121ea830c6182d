"""The local lane (moe_common/lane.py): same-host RunExperts over a Unix socket. It must
give exactly what gRPC gives, refuse callers without the token, map errors to the same
status codes, and fail like gRPC when the server stops answering."""

from __future__ import annotations

import signal

import grpc
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.lane import Lane
from moe_common import lane, shm
from moe_protos.moe.expert.v1 import expert_pb2, expert_pb2_grpc
from tests.conftest import channel, expert_servers
from tests.test_transport import D_TINY, _clients, _info, _layer_call, _run

pytestmark = pytest.mark.skipif(not (shm.available() and lane.available()), reason="needs /dev/shm and Unix sockets")


# ---- messages, no processes ----

def test_messages_round_trip_and_malformed_ones_are_refused():
    message = lane.encode_request(b"\x08\x01", "req-1,req-2", "7")
    assert lane.decode_request(message) == (b"\x08\x01", "req-1,req-2", "7")
    assert lane.decode_request(lane.encode_request(b"")) == (b"", "", "")
    with pytest.raises(ValueError, match="shorter than its header"):
        lane.decode_request(b"\x01")
    with pytest.raises(ValueError, match="run past its end"):
        lane.decode_request(b"\x05\x00\x00\x00ab")
    assert lane.decode_reply(lane.encode_reply(grpc.StatusCode.OK, b"xy")) == (grpc.StatusCode.OK, b"xy")
    assert lane.decode_reply(lane.encode_reply(grpc.StatusCode.NOT_FOUND, b"gone"))[0] == grpc.StatusCode.NOT_FOUND
    assert lane.decode_reply(b"\xfe")[0] == grpc.StatusCode.UNKNOWN
    with pytest.raises(ValueError):
        lane.decode_reply(b"")


# ---- against a real expert server ----

def _attach(stub):
    """(AttachSharedMemoryResponse, its segment): the lane's name and token, as a gateway gets them."""
    segment = shm.Segment.create(shm.unique_name("test"), 4096)
    segment.buf[:4] = b"abcd"
    reply = stub.AttachSharedMemory(expert_pb2.AttachSharedMemoryRequest(segment=segment.name, nonce=b"abcd"),
                                    timeout=10)
    return reply, segment


def _request(segment, rows=4, layer=0, model_id=""):
    return expert_pb2.RunExpertsRequest(
        layer=layer, groups=[expert_pb2.ExpertGroup(expert=0, num_tokens=rows)], model_id=model_id,
        hidden_states=expert_pb2.Tensor(dtype=expert_pb2.DTYPE_FLOAT32, shape=[rows, D_TINY]),
        shared=expert_pb2.SharedRegion(segment=segment.name, offset=0))


def test_a_lane_call_equals_the_grpc_call_and_errors_keep_their_codes(tiny):
    with expert_servers(tiny, 1, ["--experts", "all"]) as (addresses, _), channel(addresses[0]) as ch:
        stub = expert_pb2_grpc.ExpertServiceStub(ch)
        reply, segment = _attach(stub)
        try:
            assert reply.attached and reply.lane.startswith("moe-lane-") and len(reply.lane_token) == lane.TOKEN_BYTES
            rows = segment.tensor(0, torch.float32, (4, D_TINY))
            inputs = torch.randn(4, D_TINY)
            rows.copy_(inputs)
            stub.RunExperts(_request(segment), timeout=10)
            over_grpc = rows.clone()
            rows.copy_(inputs)
            client = Lane(reply.lane, reply.lane_token)
            try:
                got = client.start(_request(segment), 10, (("x-request-id", "r1"),)).result()
                assert got.outputs_shared and list(got.outputs.shape) == [4, D_TINY]
                assert torch.equal(rows, over_grpc) and not torch.equal(rows, inputs)
                # The server's errors arrive with gRPC's codes and details, and the lane serves on.
                cases = [
                    (_request(segment, rows=100), grpc.StatusCode.INVALID_ARGUMENT, "does not fit"),
                    (_request(segment, layer=99), grpc.StatusCode.INVALID_ARGUMENT, "layer"),
                    (_request(segment, model_id="another-model"), grpc.StatusCode.FAILED_PRECONDITION, "model"),
                ]
                for request, code, words in cases:
                    with pytest.raises(grpc.RpcError) as err:
                        client.start(request, 10).result()
                    assert err.value.code() == code and words in err.value.details(), err.value.details()
                    with pytest.raises(grpc.RpcError) as over:
                        stub.RunExperts(request, timeout=10)
                    assert over.value.code() == code
                assert client.start(_request(segment), 10).result().outputs_shared
            finally:
                client.close()
        finally:
            segment.unlink()


def test_the_lane_refuses_callers_without_the_token_and_bad_messages(tiny):
    with expert_servers(tiny, 1, ["--experts", "all"]) as (addresses, _), channel(addresses[0]) as ch:
        stub = expert_pb2_grpc.ExpertServiceStub(ch)
        reply, segment = _attach(stub)
        try:
            for token in (b"\0" * lane.TOKEN_BYTES, reply.lane_token[:-1], b"x"):
                sock = lane.new_socket()
                sock.settimeout(10)
                sock.connect(lane.address(reply.lane))
                sock.sendall(token)
                assert lane.receive(sock) == b"", "a wrong token gets the connection closed, no answer"
                sock.close()
            with pytest.raises(ConnectionRefusedError, match="token"):
                Lane(reply.lane, b"wrong" * 4).start(_request(segment), 10)
            sock = lane.new_socket()
            sock.settimeout(10)
            sock.connect(lane.address(reply.lane))
            sock.sendall(reply.lane_token)
            assert lane.receive(sock) == b"\0"
            for bad in (b"\x01", b"\x09\x00\x00\x00a", b"\x00\x00\x00\x00\xff\xff\xff"):
                sock.sendall(bad)
                code, details = lane.decode_reply(lane.receive(sock))
                assert code == grpc.StatusCode.INVALID_ARGUMENT and b"malformed" in details, details
            sock.sendall(lane.encode_request(_request(segment).SerializeToString()))
            assert lane.decode_reply(lane.receive(sock))[0] == grpc.StatusCode.OK  # the connection serves on
            sock.close()
            with pytest.raises(ConnectionRefusedError):
                lane.new_socket().connect(lane.address(reply.lane + "x"))  # no other name reaches it
        finally:
            segment.unlink()
        assert stub.GetInfo(expert_pb2.GetInfoRequest(), timeout=10).num_experts > 0  # the server serves on


def test_a_stopped_or_frozen_server_fails_lane_calls_as_grpc_would(tiny):
    with expert_servers(tiny, 1, ["--experts", "all"]) as (addresses, procs), channel(addresses[0]) as ch:
        stub = expert_pb2_grpc.ExpertServiceStub(ch)
        reply, segment = _attach(stub)
        client = Lane(reply.lane, reply.lane_token)
        try:
            assert client.start(_request(segment), 10).result().outputs_shared
            procs[0].send_signal(signal.SIGSTOP)
            try:
                pending = client.start(_request(segment), 30)  # on the idle connection
                with pytest.raises(grpc.RpcError) as err:  # a new connection, never greeted
                    client.start(_request(segment), 0.5).result()
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                with pytest.raises(grpc.RpcError) as err:
                    Lane(reply.lane, reply.lane_token).start(_request(segment), 0.5).result()
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                procs[0].send_signal(signal.SIGKILL)  # dies with the call unanswered
                procs[0].wait()
            finally:
                if procs[0].poll() is None:
                    procs[0].send_signal(signal.SIGCONT)
            with pytest.raises(grpc.RpcError) as err:
                pending.result()
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            with pytest.raises(OSError):  # nothing to send to: the caller goes over gRPC instead
                client.start(_request(segment), 10)
        finally:
            client.close()
            segment.unlink()


def test_dispatch_uses_the_lane_where_offered_and_grpc_elsewhere(tiny):
    with expert_servers(tiny, 1) as (with_lane, _), expert_servers(tiny, 1, ["--no-local-lane"]) as (without, _):
        addresses = with_lane + without
        clients = _clients(tiny, addresses, "shm")
        reference = _clients(tiny, addresses, "grpc")
        try:
            num_experts = len(clients.home[0])
            for i in range(6):
                call = _layer_call(i, num_experts, _info(addresses[0]).d_model, 8 + 11 * i)
                want, got = _run(reference, i % 2, call), _run(clients, i % 2, call)
                assert want.keys() == got.keys() and all(torch.equal(want[e], got[e]) for e in want)
            assert clients.transport.lane(addresses[0]) is not None
            assert clients.transport.lane(addresses[1]) is None
            assert [clients.transport.kind(a) for a in addresses] == ["shm", "shm"]
            assert clients.stats.bytes_sent == 0
        finally:
            clients.close()
            reference.close()


def test_fuzzed_lane_messages_get_an_answer_and_the_lane_serves_on(tiny):
    """Whatever a token holder sends, it gets a status back on the same connection (or,
    for a message too long to be a request, a closed connection), and good calls still work."""
    with expert_servers(tiny, 1, ["--experts", "all"]) as (addresses, _), channel(addresses[0]) as ch:
        reply, segment = _attach(expert_pb2_grpc.ExpertServiceStub(ch))
        client = Lane(reply.lane, reply.lane_token)
        sock = lane.new_socket()
        sock.settimeout(30)
        sock.connect(lane.address(reply.lane))
        sock.sendall(reply.lane_token)
        assert lane.receive(sock) == b"\0"
        good = _request(segment).SerializeToString()

        @settings(max_examples=150, deadline=None)
        @given(st.one_of(st.binary(min_size=1, max_size=300),
                         st.binary(max_size=200).map(lambda b: lane.encode_request(b, "r", "b")),
                         st.integers(0, len(good)).map(lambda n: lane.encode_request(good[:n] + b"\xff" * 3))))
        def fuzz(message):
            sock.sendall(message)
            code, _ = lane.decode_reply(lane.receive(sock))
            assert code in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                            grpc.StatusCode.FAILED_PRECONDITION}, code

        try:
            fuzz()
            assert client.start(_request(segment), 10).result().outputs_shared
        finally:
            sock.close()
            client.close()
            segment.unlink()
