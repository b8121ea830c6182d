"""gRPC servicers of the gateway: the native moe.gateway.v1 API and the Open
Inference Protocol v2. Both only translate between protos and the Engine/Batcher."""

from __future__ import annotations

import logging
import math
import struct
import threading

import numpy as np

from gateway.batcher import Batcher, Job
from gateway.engine import Engine, Sampling
from gateway.metrics import METRICS
from moe_common import tracing
from moe_common.errors import Cancelled, InvalidArgument, NotFound
from moe_protos.inference import grpc_predict_v2_pb2 as oip
from moe_protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)


class Counters:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests_total = 0
        self.requests_failed = 0

    def count(self, failed: bool) -> None:
        with self.lock:
            self.requests_total += 1
            self.requests_failed += int(failed)


def _sampling_from_pb(p: gateway_pb2.GenerationParameters) -> Sampling:
    return Sampling(
        do_sample=p.do_sample,
        temperature=p.temperature if p.HasField("temperature") else 1.0,
        top_k=p.top_k if p.HasField("top_k") else 0,
        top_p=p.top_p if p.HasField("top_p") else 1.0,
        seed=p.seed if p.HasField("seed") else None,
    ).normalized()


def submit(batcher: Batcher, job: Job, context) -> None:
    """Queue a job for as long as its RPC lives: when the RPC ends (cancelled, deadline
    passed) the job is cancelled and its handler thread released."""
    job.request_id = tracing.current_request_id()  # set by the server's tracing interceptor
    if not context.add_callback(lambda: batcher.cancel(job)):
        # The RPC already ended (its deadline passed while it waited for a handler thread).
        raise Cancelled("the request ended before it was queued (cancelled, or its deadline passed)")
    batcher.submit(job)


class GatewayServicer(gateway_pb2_grpc.GatewayServiceServicer):
    def __init__(self, engine: Engine, batcher: Batcher, counters: Counters, membership=None, public: bool = False):
        self.engine = engine
        self.batcher = batcher
        self.counters = counters
        self.membership = membership
        # GetStatus without internal addresses (expert servers, predictor): what the
        # client port answers when clients are not the operators (GatewayConfig.public_status).
        self.public = public

    def _job(self, request: gateway_pb2.GenerateRequest, stream: bool) -> Job:
        e = self.engine
        e.check_model_name(request.model)
        p = request.parameters
        max_new = e.max_new_tokens(p.max_new_tokens if p.HasField("max_new_tokens") else None)
        prompts = e.prompt_ids(list(request.prompts), [list(t.ids) for t in request.token_ids])
        return Job(prompts=prompts, max_new_tokens=[max_new] * len(prompts), sampling=_sampling_from_pb(p), stream=stream)

    def Generate(self, request, context):
        failed = True
        try:
            job = self._job(request, stream=False)
            submit(self.batcher, job, context)
            results, timings = job.wait()
            METRICS.request_finished(job.prompts, results, timings)
            reply = gateway_pb2.GenerateResponse(timings=gateway_pb2.Timings(**timings))
            for prompt, r in zip(job.prompts, results):
                reply.generations.add(
                    text=self.engine.decode(r.token_ids), token_ids=r.token_ids,
                    num_input_tokens=len(prompt), finish_reason=r.finish_reason,
                )
            failed = False
            return reply
        finally:
            self.counters.count(failed)

    def GenerateStream(self, request, context):
        failed = True
        try:
            job = self._job(request, stream=True)
            submit(self.batcher, job, context)
            while True:
                kind, *rest = job.next_event()
                if kind == "token":
                    index, token, reason = rest
                    yield gateway_pb2.GenerateStreamResponse(
                        index=index, token_id=token, text=self.engine.decode([token]), finish_reason=reason or "",
                    )
                elif kind == "done":
                    results, timings = rest
                    METRICS.request_finished(job.prompts, results, timings)
                    # Prompts with max_new_tokens 0 produced no token: close them explicitly.
                    for index, r in enumerate(results):
                        if not r.token_ids:
                            yield gateway_pb2.GenerateStreamResponse(index=index, finish_reason=r.finish_reason)
                    yield gateway_pb2.GenerateStreamResponse(timings=gateway_pb2.Timings(**timings))
                    failed = False
                    return
                else:
                    raise rest[0]
        finally:
            self.counters.count(failed)

    def GetStatus(self, request, context):
        e = self.engine
        reply = gateway_pb2.GetStatusResponse(
            model_name=e.config.model_name, model_source=e.source.spec, model_id=e.source.model_id,
            num_experts=e.num_experts, requests_total=self.counters.requests_total,
            requests_failed=self.counters.requests_failed, wire_dtype=e.config.wire_dtype,
        )
        healthy = True
        view = e.clients.view  # one membership throughout the reply, whatever changes meanwhile
        tokens, compute = e.clients.tokens_per_server(view), e.clients.compute_per_server(view)
        with e.clients.replica_lock:
            suspects = set(view.suspect)
        for s, address in enumerate(view.addresses):
            status = reply.servers.add(address=address, num_home_experts=sum(row.count(s) for row in view.home),
                                       tokens=tokens[s], compute_ns=compute[s], suspect=s in suspects)
            try:
                info = e.clients.info(address, timeout_s=2.0)
                status.healthy = True
                status.weight_bytes = info.weight_bytes
                status.device = info.device
            except Exception:  # noqa: BLE001 - an unreachable server is reported, not raised
                status.healthy = False
                healthy = False
        reply.healthy = healthy
        if e.observer is not None and e.observer.address:
            c = e.observer.counters
            reply.predictor.CopyFrom(gateway_pb2.PredictorStatus(
                address=e.observer.address, forecasts_ok=c.ok, forecasts_late=c.late,
                forecasts_failed=c.failed, reports_failed=c.reports_failed))
        rep = dict(mode="off", policy=e.clients.policy, balancedness=e.clients.balancedness())
        if e.replicas is not None:
            rep = e.replicas.status()
        reply.replication.CopyFrom(gateway_pb2.ReplicationStatus(**rep, tokens_per_server=tokens))
        for layer, row in zip(e.layers, view.home):
            reply.placement.add(layer=layer.index, name=layer.name, home_server=row)
        st = e.clients.stats
        reply.expert_path.CopyFrom(gateway_pb2.ExpertPathStats(
            layer_calls=st.calls, rpcs=st.rpcs, tokens=st.tokens, bytes_sent=st.bytes_sent,
            bytes_received=st.bytes_received, forward_ns=e.forward_ns, dispatch_ns=st.dispatch_ns,
            rpc_wall_ns=st.rpc_wall_ns, compute_max_ns=st.server_compute_ns,
            compute_mean_ns=int(st.server_compute_mean_ns), gateway_codec_ns=st.gateway_codec_ns,
            server_codec_ns=st.server_codec_ns, load_mean_sum=st.sum_mean_load, load_max_sum=st.sum_max_load,
            suspects=st.suspects, stand_in_loads=st.stand_in_loads, bytes_shared=st.bytes_shared,
            decode_layer_calls=e.decode_calls.calls, decode_tokens=e.decode_calls.tokens))
        if self.membership is not None:
            reply.membership_changes.extend(change_message(c) for c in list(self.membership.changes))
            reply.membership_changes_total = self.membership.changes_total
        if self.public:
            for status in reply.servers:
                status.ClearField("address")
            reply.predictor.ClearField("address")
            for change in reply.membership_changes:
                del change.servers[:]
            reply.ClearField("model_source")  # a path on the gateway's host
        return reply


# ---------------------------------------------------------------------------
# Open Inference Protocol v2
# ---------------------------------------------------------------------------

SERVER_NAME = "moe-gateway"
SERVER_VERSION = "0.1.0"
MODEL_VERSION = "1"
_INPUTS = {  # name -> (datatype, shape)
    "text_input": ("BYTES", [-1]),
    "input_ids": ("INT64", [-1, -1]),
    "max_tokens": ("INT32", [-1]),
}
_OUTPUTS = {"text_output": ("BYTES", [-1]), "output_ids": ("INT64", [-1, -1])}


def _deserialize_bytes(raw: bytes) -> list[bytes]:
    """OIP BYTES tensor: each element is a 4-byte little-endian length, then the bytes."""
    out, pos = [], 0
    while pos < len(raw):
        if pos + 4 > len(raw):
            raise InvalidArgument("BYTES tensor is truncated (a 4-byte length prefix is cut off)")
        (n,) = struct.unpack_from("<I", raw, pos)
        pos += 4
        if pos + n > len(raw):
            raise InvalidArgument(f"BYTES tensor is truncated: element of {n} bytes runs past the end")
        out.append(raw[pos: pos + n])
        pos += n
    return out


def _serialize_bytes(items: list[bytes]) -> bytes:
    return b"".join(struct.pack("<I", len(x)) + x for x in items)


def _param(params, name: str, types: tuple[type, ...], default):
    """A request parameter of one of `types` (bool is not an int here), or default when absent."""
    if name not in params:
        return default
    which = params[name].WhichOneof("parameter_choice")
    value = getattr(params[name], which) if which else default
    if isinstance(value, bool) != (bool in types) or not isinstance(value, types):
        wanted = " or ".join(t.__name__ for t in types)
        raise InvalidArgument(f"parameter {name!r} must be {wanted}, got {type(value).__name__} {value!r}")
    return value


def _input_array(request, index: int, tensor) -> np.ndarray | list[bytes]:
    """One input tensor of a ModelInferRequest as a numpy array (or list of bytes)."""
    shape = list(tensor.shape)
    if any(d < 0 for d in shape):
        raise InvalidArgument(f"input {tensor.name!r} has a negative dimension in shape {shape}")
    count = math.prod(shape)
    expected = _INPUTS[tensor.name][0]
    if tensor.datatype != expected:
        raise InvalidArgument(f"input {tensor.name!r} must have datatype {expected}, got {tensor.datatype!r}")
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidArgument("raw_input_contents must hold one entry per input")
        raw = request.raw_input_contents[index]
        if tensor.datatype == "BYTES":
            values = _deserialize_bytes(raw)
        else:
            dtype = np.dtype("<i8") if tensor.datatype == "INT64" else np.dtype("<i4")
            if len(raw) != count * dtype.itemsize:
                raise InvalidArgument(f"input {tensor.name!r} of shape {shape} needs {count * dtype.itemsize} bytes, got {len(raw)}")
            values = np.frombuffer(raw, dtype=dtype)
    else:
        c = tensor.contents
        values = {"BYTES": list(c.bytes_contents), "INT64": np.array(c.int64_contents, dtype=np.int64),
                  "INT32": np.array(c.int_contents, dtype=np.int32)}[tensor.datatype]
    if len(values) != count:
        raise InvalidArgument(f"input {tensor.name!r} has shape {shape} but {len(values)} elements")
    if tensor.datatype == "BYTES":
        return values
    return np.asarray(values).reshape(shape)


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService for one text-generation model."""

    def __init__(self, engine: Engine, batcher: Batcher, counters: Counters):
        self.engine = engine
        self.batcher = batcher
        self.counters = counters

    def _check_model(self, name: str, version: str = "") -> None:
        if name != self.engine.config.model_name:
            raise NotFound(f"model {name!r} is not served here; this server serves {self.engine.config.model_name!r}")
        if version not in ("", MODEL_VERSION):
            raise NotFound(f"model {name!r} has no version {version!r}; it has version {MODEL_VERSION!r}")

    def _ready(self) -> bool:
        try:
            for address in self.engine.clients.view.addresses:
                self.engine.clients.info(address, timeout_s=1.0)
            return True
        except Exception:  # noqa: BLE001 - not ready
            return False

    def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=self._ready())

    def ModelReady(self, request, context):
        self._check_model(request.name, request.version)
        return oip.ModelReadyResponse(ready=self._ready())

    def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=SERVER_VERSION, extensions=[])

    def ModelMetadata(self, request, context):
        self._check_model(request.name, request.version)
        reply = oip.ModelMetadataResponse(name=request.name, versions=[MODEL_VERSION], platform="switch_transformers")
        for name, (dt, shape) in _INPUTS.items():
            reply.inputs.add(name=name, datatype=dt, shape=shape)
        for name, (dt, shape) in _OUTPUTS.items():
            reply.outputs.add(name=name, datatype=dt, shape=shape)
        return reply

    def ModelInfer(self, request, context):
        failed = True
        try:
            reply = self._infer(request, context)
            failed = False
            return reply
        finally:
            self.counters.count(failed)

    def _infer(self, request, context):
        e = self.engine
        self._check_model(request.model_name, request.model_version)
        arrays = {}
        for i, tensor in enumerate(request.inputs):
            if tensor.name not in _INPUTS:
                raise InvalidArgument(f"unknown input {tensor.name!r}; inputs are {sorted(_INPUTS)}")
            if tensor.name in arrays:
                raise InvalidArgument(f"input {tensor.name!r} is given twice")
            arrays[tensor.name] = _input_array(request, i, tensor)
        if ("text_input" in arrays) == ("input_ids" in arrays):
            raise InvalidArgument("give exactly one of the inputs text_input (BYTES [B]) and input_ids (INT64 [B, S])")
        if "text_input" in arrays:
            try:
                texts = [b.decode("utf-8") for b in arrays["text_input"]]
            except UnicodeDecodeError as exc:
                raise InvalidArgument(f"text_input is not UTF-8: {exc}") from None
            prompts = e.prompt_ids(texts, [])
        else:
            ids = arrays["input_ids"]
            if ids.ndim != 2:
                raise InvalidArgument(f"input_ids must have shape [B, S], got {list(ids.shape)}")
            # Rows are right-padded with the pad token; strip it.
            rows = []
            for row in ids.tolist():
                while row and row[-1] == e.pad_token_id:
                    row.pop()
                rows.append(row)
            prompts = e.prompt_ids([], rows)
        if "max_tokens" in arrays:
            if arrays["max_tokens"].ndim != 1:
                raise InvalidArgument(f"max_tokens must have shape [1] or [B], got {list(arrays['max_tokens'].shape)}")
            mt = arrays["max_tokens"].tolist()
            if len(mt) not in (1, len(prompts)):
                raise InvalidArgument(f"max_tokens must have shape [1] or [{len(prompts)}], got [{len(mt)}]")
            limits = [e.max_new_tokens(int(x), "max_tokens") for x in (mt * len(prompts) if len(mt) == 1 else mt)]
        else:
            limits = [e.max_new_tokens(None)] * len(prompts)
        params = request.parameters
        seed = _param(params, "seed", (int,), None)
        sampling = Sampling(
            do_sample=_param(params, "do_sample", (bool,), False),
            temperature=float(_param(params, "temperature", (float, int), 1.0)),
            top_k=_param(params, "top_k", (int,), 0),
            top_p=float(_param(params, "top_p", (float, int), 1.0)),
            seed=seed,
        ).normalized()
        wanted = [o.name for o in request.outputs] or list(_OUTPUTS)
        unknown = [n for n in wanted if n not in _OUTPUTS]
        if unknown:
            raise InvalidArgument(f"unknown outputs {unknown}; outputs are {sorted(_OUTPUTS)}")

        job = Job(prompts=prompts, max_new_tokens=limits, sampling=sampling)
        submit(self.batcher, job, context)
        results, timings = job.wait()
        METRICS.request_finished(job.prompts, results, timings)
        reply = oip.ModelInferResponse(model_name=request.model_name, model_version=MODEL_VERSION,
                                       id=request.id or tracing.current_request_id())
        for name in wanted:
            if name == "text_output":
                texts = [e.decode(r.token_ids).encode("utf-8") for r in results]
                reply.outputs.add(name=name, datatype="BYTES", shape=[len(results)])
                reply.raw_output_contents.append(_serialize_bytes(texts))
            else:
                width = max((len(r.token_ids) for r in results), default=0)
                out = np.full((len(results), width), -1, dtype="<i8")
                for i, r in enumerate(results):
                    out[i, : len(r.token_ids)] = r.token_ids
                reply.outputs.add(name=name, datatype="INT64", shape=list(out.shape))
                reply.raw_output_contents.append(out.tobytes())
        return reply


# ---------------------------------------------------------------------------
# Membership (expert servers joining and leaving)
# ---------------------------------------------------------------------------


def change_message(change) -> gateway_pb2.MembershipChange:
    return gateway_pb2.MembershipChange(servers=change.servers, experts_moved=change.experts_moved,
                                        load_s=change.load_s, drain_s=change.drain_s, total_s=change.total_s)


class MembershipServicer(gateway_pb2_grpc.MembershipServiceServicer):
    def __init__(self, membership):
        self.membership = membership

    def AddExpertServer(self, request, context):
        return change_message(self.membership.add(request.address))

    def RemoveExpertServer(self, request, context):
        return change_message(self.membership.remove(request.address.strip(), graceful=True))
