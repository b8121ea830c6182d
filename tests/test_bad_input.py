"""Bad input gets INVALID_ARGUMENT / NOT_FOUND / FAILED_PRECONDITION with a message
that says what was wrong, and the service keeps serving; a dead expert server gives
UNAVAILABLE naming it."""

import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from moe_common import tensor_codec
from moe_protos.inference import grpc_predict_v2_pb2 as oip
from moe_protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from moe_protos.moe.expert.v1 import expert_pb2, expert_pb2_grpc
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import channel, expert_servers, gateway, restart_expert_server

INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND


def expect(code, words, fn, *args):
    with pytest.raises(grpc.RpcError) as err:
        fn(*args)
    assert err.value.code() == code, err.value.details()
    assert words in err.value.details()


@pytest.fixture(scope="module")
def gw(tiny, three_expert_servers):
    with gateway(tiny, three_expert_servers[:1], ["--max-input-tokens", "32", "--max-new-tokens-limit", "64"]) as address:
        yield address


def test_gateway_rejects_bad_requests_and_keeps_serving(gw):
    G, P = gateway_pb2.GenerateRequest, gateway_pb2.GenerationParameters
    with channel(gw) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        cases = [
            (INVALID, "no prompts", G()),
            (INVALID, "has 41 tokens; the maximum is 32", G(prompts=["x" * 40])),
            (INVALID, "max_new_tokens must be >= 0, got -1", G(prompts=["x"], parameters=P(max_new_tokens=-1))),
            (INVALID, "exceeds this gateway's limit of 64", G(prompts=["x"], parameters=P(max_new_tokens=65))),
            (NOT_FOUND, "model 'gpt' is not served here", G(model="gpt", prompts=["x"])),
            (INVALID, "outside the vocabulary", G(token_ids=[gateway_pb2.TokenIds(ids=[5, 100000])])),
            (INVALID, "prompt 0 has no tokens", G(token_ids=[gateway_pb2.TokenIds(ids=[])])),
            (INVALID, "not both", G(prompts=["x"], token_ids=[gateway_pb2.TokenIds(ids=[5])])),
            (INVALID, "temperature must be finite and >= 0.001", G(prompts=["x"], parameters=P(do_sample=True, temperature=0))),
            (INVALID, "temperature must be finite", G(prompts=["x"], parameters=P(do_sample=True, temperature=float("inf")))),
            (INVALID, "the request has 65 prompts; the maximum is 64", G(prompts=["x"] * 65)),
            (INVALID, "top_p must be in (0, 1]", G(prompts=["x"], parameters=P(do_sample=True, top_p=1.5))),
        ]
        for code, words, request in cases:
            expect(code, words, stub.Generate, request)
            expect(code, words, lambda r: list(stub.GenerateStream(r)), request)
        ok = stub.Generate(G(prompts=["still serving"], parameters=P(max_new_tokens=2)))
        assert len(ok.generations) == 1
        # Sampling fields are ignored (not rejected) when greedy.
        greedy = stub.Generate(G(prompts=["still serving"], parameters=P(max_new_tokens=2, temperature=0)))
        assert list(greedy.generations[0].token_ids) == list(ok.generations[0].token_ids)
        status = stub.GetStatus(gateway_pb2.GetStatusRequest())
        assert status.requests_failed >= len(cases) and status.healthy


def test_open_inference_protocol_rejects_bad_requests(gw):
    R = oip.ModelInferRequest
    with channel(gw) as ch:
        stub = oip_grpc.GRPCInferenceServiceStub(ch)
        text = R.InferInputTensor(name="text_input", datatype="BYTES", shape=[1])
        one = [b"\x01\0\0\0a"]

        def with_params(**kw):
            r = R(model_name="switch", inputs=[text], raw_input_contents=one)
            for k, v in kw.items():
                r.parameters[k].CopyFrom(oip.InferParameter(**v))
            return r
        cases = [
            (NOT_FOUND, "has no version '7'", R(model_name="switch", model_version="7", inputs=[text], raw_input_contents=one)),
            (INVALID, "negative dimension", R(model_name="switch", inputs=[R.InferInputTensor(name="input_ids", datatype="INT64", shape=[1, -3])],
                                              raw_input_contents=[b""])),
            (INVALID, "given twice", R(model_name="switch", inputs=[text, text], raw_input_contents=one * 2)),
            (INVALID, "'temperature' must be float or int, got str", with_params(temperature={"string_param": "hot"})),
            (INVALID, "'do_sample' must be bool, got str", with_params(do_sample={"string_param": "false"})),
            (INVALID, "'top_k' must be int, got float", with_params(top_k={"double_param": 2.9})),
            (NOT_FOUND, "model 'other' is not served", R(model_name="other", inputs=[text], raw_input_contents=[b"\x01\0\0\0a"])),
            (INVALID, "give exactly one of", R(model_name="switch")),
            (INVALID, "unknown input 'prompt'", R(model_name="switch", inputs=[R.InferInputTensor(name="prompt", datatype="BYTES", shape=[1])])),
            (INVALID, "must have datatype BYTES", R(model_name="switch", inputs=[R.InferInputTensor(name="text_input", datatype="FP32", shape=[1])])),
            (INVALID, "truncated", R(model_name="switch", inputs=[text], raw_input_contents=[b"\x09\0\0\0abc"])),
            (INVALID, "max_tokens must be >= 0", R(model_name="switch", inputs=[text, R.InferInputTensor(name="max_tokens", datatype="INT32", shape=[1])],
                                                    raw_input_contents=[b"\x01\0\0\0a", np.array([-3], "<i4").tobytes()])),
        ]
        for code, words, request in cases:
            expect(code, words, stub.ModelInfer, request)
        expect(NOT_FOUND, "not served", stub.ModelMetadata, oip.ModelMetadataRequest(name="other"))
        assert stub.ServerLive(oip.ServerLiveRequest()).live


def test_expert_server_rejects_bad_tensors_and_keeps_serving(tiny, three_expert_servers):
    with channel(three_expert_servers[2]) as ch:
        stub = expert_pb2_grpc.ExpertServiceStub(ch)
        info = stub.GetInfo(expert_pb2.GetInfoRequest())
        stub.AssignExperts(expert_pb2.AssignExpertsRequest(experts=[expert_pb2.ExpertRef(layer=0, expert=2)], model_id=info.model_id))
        d = info.d_model
        good = tensor_codec.encode(torch.randn(3, d))

        def run(hidden=good, layer=0, groups=((2, 3),), model_id=""):
            return stub.RunExperts(expert_pb2.RunExpertsRequest(
                layer=layer, hidden_states=hidden, model_id=model_id,
                groups=[expert_pb2.ExpertGroup(expert=e, num_tokens=n) for e, n in groups]))

        expect(INVALID, f"must have shape [tokens, {d}], got [3, {d + 1}]", run, tensor_codec.encode(torch.randn(3, d + 1)))
        expect(INVALID, "DTYPE_UNSPECIFIED is not allowed", run, expert_pb2.Tensor(shape=[3, d], data=good.data))
        expect(INVALID, f"needs {3 * d * 4} bytes, got {3 * d * 4 - 5}", run,
               expert_pb2.Tensor(dtype=expert_pb2.DTYPE_FLOAT32, shape=[3, d], data=good.data[:-5]))
        expect(NOT_FOUND, "expert 5 of sparse layer 0 is not held", run, good, 0, ((5, 3),))
        expect(INVALID, "sparse layer 9 does not exist", run, good, 9)
        expect(INVALID, "expert 99 does not exist", run, good, 0, ((99, 3),))
        expect(INVALID, "cover 2 tokens but hidden_states has 3 rows", run, good, 0, ((2, 2),))
        expect(grpc.StatusCode.FAILED_PRECONDITION, "same checkpoint", run, good, 0, ((2, 3),), "0123456789abcdef")
        expect(INVALID, "expert 99 does not exist", stub.AssignExperts,
               expert_pb2.AssignExpertsRequest(experts=[expert_pb2.ExpertRef(layer=0, expert=99)]))
        for wire in tensor_codec.WIRE_DTYPES:
            reply = run(tensor_codec.encode(torch.randn(3, d), wire))
            assert reply.outputs.dtype == tensor_codec.WIRE_DTYPES[wire][0] and list(reply.outputs.shape) == [3, d]
        assert [(e.layer, e.expert) for e in stub.GetInfo(expert_pb2.GetInfoRequest()).experts] == [(0, 2)]


def test_dead_expert_servers_cost_no_request_until_none_is_left(tiny, tmp_path):
    """One dead server: its experts run on the other (stand-ins), and status says which is
    down. Every server dead: UNAVAILABLE naming the last one tried; the gateway stays up.
    Restarted, they are members again (never evicted: --evict-after-s 600, so a slow
    restart cannot hide a gateway that fails to give them their experts back)."""
    with expert_servers(tiny, 2) as (addresses, procs), \
            gateway(tiny, addresses, ["--evict-after-s", "600"]) as address, channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        request = gateway_pb2.GenerateRequest(prompts=["hello experts"], parameters=gateway_pb2.GenerationParameters(max_new_tokens=4))
        first = stub.Generate(request)
        assert first.generations[0].token_ids
        procs[1].kill()
        procs[1].wait()
        for _ in range(2):  # and again
            assert list(stub.Generate(request).generations[0].token_ids) == list(first.generations[0].token_ids)
        status = stub.GetStatus(gateway_pb2.GetStatusRequest())
        assert not status.healthy and [s.healthy for s in status.servers] == [True, False]
        assert [s.suspect for s in status.servers] == [False, True]
        assert status.expert_path.suspects == 1 and status.expert_path.stand_in_loads > 0
        health = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        assert not oip_grpc.GRPCInferenceServiceStub(ch).ServerReady(oip.ServerReadyRequest()).ready
        procs[0].kill()
        procs[0].wait()
        for _ in range(2):  # the gateway neither hangs nor dies
            expect(grpc.StatusCode.UNAVAILABLE, "is unavailable", stub.Generate, request)

        # Replacements on the same addresses start empty; the gateway gives them their experts back.
        for i in range(2):
            procs[i] = restart_expert_server(tiny, addresses[i], tmp_path)
        deadline = time.monotonic() + 30

        def back(status) -> bool:  # answering, and no longer suspect (the health watch saw them)
            return status.healthy and not any(s.suspect for s in status.servers)

        while not back(stub.GetStatus(gateway_pb2.GetStatusRequest())):  # the gateway reconnects
            assert time.monotonic() < deadline, "the gateway did not reconnect to the restarted servers"
            time.sleep(0.2)
        before = stub.GetStatus(gateway_pb2.GetStatusRequest())
        again = stub.Generate(request)
        assert list(again.generations[0].token_ids) == list(first.generations[0].token_ids)
        after = stub.GetStatus(gateway_pb2.GetStatusRequest())
        assert [s.address for s in after.servers] == addresses, "the restarted servers are still the members"
        assert [b.healthy for b in after.servers] == [True, True]
        # Both computed tokens of the new request: they hold their home experts again.
        assert all(a.tokens > b.tokens for a, b in zip(after.servers, before.servers)), \
            ([b.tokens for b in before.servers], [a.tokens for a in after.servers])
