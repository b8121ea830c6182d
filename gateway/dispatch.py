"""Dispatch of routed tokens to expert servers, and the module that stands in for
HF's experts inside the gateway's model.

Glossary: a *logical expert* is expert e of sparse layer l; its *home server* holds
it under the placement ``home[l][e]``. For every sparse layer the model's own router
(HF code, untouched) picks each token's expert and drops tokens over capacity;
``RemoteExperts`` receives exactly what HF's ``SwitchTransformersExperts`` would,
sends each expert's tokens to its home server or to ready replicas (by the dispatch
policy of gateway/replication.py; all servers at once) and combines the outputs with
the same ops HF uses.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from gateway.connections import Connections, ExpertsMissing, call_result
from gateway.dispatch_stats import DispatchStats, LayerCall
from gateway.replication import assign_layer
from moe_common import tensor_codec
from moe_common.errors import MoEError, Unavailable
from moe_common.tls import PLAINTEXT, TlsConfig
from moe_protos.moe.expert.v1 import expert_pb2

log = logging.getLogger(__name__)


@dataclass(eq=False)
class ServerView:
    """One membership of the expert servers: who they are, the home placement among them
    and the replicas planned and ready on them. Server indices (home[l][e], ready[s],
    the s of planned (layer, expert, s)) index `addresses`.

    A membership change (gateway/membership.py) builds a new view and swaps it in; a
    layer call (or a replica plan being sent) keeps the view it started with, and
    `inflight` counts those users so that the old view can be drained before its
    servers drop experts and their channels close.
    """

    addresses: list[str]
    stubs: list
    home: list[list[int]]
    slots: list[int]  # replica slots of each server
    ready: list[set] = field(default_factory=list)  # ready[s]: {(layer, expert)} confirmed loaded on s
    planned: set = field(default_factory=set)  # {(layer, expert, server)} the current plan wants
    replica_sequence: list[int] = field(default_factory=list)  # a reply counts only if it answers the newest call
    synced: set = field(default_factory=set)  # servers sent a replica set under this view
    inflight: int = 0

    def __post_init__(self):
        self.ready = self.ready or [set() for _ in self.addresses]
        self.replica_sequence = self.replica_sequence or [0] * len(self.addresses)

    def experts_of(self, server: int) -> list[tuple[int, int]]:
        return [(layer, e) for layer, row in enumerate(self.home) for e, h in enumerate(row) if h == server]


class ExpertClients:
    """The current ServerView and the calls that use it: expert sets (AssignExperts,
    SetReplicas) and running a layer. Channels live in `connections`
    (gateway/connections.py), counters in `stats` (gateway/dispatch_stats.py).

    Dispatch uses home servers and ready replicas only, so it never waits for a replica.
    """

    def __init__(self, addresses: list[str], home: list[list[int]], model_id: str,
                 wire_dtype: str = "float32", timeout_s: float = 60.0, policy: str = "whole",
                 tls: TlsConfig = PLAINTEXT):
        if wire_dtype not in tensor_codec.WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {sorted(tensor_codec.WIRE_DTYPES)}")
        self.model_id = model_id
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s
        self.connections = Connections(tls)
        self.stats = DispatchStats()
        self.policy = policy
        # Guards the view's ready/planned between the batcher thread and SetReplicas
        # callbacks, and the swap of views.
        self.replica_lock = threading.Lock()
        self._drained = threading.Condition(self.replica_lock)
        self.view = self.make_view(addresses, home, [0] * len(addresses))

    # ---- views ----

    def stub(self, address: str):
        """The stub of a member, opening its channel on first use."""
        return self.connections.stub(address)

    def make_view(self, addresses: list[str], home: list[list[int]], slots: list[int]) -> ServerView:
        return ServerView(list(addresses), [self.stub(a) for a in addresses], home, list(slots))

    def swap(self, view: ServerView) -> ServerView:
        """Make `view` current; returns the previous one. Layer calls already running
        finish on the previous view (wait_drained)."""
        with self.replica_lock:
            old, self.view = self.view, view
        return old

    @contextlib.contextmanager
    def using_view(self) -> Iterator[ServerView]:
        """The current view, counted in flight while the block runs: a membership change
        waits for it before its servers drop experts or their channels close."""
        with self.replica_lock:
            view = self.view
            view.inflight += 1
        try:
            yield view
        finally:
            with self._drained:
                view.inflight -= 1
                self._drained.notify_all()

    def wait_drained(self, view: ServerView, timeout_s: float) -> bool:
        """Wait until no layer call runs on `view`; False on timeout."""
        with self._drained:
            return self._drained.wait_for(lambda: view.inflight == 0, timeout=timeout_s)

    def retain_members(self) -> None:
        """Close channels and forget per-server figures of every non-member."""
        addresses = self.view.addresses
        self.connections.retain(addresses)
        self.stats.retain(addresses)

    @property
    def addresses(self) -> list[str]:
        return self.view.addresses

    @property
    def home(self) -> list[list[int]]:
        return self.view.home

    def tokens_per_server(self, view: ServerView | None = None) -> list[int]:
        """Tokens each server of `view` (default: the current one) computed so far, in view order."""
        return self.stats.tokens_of((view or self.view).addresses)

    def compute_per_server(self, view: ServerView | None = None) -> list[int]:
        """Expert compute (ns) each server of `view` reported so far, in view order."""
        return self.stats.compute_of((view or self.view).addresses)

    def balancedness(self) -> float:
        return self.stats.balancedness()

    def add_dispatch_time(self, ns: int) -> None:
        self.stats.add_dispatch_time(ns)

    def close(self) -> None:
        self.connections.close_all()

    # ---- expert sets ----

    def assign_experts(self, address: str, experts, timeout_s: float) -> None:
        """Tell a server to hold exactly these home experts (it loads the missing ones)."""
        self.assign_many({address: experts}, timeout_s)

    def assign_many(self, experts: dict[str, object], timeout_s: float) -> None:
        """AssignExperts on several servers at once (address -> its (layer, expert) keys);
        waits for all, then raises the first failure."""
        calls = [(address, self.stub(address).AssignExperts.future(expert_pb2.AssignExpertsRequest(
                     experts=[expert_pb2.ExpertRef(layer=layer, expert=e) for layer, e in sorted(keys)],
                     model_id=self.model_id), timeout=timeout_s))
                 for address, keys in experts.items()]
        errors = []
        for address, call in calls:
            try:
                call_result(address, call)
            except MoEError as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def assign_home_experts(self, timeout_s: float = 600.0) -> None:
        """Tell every server to hold exactly the experts it is home to (loads them)."""
        view = self.view
        self.assign_many({a: view.experts_of(s) for s, a in enumerate(view.addresses)}, timeout_s)

    def clear_replicas(self) -> None:
        """Drop every replica on every server (start from home placement)."""
        view = self.view
        calls = [(a, self.stub(a).SetReplicas.future(expert_pb2.SetReplicasRequest(model_id=self.model_id),
                                                     timeout=self.timeout_s)) for a in view.addresses]
        for address, call in calls:
            call_result(address, call)
        with self.replica_lock:
            view.ready = [set() for _ in view.addresses]
            view.planned = set()
            view.synced = set(range(len(view.addresses)))

    def info(self, address: str, timeout_s: float = 2.0) -> expert_pb2.GetInfoResponse:
        """GetInfo of any server: a member's channel, or a short-lived one for others."""
        with self.connections.stub_for_call(address) as stub:
            return call_result(address, stub.GetInfo.future(expert_pb2.GetInfoRequest(), timeout=timeout_s))

    def reassign(self, view: ServerView, server: int) -> None:
        """Give a server that lost its experts (a restart) its home experts again. Its
        replicas are gone too: stop using them (the next plan may send them again)."""
        address = view.addresses[server]
        log.warning("re-assigning home experts to expert server %s", address)
        with self.replica_lock:
            view.ready[server] = set()
            view.planned = {r for r in view.planned if r[2] != server}
            view.replica_sequence[server] += 1  # ignore replies of SetReplicas sent before the restart
            view.synced.discard(server)  # and send it its replica set again
        self.assign_experts(address, view.experts_of(server), self.timeout_s)

    # ---- running a layer ----

    def run_layer(self, layer: int, hidden: torch.Tensor, token_lists: list[tuple[int, torch.Tensor]]
                  ) -> dict[int, torch.Tensor]:
        """Run one sparse layer's experts remotely, on the current view's servers.

        hidden: [N, d_model]; token_lists: [(expert, token indices [n_e])] with n_e > 0.
        Returns {expert: outputs [n_e, d_model]} (not yet scaled by router probabilities).
        """
        with self.using_view() as view:
            return self._run_layer(view, layer, hidden, token_lists, reassigned=frozenset())

    def _run_layer(self, view: ServerView, layer: int, hidden: torch.Tensor,
                   token_lists: list[tuple[int, torch.Tensor]], reassigned: frozenset) -> dict[int, torch.Tensor]:
        """`reassigned`: servers this call already gave their experts back (each once)."""
        t0 = time.perf_counter_ns()
        by_server = self._assign(view, layer, token_lists)
        requests, calls = {}, {}
        for server, items in by_server.items():
            rows = torch.cat([hidden[tokens] for _, tokens in items])  # [n_server, d_model]
            requests[server] = expert_pb2.RunExpertsRequest(
                layer=layer,
                groups=[expert_pb2.ExpertGroup(expert=e, num_tokens=len(t)) for e, t in items],
                hidden_states=tensor_codec.encode(rows, self.wire_dtype),
                model_id=self.model_id,
            )
            # Sent at once: this server computes while the next request is encoded.
            calls[server] = view.stubs[server].RunExperts.future(requests[server], timeout=self.timeout_s)
        sent = sum(len(r.hidden_states.data) for r in requests.values())
        t_sent = time.perf_counter_ns()
        outputs: dict[int, list[tuple[int, torch.Tensor]]] = {}  # expert -> [(first token, rows)]
        codec = received = decode_ns = 0
        compute_of: dict[int, int] = {}
        missing: list[int] = []  # servers that answered they lost experts (restarted)
        try:
            for server, call in calls.items():
                try:
                    reply = call_result(view.addresses[server], call)
                except ExpertsMissing as exc:
                    if server in reassigned:
                        raise Unavailable(f"{exc} (again, after its experts were re-assigned)") from None
                    missing.append(server)
                    continue
                if missing:
                    continue  # the layer runs again anyway: only wait to learn who else restarted
                compute_of[server] = reply.compute_ns
                codec = max(codec, reply.codec_ns)
                received += len(reply.outputs.data)
                td = time.perf_counter_ns()
                out = tensor_codec.decode(reply.outputs).to(hidden.dtype)
                decode_ns += time.perf_counter_ns() - td
                start = 0
                for expert, tokens in by_server[server]:
                    outputs.setdefault(expert, []).append((int(tokens[0]), out[start:start + len(tokens)]))
                    start += len(tokens)
        except BaseException:
            for call in calls.values():
                call.cancel()  # the layer failed: do not leave the other servers computing for nobody
            raise
        if missing:
            # Restarted servers come back empty (or a replica was evicted just before the
            # call): give each its home experts again and run the layer once more without
            # their replicas. Every server is re-assigned at most once per layer call.
            for server in missing:
                self.reassign(view, server)
            return self._run_layer(view, layer, hidden, token_lists, reassigned | frozenset(missing))
        t1 = time.perf_counter_ns()
        loads = [sum(len(t) for _, t in by_server.get(s, [])) for s in range(len(view.addresses))]
        if log.isEnabledFor(logging.DEBUG):
            log.debug("layer %d: tokens per server %s", layer, loads)
        with self.replica_lock:
            planned = [(e, s) for (pl, e, s) in view.planned if pl == layer]
            ready_hits = sum((layer, e) in view.ready[s] for e, s in planned)
        self.stats.record(LayerCall(
            addresses=view.addresses, loads=loads, compute_ns=compute_of, codec_ns=codec,
            tokens=sum(len(t) for _, t in token_lists), rpcs=len(calls), bytes_sent=sent, bytes_received=received,
            wall_ns=t1 - t0, gateway_codec_ns=(t_sent - t0) + decode_ns,
            replica_tokens=sum(len(t) for s, items in by_server.items() for e, t in items if view.home[layer][e] != s),
            planned_checks=len(planned), planned_ready=ready_hits))
        # An expert split over servers comes back in chunks: join them in token order.
        return {e: torch.cat([o for _, o in sorted(parts, key=lambda x: x[0])]) if len(parts) > 1 else parts[0][1]
                for e, parts in outputs.items()}

    def _assign(self, view: ServerView, layer: int,
                token_lists: list[tuple[int, torch.Tensor]]) -> dict[int, list[tuple[int, torch.Tensor]]]:
        """Server -> [(expert, token indices)] for one layer: home servers and ready replicas,
        by the dispatch policy (gateway/replication.py)."""
        with self.replica_lock:
            ready = [set(keys) for keys in view.ready] if view.planned else None
        if ready is None:  # no replicas: every expert to its home server
            by_server: dict[int, list[tuple[int, torch.Tensor]]] = {}
            for expert, tokens in token_lists:
                by_server.setdefault(view.home[layer][expert], []).append((expert, tokens))
            return by_server
        num_experts = len(view.home[layer])
        counts = [0] * num_experts
        for expert, tokens in token_lists:
            counts[expert] = len(tokens)
        holders = [[view.home[layer][e]] for e in range(num_experts)]
        for s, keys in enumerate(ready):
            for (pl, e) in keys:
                if pl == layer and s != holders[e][0]:
                    holders[e].append(s)
        chunks = assign_layer(counts, holders, len(view.addresses), self.policy)
        by_server = {}
        for expert, tokens in token_lists:
            start = 0
            for s, n in chunks[expert]:
                by_server.setdefault(s, []).append((expert, tokens[start:start + n]))  # contiguous run
                start += n
        return by_server


class RemoteExperts(nn.Module):
    """Drop-in for HF's SwitchTransformersExperts of one sparse layer; holds no weights."""

    def __init__(self, layer: int, clients: ExpertClients | None = None):
        super().__init__()
        self.layer = layer
        self.clients = clients

    def forward(self, hidden_states: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, d_model]; selected_experts [N, 1, E] one-hot, all-zero for
        tokens dropped over capacity; routing_weights [N, 1] top-1 router probability.
        Returns [N, d_model]: zero for dropped tokens, else expert(x) * probability."""
        if self.clients is None:
            raise RuntimeError("RemoteExperts used before the gateway connected it to expert servers")
        t0 = time.perf_counter_ns()
        final = torch.zeros_like(hidden_states)
        # [E, 1, N] as in HF; experts in ascending order, tokens in ascending order.
        expert_mask = selected_experts.permute(2, 1, 0)
        expert_hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
        token_lists = []
        for expert_idx in expert_hit.flatten().tolist():
            _, top_x = torch.where(expert_mask[expert_idx])
            token_lists.append((expert_idx, top_x))
        if token_lists:
            outputs = self.clients.run_layer(self.layer, hidden_states, token_lists)
            for expert_idx, top_x in token_lists:
                # Same ops and order as SwitchTransformersExperts.forward.
                scaled = outputs[expert_idx] * routing_weights[top_x, 0, None]
                final.index_add_(0, top_x, scaled.to(hidden_states.dtype))
        self.clients.add_dispatch_time(time.perf_counter_ns() - t0)
        return final
