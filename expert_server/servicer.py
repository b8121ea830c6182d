"""gRPC servicer of moe.expert.v1.ExpertService: decode, call the ExpertStore, encode."""

from __future__ import annotations

import threading
import time

import torch

from expert_server.experts import ExpertStore
from expert_server.metrics import METRICS
from moe_common import hardware, shm, tensor_codec
from moe_common.errors import FailedPrecondition, InvalidArgument, MoEError
from moe_common.integrity import expert_digest
from moe_common.serving import message_options
from moe_common.tls import PLAINTEXT, TlsConfig
from moe_protos.moe.expert.v1 import expert_pb2, expert_pb2_grpc


class ExpertServicer(expert_pb2_grpc.ExpertServiceServicer):
    def __init__(self, store: ExpertStore, tls: TlsConfig = PLAINTEXT, load_delay_s: float = 0.0,
                 shared_memory: bool = True):
        self.store = store
        self.tls = tls
        # Segments of same-host callers (moe_common/shm.py); None: --no-shared-memory.
        self.segments = shm.SegmentCache() if shared_memory else None
        self.load_delay_s = load_delay_s  # ExpertServerConfig.simulate_load_delay_s
        self.draining = threading.Event()  # set on shutdown (expert_server/server.py)
        # The local lane offered to same-host callers that attach (expert_server/lane.py); set by ExpertServer.
        self.lane = None
        # The gateway's members, as its last AssignExperts named them: the only addresses
        # SetReplicas may make this server dial (FetchExpert), so a caller cannot point it
        # at an arbitrary host. Empty until a gateway announces them: no fetches until then.
        self.members: frozenset[str] = frozenset()
        # Which hardware this server takes turns on with others (GetInfo; the gateway's planner).
        device = str(store.device)
        self.compute_domain = hardware.compute_domain(device)
        self.compute_share = hardware.compute_share(device, torch.get_num_threads())

    def RunExperts(self, request, context):
        self.store.check_model(request.model_id)
        t0 = time.perf_counter_ns()
        shared = request.HasField("shared")
        hidden = self._shared_region(request) if shared else tensor_codec.decode(request.hidden_states)
        t1 = time.perf_counter_ns()
        out = self.store.run(request.layer, [(g.expert, g.num_tokens) for g in request.groups], hidden)
        t2 = time.perf_counter_ns()
        METRICS.run_done(request.layer, request.groups, t2 - t1)
        wire = tensor_codec.wire_dtype_name(request.hidden_states.dtype)
        if shared:
            hidden.copy_(out)  # outputs over the inputs: the caller reads them where it wrote
            reply = expert_pb2.RunExpertsResponse(outputs=tensor_codec.header(out, wire), outputs_shared=True)
        else:
            reply = expert_pb2.RunExpertsResponse(outputs=tensor_codec.encode(out, wire))
        reply.compute_ns = t2 - t1
        reply.codec_ns = (t1 - t0) + (time.perf_counter_ns() - t2)
        return reply

    def _shared_region(self, request):
        """The request's hidden states [tokens, d_model], viewed in the caller's segment."""
        dtype, shape = tensor_codec.decode_header(request.hidden_states)
        if self.segments is None:
            raise FailedPrecondition(f"{shm.UNREACHABLE}: this server runs with --no-shared-memory")
        segment = self.segments.get(request.shared.segment)
        return segment.tensor(request.shared.offset, dtype, shape)

    def AttachSharedMemory(self, request, context):
        if self.segments is None:
            return expert_pb2.AttachSharedMemoryResponse(reason="this server runs with --no-shared-memory")
        try:
            shm.check_name(request.segment)
            segment = shm.Segment.open(request.segment)
        except MoEError as exc:
            return expert_pb2.AttachSharedMemoryResponse(reason=str(exc))
        if not request.nonce or bytes(segment.buf[:len(request.nonce)]) != request.nonce:
            return expert_pb2.AttachSharedMemoryResponse(
                reason=f"segment {request.segment} here does not hold the caller's nonce: another host's /dev/shm")
        if self.lane is None:
            return expert_pb2.AttachSharedMemoryResponse(attached=True)
        return expert_pb2.AttachSharedMemoryResponse(attached=True, lane=self.lane.name, lane_token=self.lane.token)

    def AssignExperts(self, request, context):
        self.store.check_model(request.model_id)
        experts = [(r.layer, r.expert) for r in request.experts]
        if request.members:
            self.members = frozenset(request.members)
        if self.load_delay_s and not set(experts) <= set(self.store.held()):
            time.sleep(self.load_delay_s)
        loaded, dropped = self.store.assign(experts)
        return expert_pb2.AssignExpertsResponse(loaded=loaded, dropped=dropped, weight_bytes=self.store.weight_bytes())

    def SetReplicas(self, request, context):
        self.store.check_model(request.model_id)
        wanted = [(r.layer, r.expert) for r in request.replicas]
        if request.home_addresses and len(request.home_addresses) != len(wanted):
            raise InvalidArgument(f"{len(request.home_addresses)} home addresses for {len(wanted)} replicas")
        # Only current members are dialled; a replica named with another source is loaded
        # from the checkpoint or refused, never fetched from it.
        members = self.members
        sources = {k: a for k, a in zip(wanted, request.home_addresses) if a and a in members}
        if self.load_delay_s and not set(wanted) <= set(self.store.held()):
            time.sleep(self.load_delay_s)
        t0 = time.perf_counter()
        refused, loaded = self.store.set_replicas(wanted, sources, self._fetch)
        METRICS.replicas_loaded(loaded, time.perf_counter() - t0)
        return expert_pb2.SetReplicasResponse(
            ready=[expert_pb2.ExpertRef(layer=layer, expert=e) for layer, e in self.store.replicas()],
            failed=[expert_pb2.ReplicaFailure(expert=expert_pb2.ExpertRef(layer=k[0], expert=k[1]), reason=why)
                    for k, why in refused],
            replica_bytes=self.store.replica_bytes(), bytes_loaded=loaded,
        )

    def FetchExpert(self, request, context):
        self.store.check_model(request.model_id)
        wi, wo = self.store.weights_of((request.expert.layer, request.expert.expert))
        wire = str(self.store.dtype).removeprefix("torch.")
        for name, w in (("wi", wi), ("wo", wo)):
            yield expert_pb2.ExpertWeight(name=name, weight=tensor_codec.encode(w, wire))

    def _fetch(self, key: tuple[int, int], address: str):
        """Stream one expert's weights from the server at `address` (its home server)."""
        with self.tls.channel(address, options=message_options()) as channel:
            stub = expert_pb2_grpc.ExpertServiceStub(channel)
            request = expert_pb2.FetchExpertRequest(expert=expert_pb2.ExpertRef(layer=key[0], expert=key[1]),
                                                    model_id=self.store.source.model_id)
            got = {m.name: tensor_codec.decode(m.weight).clone() for m in stub.FetchExpert(request, timeout=120)}
        if set(got) != {"wi", "wo"}:
            raise InvalidArgument(f"{address} sent weights {sorted(got)}, expected wi and wo")
        return got["wi"], got["wo"]

    def GetExpertDigests(self, request, context):
        self.store.check_model(request.model_id)
        reply = expert_pb2.GetExpertDigestsResponse(dtype=str(self.store.dtype).removeprefix("torch."))
        for ref in request.experts:
            wi, wo = self.store.weights_of((ref.layer, ref.expert))  # NOT_FOUND when not held
            reply.digests.add(expert=ref, sha256=expert_digest(wi, wo))
        return reply

    def GetInfo(self, request, context):
        s = self.store
        return expert_pb2.GetInfoResponse(
            model_id=s.source.model_id,
            model_source=s.source.spec,
            d_model=s.d_model,
            num_sparse_layers=len(s.layers),
            num_experts=s.num_experts,
            experts=[expert_pb2.ExpertRef(layer=layer, expert=e) for layer, e in s.held()],
            weight_bytes=s.weight_bytes(),
            device=str(s.device),
            dtype=str(s.dtype).removeprefix("torch."),
            replica_memory=s.replica_memory,
            replica_slots=s.replica_slots,
            replicas=[expert_pb2.ExpertRef(layer=layer, expert=e) for layer, e in s.replicas()],
            draining=self.draining.is_set(),
            compute_domain=self.compute_domain,
            compute_share=self.compute_share,
        )
