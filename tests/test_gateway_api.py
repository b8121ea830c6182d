"""The gateway's client APIs against a real gateway process and real expert servers."""

import threading

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import channel, gateway

PROMPTS = ["Hello there", "A longer prompt about experts and routers.", "Hi"]


@pytest.fixture(scope="module")
def gw(tiny, three_expert_servers):
    # A long batching window so that concurrent requests reliably share a batch.
    with gateway(tiny, three_expert_servers[:2], ["--max-wait-ms", "300"]) as address:
        yield address


@pytest.fixture(scope="module")
def stub(gw):
    with channel(gw) as ch:
        yield gateway_pb2_grpc.GatewayServiceStub(ch)


def hf_generate(reference, prompts, **kwargs):
    model, tokenizer = reference
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model.generate(**enc, **kwargs).tolist()
    rows = []
    for row in out:
        ids = row[1:]
        if model.config.eos_token_id in ids:
            ids = ids[: ids.index(model.config.eos_token_id) + 1]
        rows.append(ids)
    return rows


def params(**kw):
    return gateway_pb2.GenerationParameters(**kw)


def test_stream_gives_the_same_tokens_as_unary(stub):
    req = gateway_pb2.GenerateRequest(prompts=PROMPTS, parameters=params(max_new_tokens=10))
    unary = stub.Generate(req)
    streamed = {i: [] for i in range(len(PROMPTS))}
    reasons = {}
    messages = list(stub.GenerateStream(req))
    for m in messages[:-1]:
        assert m.HasField("token_id")
        streamed[m.index].append(m.token_id)
        if m.finish_reason:
            reasons[m.index] = m.finish_reason
    final = messages[-1]
    assert not final.HasField("token_id") and final.timings.total_ns > 0
    for i, gen in enumerate(unary.generations):
        assert streamed[i] == list(gen.token_ids)
        assert reasons[i] == gen.finish_reason
        assert gen.num_input_tokens == len(PROMPTS[i].encode()) + 1


def test_sampling_with_seed_equals_hf_with_the_same_seed(stub, reference):
    p = params(max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9, seed=1234)
    first = stub.Generate(gateway_pb2.GenerateRequest(prompts=PROMPTS, parameters=p))
    again = stub.Generate(gateway_pb2.GenerateRequest(prompts=PROMPTS, parameters=p))
    assert [list(g.token_ids) for g in first.generations] == [list(g.token_ids) for g in again.generations]
    torch.manual_seed(1234)
    want = hf_generate(reference, PROMPTS, max_new_tokens=12, do_sample=True, temperature=0.8, top_k=20, top_p=0.9)
    assert [list(g.token_ids) for g in first.generations] == want


def test_max_new_tokens_limits_and_zero(stub):
    reply = stub.Generate(gateway_pb2.GenerateRequest(prompts=PROMPTS, parameters=params(max_new_tokens=3)))
    assert all(len(g.token_ids) <= 3 for g in reply.generations)
    assert all(g.finish_reason in ("eos", "length") for g in reply.generations)
    zero = stub.Generate(gateway_pb2.GenerateRequest(prompts=["abc"], parameters=params(max_new_tokens=0)))
    assert list(zero.generations[0].token_ids) == [] and zero.generations[0].finish_reason == "length"


def test_concurrent_requests_are_batched_and_exact(stub, reference):
    prompts = ["one", "two two", "three three three", "four"]
    replies = [None] * len(prompts)

    def call(i):
        replies[i] = stub.Generate(gateway_pb2.GenerateRequest(prompts=[prompts[i]], parameters=params(max_new_tokens=8)))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert max(r.timings.batch_size for r in replies) > 1
    for prompt, reply in zip(prompts, replies):
        assert list(reply.generations[0].token_ids) == hf_generate(reference, [prompt], max_new_tokens=8)[0]


def test_status_reports_placement(stub, three_expert_servers):
    status = stub.GetStatus(gateway_pb2.GetStatusRequest())
    assert status.healthy and status.model_name == "switch" and status.num_experts == 8
    assert [s.address for s in status.servers] == three_expert_servers[:2]
    assert all(s.num_home_experts == 16 and s.weight_bytes > 0 for s in status.servers)
    assert [p.name for p in status.placement] == ["encoder.block.1", "encoder.block.3", "decoder.block.1", "decoder.block.3"]
    assert list(status.placement[0].home_server) == [0, 1, 0, 1, 0, 1, 0, 1]


def test_health_and_reflection(gw):
    with channel(gw) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "moe.gateway.v1.GatewayService", "inference.GRPCInferenceService"):
            assert health.Check(health_pb2.HealthCheckRequest(service=service)).status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        reply = next(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")])))
        names = {s.name for s in reply.list_services_response.service}
        assert {"moe.gateway.v1.GatewayService", "inference.GRPCInferenceService", "grpc.health.v1.Health"} <= names


def test_tritonclient_text_and_ids(gw, stub):
    import tritonclient.grpc as tc

    client = tc.InferenceServerClient(gw)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready("switch")
    meta = client.get_model_metadata("switch")
    assert {i.name for i in meta.inputs} == {"text_input", "input_ids", "max_tokens"}

    text = tc.InferInput("text_input", [len(PROMPTS)], "BYTES")
    text.set_data_from_numpy(np.array([p.encode() for p in PROMPTS], dtype=object))
    max_tokens = tc.InferInput("max_tokens", [1], "INT32")
    max_tokens.set_data_from_numpy(np.array([6], dtype=np.int32))
    result = client.infer("switch", [text, max_tokens])
    native = stub.Generate(gateway_pb2.GenerateRequest(prompts=PROMPTS, parameters=params(max_new_tokens=6)))
    texts = [t.decode() for t in result.as_numpy("text_output")]
    assert texts == [g.text for g in native.generations]
    ids = result.as_numpy("output_ids")
    for row, g in zip(ids.tolist(), native.generations):
        n = len(g.token_ids)
        assert row[:n] == list(g.token_ids) and all(x == -1 for x in row[n:])

    # input_ids INT64 [B, S], right-padded with the pad token, per-row max_tokens.
    toks = [list(p.encode("utf-8")) for p in PROMPTS]  # not the ByT5 ids: any valid ids will do
    toks = [[t % 300 + 3 for t in row] + [1] for row in toks]
    width = max(map(len, toks))
    padded = np.array([row + [0] * (width - len(row)) for row in toks], dtype=np.int64)
    inp = tc.InferInput("input_ids", list(padded.shape), "INT64")
    inp.set_data_from_numpy(padded)
    mt = tc.InferInput("max_tokens", [3], "INT32")
    mt.set_data_from_numpy(np.array([2, 4, 0], dtype=np.int32))
    result = client.infer("switch", [inp, mt], outputs=[tc.InferRequestedOutput("output_ids")])
    ids = result.as_numpy("output_ids")
    native = [stub.Generate(gateway_pb2.GenerateRequest(token_ids=[gateway_pb2.TokenIds(ids=t)], parameters=params(max_new_tokens=n)))
              for t, n in zip(toks, [2, 4, 0])]
    for row, reply in zip(ids.tolist(), native):
        got = [x for x in row if x != -1]
        assert got == list(reply.generations[0].token_ids)
    assert result.as_numpy("text_output") is None

    with pytest.raises(tc.InferenceServerException) as err:
        client.infer("no-such-model", [text])
    assert "NOT_FOUND" in str(err.value.status())
