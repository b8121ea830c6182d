"""The gateway's client APIs against a real gateway process and real expert servers."""

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import channel, gateway, generated_ids

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
        return generated_ids(model, model.generate(**enc, **kwargs))


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


@pytest.fixture(scope="module")
def static_stub(tiny, three_expert_servers):
    with gateway(tiny, three_expert_servers[:2], ["--scheduler", "static", "--max-wait-ms", "300"]) as address:
        with channel(address) as ch:
            yield gateway_pb2_grpc.GatewayServiceStub(ch)


@pytest.mark.parametrize("scheduler", ["continuous", "static"])
def test_seeded_sampling_does_not_depend_on_company(request, scheduler):
    # Two seeded requests sent together must each get what they get alone. The static
    # batcher guarantees it by running a seeded request in a batch of its own; the
    # continuous scheduler by giving each request its own random stream while rows share
    # steps (sharing mid-flight is checked in tests/test_continuous_batching.py).
    stub = request.getfixturevalue("stub" if scheduler == "continuous" else "static_stub")
    p = params(max_new_tokens=8, do_sample=True, seed=42)
    alone = [stub.Generate(gateway_pb2.GenerateRequest(prompts=[x], parameters=p)) for x in ("alpha", "beta")]
    together = [None, None]

    def call(i, x):
        together[i] = stub.Generate(gateway_pb2.GenerateRequest(prompts=[x], parameters=p))

    threads = [threading.Thread(target=call, args=(i, x)) for i, x in enumerate(("alpha", "beta"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        assert list(a.generations[0].token_ids) == list(b.generations[0].token_ids)
        if scheduler == "static":
            assert b.timings.batch_size == 1


def test_max_new_tokens_limits_and_zero(stub, reference):
    reply = stub.Generate(gateway_pb2.GenerateRequest(prompts=PROMPTS, parameters=params(max_new_tokens=3)))
    expected = hf_generate(reference, PROMPTS, max_new_tokens=3, do_sample=False)
    eos = reference[0].config.eos_token_id
    for g, ids in zip(reply.generations, expected):
        assert list(g.token_ids) == ids and 1 <= len(ids) <= 3
        assert g.finish_reason == ("eos" if ids[-1] == eos else "length")
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
    # The stock client runs in its own process, as a user's would: its copy of the
    # inference.* protos cannot share a process's descriptor pool with the gateway's.
    probe = subprocess.run([sys.executable, str(Path(__file__).with_name("tritonclient_probe.py")), gw],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    got = json.loads(probe.stdout)
    assert got["live"] and got["ready"] and got["model_ready"]
    assert set(got["metadata_inputs"]) == {"text_input", "input_ids", "max_tokens"}

    native = stub.Generate(gateway_pb2.GenerateRequest(prompts=got["prompts"], parameters=params(max_new_tokens=6)))
    assert got["text_output"] == [g.text for g in native.generations]
    for row, g in zip(got["output_ids"], native.generations):
        n = len(g.token_ids)
        assert row[:n] == list(g.token_ids) and all(x == -1 for x in row[n:])

    for toks, limit, row in zip(got["id_prompts"], got["id_limits"], got["ids_output_ids"]):
        reply = stub.Generate(gateway_pb2.GenerateRequest(
            token_ids=[gateway_pb2.TokenIds(ids=toks)], parameters=params(max_new_tokens=limit)))
        assert [x for x in row if x != -1] == list(reply.generations[0].token_ids)
    assert got["ids_text_output_absent"]
    assert "NOT_FOUND" in got["unknown_model_status"]
