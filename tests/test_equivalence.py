"""The distributed model must equal the single-process HF model on the same checkpoint.

Real processes: k expert servers and a gateway on free loopback ports; the
reference is HF's SwitchTransformersForConditionalGeneration in this process.
"""

import pytest
import torch

from gateway.config import GatewayConfig
from gateway.engine import Engine
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import channel, gateway, generated_ids

PROMPTS = [
    "Hello",
    "Mixture-of-experts models send every token to one expert.",
    # Long enough that some expert of a sparse layer gets more than its capacity (8) of tokens.
    "The gateway runs attention and the routers; expert servers run the expert FFNs. " * 2,
    "Switch!",
    "",  # only the EOS token
]


def _dropped_tokens(model, enc) -> int:
    """Tokens the HF routers dropped for capacity in the encoder pass."""
    dropped = []

    def hook(module, args, output):
        expert_index = output[0]  # [B, S, E] one-hot, all-zero where dropped
        mask = enc["attention_mask"].bool()
        dropped.append(int(((expert_index.sum(-1) == 0) & mask).sum()))

    from transformers.models.switch_transformers.modeling_switch_transformers import SwitchTransformersTop1Router

    hooks = [m.register_forward_hook(hook) for m in model.encoder.modules() if isinstance(m, SwitchTransformersTop1Router)]
    with torch.no_grad():
        model.encoder(**enc)
    for h in hooks:
        h.remove()
    return sum(dropped)


# Hidden states through shared memory (auto and shm on loopback) and as bytes in the message.
@pytest.mark.parametrize("num_servers,transport", [(1, "auto"), (2, "grpc"), (3, "shm")])
def test_greedy_generation_and_logits_equal_hf(tiny, reference, three_expert_servers, num_servers, transport):
    model, tokenizer = reference
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    assert _dropped_tokens(model, enc) > 0, "the test batch must overflow an expert's capacity"
    with torch.no_grad():
        expected = model.generate(**enc, max_new_tokens=24, do_sample=False)
    servers = three_expert_servers[:num_servers]

    with gateway(tiny, servers, ["--transport", transport]) as address, channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        reply = stub.Generate(gateway_pb2.GenerateRequest(
            prompts=PROMPTS, parameters=gateway_pb2.GenerationParameters(max_new_tokens=24)))
        assert reply.timings.batch_size == len(PROMPTS)
        for ids, gen in zip(generated_ids(model, expected), reply.generations):
            assert list(gen.token_ids) == ids
            assert gen.text == tokenizer.decode(ids, skip_special_tokens=True)
        status = stub.GetStatus(gateway_pb2.GetStatusRequest())
        assert [s.address for s in status.servers] == servers
        shared = status.expert_path.bytes_shared
        assert (shared == 0 and status.expert_path.bytes_sent > 0) if transport == "grpc" else \
            (shared > 0 and status.expert_path.bytes_sent == 0)

    # One teacher-forced forward pass in-process over the same real expert servers.
    engine = Engine(GatewayConfig(model=str(tiny.path), expert_servers=servers, transport=transport))
    try:
        engine.connect()
        decoder_input_ids = expected[:, :12]
        got = engine.forward_logits(enc["input_ids"], enc["attention_mask"], decoder_input_ids)
        with torch.no_grad():
            want = model(**enc, decoder_input_ids=decoder_input_ids).logits
        # Bit for bit: same ops, same shapes, same order as HF (the issue asks for 1e-5).
        assert torch.equal(got, want), (got - want).abs().max().item()
        assert engine.clients.tokens_per_server().count(0) == 0, "every server must take part"
        kinds = {engine.clients.transport.kind(a) for a in servers}
        assert kinds == ({"grpc"} if transport == "grpc" else {"shm"})
    finally:
        engine.close()


def test_lossy_wire_dtypes_and_threaded_groups_end_to_end(tiny, reference):
    """Expert servers running each call's groups on threads (--group-executor threads) are
    exact; float16 and bfloat16 on the wire round every hidden state the servers see and
    send back, so they are only close: their agreement is measured and bounded here."""
    from gateway.engine import Sampling
    from tests.conftest import expert_servers

    model, tokenizer = reference
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.generate(**enc, max_new_tokens=24, do_sample=False)
        want = model(**enc, decoder_input_ids=expected[:, :12]).logits
    rows = [tokenizer(p).input_ids for p in PROMPTS]
    want_ids = generated_ids(model, expected)
    with expert_servers(tiny, 2, ["--group-executor", "threads"]) as (addresses, _):
        for wire, max_diff, min_rows in (("float32", 0.0, len(PROMPTS)), ("float16", 0.05, 3), ("bfloat16", 0.25, 3)):
            engine = Engine(GatewayConfig(model=str(tiny.path), expert_servers=addresses, wire_dtype=wire))
            try:
                engine.connect()
                got = engine.forward_logits(enc["input_ids"], enc["attention_mask"], expected[:, :12])
                out = engine.generate_batch(rows, [24] * len(rows), Sampling())
            finally:
                engine.close()
            diff = (got - want).abs().max().item()
            same = sum(r.token_ids == ids for r, ids in zip(out, want_ids))
            print(f"wire {wire}: max abs logit diff {diff:.3g}, rows token-identical {same}/{len(rows)}")
            assert diff <= max_diff and same >= min_rows, (wire, diff, same)
