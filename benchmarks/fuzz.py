"""Fuzz every RPC of every service with random and mutated messages (hypothesis).

    python benchmarks/fuzz.py --cases 20000 --json benchmarks/results/fuzz.json   # a long campaign
    python benchmarks/fuzz.py --cases 2000                                        # what the test runs

Starts a stack on loopback (an expert server and the predictor behind a gateway, plus
a second expert server of its own, so that fuzzed AssignExperts calls cannot disturb
the gateway's placement) and sends each RPC messages drawn from its descriptor:
random scalars (huge, negative, NaN), strings from a list of meaningful words and
random text, bytes, repeated fields and maps of up to 8 entries, nested messages;
or a valid message's bytes truncated, bit-flipped or replaced (invalid UTF-8, bad
wire types). Address fields only ever name loopback or nonsense.

Every answer must be OK or a status that blames the request (INVALID_ARGUMENT,
NOT_FOUND, OUT_OF_RANGE, RESOURCE_EXHAUSTED, FAILED_PRECONDITION; AddExpertServer may
also say ALREADY_EXISTS or UNAVAILABLE for an address that does not serve), within the
call's deadline (no hang), and every process must still be alive and answer valid
requests as before at the end. hypothesis shrinks the first violation to a minimal
message, printed with its status. Seeded (--seed): the same run every time.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import grpc  # noqa: E402
from google.protobuf import descriptor as pbd  # noqa: E402
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from gateway.launcher import spawn_expert_server, start_stack, wait_ready  # noqa: E402
from moe_common import model_source, serving  # noqa: E402
from moe_protos.inference import grpc_predict_v2_pb2 as oip  # noqa: E402
from moe_protos.moe.expert.v1 import expert_pb2  # noqa: E402
from moe_protos.moe.gateway.v1 import gateway_pb2  # noqa: E402
from moe_protos.moe.predictor.v1 import predictor_pb2  # noqa: E402

ALLOWED = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
           grpc.StatusCode.OUT_OF_RANGE, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.FAILED_PRECONDITION}
ALSO_ALLOWED = {  # the request names another server, which may not be there
    "/moe.gateway.v1.MembershipService/AddExpertServer": {grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.UNAVAILABLE},
}
WORDS = ["", "switch", "tiny", "1", "2", "float32", "float16", "bfloat16", "int64", "FP32", "INT64", "INT32", "BYTES",
         "text_input", "input_ids", "max_tokens", "text_output", "output_ids", "seed", "do_sample", "temperature",
         "top_k", "top_p", "hello experts", "\u00e9\u00e8\u4e2d\U0001f600", "\x00"]
# Addresses the fuzzer may name: loopback, unresolvable, or malformed. Never another host.
ADDRESSES = ["127.0.0.1:1", "127.0.0.1:0", "localhost:1", "no-such-host.invalid:5000", "nonsense", "", ":", "127.0.0.1:"]
TIMEOUT_S = 20.0


def field_values(field: pbd.FieldDescriptor, depth: int) -> st.SearchStrategy:
    """Values of one (non-repeated) field."""
    t = pbd.FieldDescriptor
    kind = field.type
    if "address" in field.name:
        return st.sampled_from(ADDRESSES)
    if kind in (t.TYPE_INT32, t.TYPE_SINT32, t.TYPE_SFIXED32):
        return st.one_of(st.integers(-5, 70), st.integers(-2**31, 2**31 - 1))
    if kind in (t.TYPE_INT64, t.TYPE_SINT64, t.TYPE_SFIXED64):
        return st.one_of(st.integers(-5, 70), st.integers(-2**63, 2**63 - 1))
    if kind in (t.TYPE_UINT32, t.TYPE_FIXED32):
        return st.one_of(st.integers(0, 70), st.integers(0, 2**32 - 1))
    if kind in (t.TYPE_UINT64, t.TYPE_FIXED64):
        return st.one_of(st.integers(0, 70), st.integers(0, 2**64 - 1))
    if kind in (t.TYPE_FLOAT, t.TYPE_DOUBLE):
        return st.one_of(st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-9, math.inf, -math.inf, math.nan]),
                         st.floats(width=32 if kind == t.TYPE_FLOAT else 64))
    if kind == t.TYPE_BOOL:
        return st.booleans()
    if kind == t.TYPE_STRING:
        return st.one_of(st.sampled_from(WORDS), st.text(max_size=40))
    if kind == t.TYPE_BYTES:
        return st.one_of(st.binary(max_size=64), st.binary(min_size=4, max_size=4096))
    if kind == t.TYPE_ENUM:
        return st.one_of(st.sampled_from([v.number for v in field.enum_type.values]), st.integers(-3, 10))
    if kind == t.TYPE_MESSAGE:
        return messages(field.message_type, depth + 1)
    raise ValueError(f"no strategy for field {field.full_name}")


def messages(desc: pbd.Descriptor, depth: int = 0) -> st.SearchStrategy:
    """Messages of type `desc` with a random subset of fields set."""
    from google.protobuf import message_factory

    cls = message_factory.GetMessageClass(desc)
    if depth > 3:
        return st.just(cls())

    @st.composite
    def build(draw):
        msg = cls()
        for field in desc.fields:
            if not draw(st.booleans()):
                continue
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                key_f, value_f = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
                for _ in range(draw(st.integers(0, 4))):
                    key = draw(field_values(key_f, depth))
                    value = draw(field_values(value_f, depth))
                    if value_f.message_type is not None:
                        getattr(msg, field.name)[key].CopyFrom(value)
                    else:
                        getattr(msg, field.name)[key] = value
            elif field.is_repeated:
                values = draw(st.lists(field_values(field, depth), max_size=8))
                target = getattr(msg, field.name)
                if field.message_type is not None:
                    for v in values:
                        target.add().CopyFrom(v)
                else:
                    target.extend(values)
            elif field.message_type is not None:
                getattr(msg, field.name).CopyFrom(draw(field_values(field, depth)))
            else:
                setattr(msg, field.name, draw(field_values(field, depth)))
        return msg

    return build()


def mutated(valid: st.SearchStrategy) -> st.SearchStrategy:
    """Bytes of a valid message, truncated, bit-flipped, spliced with junk or replaced."""

    @st.composite
    def build(draw):
        raw = bytearray(draw(valid).SerializeToString())
        how = draw(st.sampled_from(["truncate", "flip", "splice", "junk", "bad-utf8"]))
        if how == "truncate" and raw:
            del raw[draw(st.integers(0, len(raw) - 1)):]
        elif how == "flip" and raw:
            for _ in range(draw(st.integers(1, 4))):
                i = draw(st.integers(0, len(raw) - 1))
                raw[i] ^= 1 << draw(st.integers(0, 7))
        elif how == "splice":
            i = draw(st.integers(0, len(raw)))
            raw[i:i] = draw(st.binary(min_size=1, max_size=16))
        elif how == "bad-utf8":
            raw += bytes([0x0A, 3, 0xFF, 0xFE, 0xC0])  # field 1 as a string of invalid UTF-8
        else:
            raw = bytearray(draw(st.binary(max_size=64)))
        return bytes(raw)

    return build()


def targets(gateway: str, expert: str, predictor: str, admin: str) -> list[tuple[str, str, pbd.MethodDescriptor]]:
    """(address, method path, method) of every RPC of every service (MembershipService on the
    gateway's admin port: the client port does not serve it)."""
    out = []
    for address, services in ((gateway, [gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"],
                                         oip.DESCRIPTOR.services_by_name["GRPCInferenceService"]]),
                              (admin, [gateway_pb2.DESCRIPTOR.services_by_name["MembershipService"]]),
                              (expert, [expert_pb2.DESCRIPTOR.services_by_name["ExpertService"]]),
                              (predictor, [predictor_pb2.DESCRIPTOR.services_by_name["PredictorService"]])):
        for service in services:
            for method in service.methods:
                if method.client_streaming:
                    continue  # none of ours stream requests
                out.append((address, f"/{service.full_name}/{method.name}", method))
    return out


class Campaign:
    """Runs the cases and keeps the statistics."""

    def __init__(self, targets_: list, channels: dict[str, grpc.Channel]):
        self.targets = targets_
        self.channels = channels
        self.codes: Counter = Counter()
        self.by_method: dict[str, Counter] = {}
        self.cases = 0
        self.violation: dict | None = None

    def call(self, address: str, path: str, method: pbd.MethodDescriptor, request) -> grpc.StatusCode:
        raw = request if isinstance(request, bytes) else request.SerializeToString()
        channel = self.channels[address]
        try:
            if method.server_streaming:
                for _ in channel.unary_stream(path)(raw, timeout=TIMEOUT_S):
                    pass
            else:
                channel.unary_unary(path)(raw, timeout=TIMEOUT_S)
            return grpc.StatusCode.OK
        except grpc.RpcError as err:
            return err.code()

    def run_method(self, address: str, path: str, method: pbd.MethodDescriptor, cases: int, run_seed: int) -> None:
        valid = messages(method.input_type)
        counts = self.by_method.setdefault(path, Counter())

        @seed(run_seed)
        @settings(max_examples=cases, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(st.one_of(valid, mutated(valid)))
        def case(request):
            code = self.call(address, path, method, request)
            self.cases += 1
            self.codes[code.name] += 1
            counts[code.name] += 1
            allowed = ALLOWED | ALSO_ALLOWED.get(path, set())
            assert code in allowed, f"{path} answered {code.name}"

        try:
            case()
        except AssertionError as exc:
            # hypothesis re-raises with the shrunk example in its notes
            self.violation = {"method": path, "error": str(exc), "notes": getattr(exc, "__notes__", [])}


def valid_checks(gateway: str, expert: str, predictor: str, channels) -> dict:
    """Valid requests after the campaign: every service still answers them."""
    from moe_protos.moe.expert.v1 import expert_pb2_grpc
    from moe_protos.moe.gateway.v1 import gateway_pb2_grpc
    from moe_protos.moe.predictor.v1 import predictor_pb2_grpc

    reply = gateway_pb2_grpc.GatewayServiceStub(channels[gateway]).Generate(gateway_pb2.GenerateRequest(
        prompts=["still serving?"], parameters=gateway_pb2.GenerationParameters(max_new_tokens=3)), timeout=60)
    info = expert_pb2_grpc.ExpertServiceStub(channels[expert]).GetInfo(expert_pb2.GetInfoRequest(), timeout=10)
    status = predictor_pb2_grpc.PredictorServiceStub(channels[predictor]).GetStatus(predictor_pb2.GetStatusRequest(),
                                                                                     timeout=10)
    return {"generate": list(reply.generations[0].token_ids), "expert_model": info.model_id,
            "predictor": bool(status.ByteSize() >= 0)}


def run(a) -> dict:
    source = model_source.resolve(a.model, a.cache_dir)
    # Small limits keep valid requests cheap: the fuzzer is after bad ones.
    stack = start_stack(a.model, 1, cache_dir=a.cache_dir, predictor=True,
                        gateway_args=["--max-new-tokens-limit", "4", "--default-max-new-tokens", "4", "--max-input-tokens", "32",
                                      "--max-prompts-per-request", "4", "--join-timeout-s", "0.5",
                                      "--log-level", "WARNING"],
                        expert_args=["--replica-memory", "1MB", "--log-level", "WARNING"])
    port = serving.pick_free_port()
    spare = f"127.0.0.1:{port}"
    proc = spawn_expert_server(source.path, "127.0.0.1", port, ["--replica-memory", "1MB", "--log-level", "WARNING"])
    stack.processes.append(proc)
    out: dict = {"model": source.spec, "seed": a.seed}
    try:
        wait_ready(proc, spare, 120)
        addresses = [stack.gateway_address, spare, stack.predictor_address]
        channels = {x: grpc.insecure_channel(x, options=serving.message_options())
                    for x in [*addresses, stack.admin_address]}
        before = valid_checks(*addresses, channels)
        methods = targets(*addresses, stack.admin_address)
        per_method = max(1, a.cases // len(methods))
        campaign = Campaign(methods, channels)
        t0 = time.monotonic()
        rng = random.Random(a.seed)
        for i, (address, path, method) in enumerate(methods):
            campaign.run_method(address, path, method, per_method, rng.randrange(2**32))
            print(f"[{i + 1}/{len(methods)}] {path}: {dict(campaign.by_method[path])}", flush=True)
            if campaign.violation:
                break
        out["seconds"] = time.monotonic() - t0
        dead = [p.args[2] for p in stack.processes if p.poll() is not None]
        after = valid_checks(*addresses, channels) if not dead else None
        out.update(cases=campaign.cases, methods=len(methods), codes=dict(campaign.codes),
                   by_method={k: dict(v) for k, v in campaign.by_method.items()},
                   violation=campaign.violation, crashed=dead, still_serving=after == before)
    finally:
        stack.stop()
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    p.add_argument("--cases", type=int, default=2000, help="cases in all, spread over the RPCs")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    out = run(a)
    print(f"{out['cases']} cases over {out['methods']} RPCs in {out['seconds']:.0f} s: {out['codes']}", flush=True)
    print(f"crashed: {out['crashed'] or 'none'}; still serving valid requests as before: {out['still_serving']}",
          flush=True)
    if out["violation"]:
        print(f"VIOLATION: {out['violation']['error']}", flush=True)
        for note in out["violation"]["notes"]:
            print(f"  {note}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if not out["violation"] and not out["crashed"] and out["still_serving"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
