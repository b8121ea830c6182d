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

import logging
import time
from dataclasses import dataclass, field
from typing import Callable

import grpc
import torch
from torch import nn

from gateway.connections import Connections, ExpertsMissing, SharedMemoryUnreachable, call_result
from gateway.dispatch_stats import DispatchStats, LayerCall
from gateway.metrics import METRICS
from gateway.replication import assign_layer, choose_stand_ins
from gateway.transport import Transport
from gateway.views import ServerView, Views
from moe_common import tensor_codec, tracing
from moe_common.errors import MoEError, Unavailable
from moe_common.tls import PLAINTEXT, TlsConfig
from moe_protos.moe.expert.v1 import expert_pb2

log = logging.getLogger(__name__)


class ExpertClients:
    """The current ServerView and the calls that use it: expert sets (AssignExperts,
    SetReplicas) and running a layer. Channels live in `connections`
    (gateway/connections.py), counters in `stats` (gateway/dispatch_stats.py), how
    hidden states move (bytes or shared memory) in `transport` (gateway/transport.py).

    Dispatch uses home servers and ready replicas only, so it never waits for a replica.
    """

    def __init__(self, addresses: list[str], home: list[list[int]], model_id: str,
                 wire_dtype: str = "float32", timeout_s: float = 60.0, policy: str = "whole",
                 tls: TlsConfig = PLAINTEXT, transport: str = "auto"):
        if wire_dtype not in tensor_codec.WIRE_DTYPES:
            raise ValueError(f"wire dtype must be one of {sorted(tensor_codec.WIRE_DTYPES)}")
        self.model_id = model_id
        self.wire_dtype = wire_dtype
        self.timeout_s = timeout_s
        self.connections = Connections(tls)
        self.transport = Transport(transport)
        self.stats = DispatchStats()
        self.policy = policy
        self.group_cost = 0.0  # tokens' worth of one expert group (GatewayConfig.replica_group_cost)
        self.views = Views(self.make_view(addresses, home, [0] * len(addresses)))
        # Guards the view's ready/planned/suspect/standins (gateway/views.py).
        self.replica_lock = self.views.lock

    # ---- views ----

    def stub(self, address: str):
        """The stub of a member, opening its channel on first use."""
        return self.connections.stub(address)

    def make_view(self, addresses: list[str], home: list[list[int]], slots: list[int]) -> ServerView:
        return ServerView(list(addresses), [self.stub(a) for a in addresses], home, list(slots),
                          run_stubs=[self.connections.plain_stub(a) for a in addresses])

    @property
    def view(self) -> ServerView:
        return self.views.current

    def swap(self, view: ServerView) -> ServerView:
        """Make `view` current; returns the previous one. Layer calls already running
        finish on the previous view (wait_drained)."""
        return self.views.swap(view)

    def using_view(self):
        """The current view, counted in flight while the block runs: a membership change
        waits for it before its servers drop experts or their channels close."""
        return self.views.using()

    def wait_drained(self, view: ServerView, timeout_s: float) -> bool:
        """Wait until no layer call runs on `view`; False on timeout."""
        return self.views.wait_drained(view, timeout_s)

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
        self.transport.close()

    # ---- expert sets ----

    def assign_experts(self, address: str, experts, timeout_s: float) -> None:
        """Tell a server to hold exactly these home experts (it loads the missing ones)."""
        self.assign_many({address: experts}, timeout_s)

    def assign_many(self, experts: dict[str, object], timeout_s: float, members: list[str] | None = None) -> int:
        """AssignExperts on several servers at once (address -> its (layer, expert) keys);
        waits for all, then raises the first failure. Returns how many experts were loaded
        (the others were held already: a call is idempotent). members: the membership to
        announce (the only addresses servers fetch replicas from); default the current one."""
        loaded, errors = self.assign_each(experts, timeout_s, members)
        if errors:
            raise next(iter(errors.values()))
        return loaded

    def assign_each(self, experts: dict[str, object], timeout_s: float,
                    members: list[str] | None = None) -> tuple[int, dict[str, MoEError]]:
        """AssignExperts on several servers at once; returns (experts loaded, failures by address)."""
        members = list(self.view.addresses if members is None else members)
        calls = [(address, self.stub(address).AssignExperts.future(expert_pb2.AssignExpertsRequest(
                     experts=[expert_pb2.ExpertRef(layer=layer, expert=e) for layer, e in sorted(keys)],
                     model_id=self.model_id, members=members), timeout=timeout_s))
                 for address, keys in experts.items()]
        loaded, errors = 0, {}
        for address, call in calls:
            try:
                loaded += call_result(address, call).loaded
            except MoEError as exc:
                errors[address] = exc
        return loaded, errors

    def assign_home_experts(self, timeout_s: float = 600.0) -> int:
        """Tell every server to hold exactly the experts it is home to; returns how many it
        had to load (0 when a restarted gateway adopts servers that hold them already)."""
        view = self.view
        return self.assign_many({a: view.experts_of(s) for s, a in enumerate(view.addresses)}, timeout_s)

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
        """Give a server that lost its experts (a restart) its home experts (and stand-ins)
        again. Its replicas are gone too: stop using them (the next plan may send them again)."""
        address = view.addresses[server]
        log.warning("re-assigning home experts to expert server %s", address)
        with self.replica_lock:
            view.ready[server] = set()
            view.planned = {r for r in view.planned if r[2] != server}
            view.replica_sequence[server] += 1  # ignore replies of SetReplicas sent before the restart
            view.synced.discard(server)  # and send it its replica set again
            held = view.held_by(server)
        self.transport.forget(address)  # it may have come back on another host
        self.assign_experts(address, held, self.timeout_s)

    # ---- suspects and stand-ins ----

    def _suspect(self, view: ServerView, server: int, error: MoEError) -> None:
        with self.replica_lock:
            first = server not in view.suspect
            view.suspect.setdefault(server, time.monotonic())
        if first:
            self.stats.count_fault(suspects=1)
            log.warning("expert server %s failed a layer call (%s); its experts run on other servers until it "
                        "answers its health checks again", view.addresses[server], error)

    def clear_suspect(self, address: str, checked_at: float) -> None:
        """`address` answered SERVING to a health check sent at `checked_at` (monotonic s):
        if it is suspect since before then, give it back its experts if it lost them (a
        restart), use it again, and let its stand-ins drop what they held for it."""
        view = self.view
        if address not in view.addresses:
            return
        server = view.addresses.index(address)
        with self.replica_lock:
            since = view.suspect.get(server)
        if since is None or since >= checked_at:
            return
        held = {(r.layer, r.expert) for r in self.info(address).experts}
        if not view.held_by(server) <= held:
            self.reassign(view, server)
        with self.replica_lock:
            view.suspect.pop(server, None)
            mine = set(view.experts_of(server))
            relieved = {s: view.held_by(s) - (view.standins[s] & mine)
                        for s in range(len(view.addresses)) if view.standins[s] & mine}
            for s in relieved:
                view.standins[s] -= mine
        log.info("expert server %s answers again; it serves its own experts", address)
        if relieved:  # best effort: a stand-in that keeps an expert it no longer needs only costs memory
            for failed, exc in self.assign_each({view.addresses[s]: keys for s, keys in relieved.items()},
                                                self.timeout_s)[1].items():
                log.info("stand-in %s did not drop its stand-in experts: %s", failed, exc)

    def _stand_in(self, view: ServerView, layer: int, orphans: list[tuple[int, int]], busy: list[int]) -> None:
        """Load each orphaned expert [(expert, tokens)] of `layer` on a healthy stand-in server."""
        with self.replica_lock:
            candidates = [s for s in range(len(view.addresses)) if s not in view.suspect]
            held = [len(view.held_by(s)) + len(view.ready[s]) for s in range(len(view.addresses))]
        chosen = choose_stand_ins(orphans, candidates, busy, held)
        if len(chosen) < len(orphans):
            raise Unavailable(f"no healthy expert server is left to run sparse layer {layer}: "
                              f"{', '.join(view.addresses)} all failed")
        with self.replica_lock:
            for expert, s in chosen.items():
                view.standins[s].add((layer, expert))
            wanted = {view.addresses[s]: view.held_by(s) for s in set(chosen.values())}
        self.stats.count_fault(stand_in_loads=len(chosen))
        log.warning("sparse layer %d: loading experts %s of suspect servers on stand-ins %s", layer,
                    sorted(chosen), sorted({view.addresses[s] for s in chosen.values()}))
        for address, exc in self.assign_each(wanted, self.timeout_s)[1].items():
            server = view.addresses.index(address)
            with self.replica_lock:
                view.standins[server] -= {(layer, e) for e, s in chosen.items() if s == server}
            self._suspect(view, server, exc)

    # ---- running a layer ----

    def run_layer(self, layer: int, hidden: torch.Tensor, token_lists: list[tuple[int, torch.Tensor]]
                  ) -> dict[int, torch.Tensor]:
        """Run one sparse layer's experts remotely, on the current view's servers.

        hidden: [N, d_model]; token_lists: [(expert, token indices [n_e])] with n_e > 0,
        indices ascending. Returns {expert: outputs [n_e, d_model]} (not yet scaled by
        router probabilities).
        """
        with self.using_view() as view:
            return self._run_layer(view, layer, hidden, token_lists)

    def _run_layer(self, view: ServerView, layer: int, hidden: torch.Tensor,
                   token_lists: list[tuple[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
        """Send every group, then send again what failed, until every token has its output:
          - a server that answers it lost experts (it restarted) gets them back (once per
            call) and runs its groups again;
          - a server that fails (unavailable, deadline) becomes suspect; its groups go to
            other holders, or to stand-ins that load the experts first.
        A group always runs whole on one server, so outputs do not depend on who ran it."""
        t0 = time.perf_counter_ns()
        acc = _LayerAccumulator(len(view.addresses))
        parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}  # expert -> [(token indices, rows)]
        todo, reassigned, errors = token_lists, set(), []
        for _ in range(2 * len(view.addresses) + 1):  # each round re-assigns or suspects a server, or ends
            by_server = self._place(view, layer, todo)
            failed, missing = self._send(view, layer, hidden, by_server, parts, acc, errors)
            for server in missing:
                if server in reassigned:
                    raise Unavailable(f"expert server {view.addresses[server]} lost experts it is home to again, "
                                      f"after they were re-assigned")
                reassigned.add(server)
                self.reassign(view, server)
            todo = _merge([item for server in (*failed, *missing) for item in by_server[server]])
            if not todo:
                break
        else:
            raise Unavailable(f"sparse layer {layer} could not be run: expert servers kept failing; last: {errors[-1]}")
        acc.record(self.stats, view, layer, token_lists, time.perf_counter_ns() - t0, self.replica_lock)
        return {expert: _join(tokens, parts[expert]) for expert, tokens in token_lists}

    def _place(self, view: ServerView, layer: int,
               token_lists: list[tuple[int, torch.Tensor]]) -> dict[int, list[tuple[int, torch.Tensor]]]:
        """Server -> [(expert, token indices)]: by the dispatch policy over healthy holders,
        after loading stand-ins for experts that have none."""
        by_server, orphans = self._assign(view, layer, token_lists)
        if orphans:
            busy = [sum(len(t) for _, t in by_server.get(s, [])) for s in range(len(view.addresses))]
            self._stand_in(view, layer, orphans, busy)
            by_server, orphans = self._assign(view, layer, token_lists)
            if orphans:
                raise Unavailable(f"no healthy expert server could load experts {[e for e, _ in orphans]} "
                                  f"of sparse layer {layer}")
        return by_server

    def _send(self, view: ServerView, layer: int, hidden: torch.Tensor,
              by_server: dict[int, list[tuple[int, torch.Tensor]]],
              parts: dict[int, list[tuple[torch.Tensor, torch.Tensor]]],
              acc: "_LayerAccumulator", errors: list[MoEError]) -> tuple[list[int], list[int]]:
        """One RunExperts call per server, all at once; outputs go into `parts`, failures
        into `errors`. Returns the servers that failed (now suspect) and those that lost
        experts (restarted)."""
        calls, payloads, sent, on_lane = {}, {}, {}, set()
        metadata = tracing.outgoing_metadata()  # the batch's request ids (gateway/tracing.py)
        try:
            for server, items in by_server.items():
                t0 = time.perf_counter_ns()
                address = view.addresses[server]
                index = items[0][1] if len(items) == 1 else torch.cat([tokens for _, tokens in items])  # [n_server] rows of `hidden`
                payloads[server] = payload = self.transport.pack(address, view.stubs[server], hidden, index,
                                                                 self.wire_dtype)
                request = expert_pb2.RunExpertsRequest(
                    layer=layer,
                    groups=[expert_pb2.ExpertGroup(expert=e, num_tokens=len(t)) for e, t in items],
                    hidden_states=payload.tensor, shared=payload.region, model_id=self.model_id,
                )
                acc.bytes_sent += len(payload.tensor.data)
                acc.bytes_shared += payload.nbytes if payload.region is not None else 0
                acc.gateway_codec_ns += time.perf_counter_ns() - t0
                sent[server] = time.perf_counter()
                lane = self.transport.lane(address) if payload.region is not None else None
                if lane is not None:
                    # Same host, rows in shared memory: the control message over a Unix
                    # socket (gateway/lane.py); sent now, read below, like a future.
                    try:
                        calls[server] = lane.start(request, self.timeout_s, metadata)
                        on_lane.add(server)
                        continue
                    except OSError as exc:  # gone (a restart has a new lane): gRPC, and attach again
                        log.info("expert server %s: local lane unreachable (%s); this call goes over gRPC",
                                 address, exc)
                        self.transport.forget(address)
                if len(calls) < len(by_server) - 1:
                    # Sent at once: this server computes while the next request is packed.
                    calls[server] = call = view.run_stubs[server].RunExperts.future(
                        request, timeout=self.timeout_s, metadata=metadata)
                    call.add_done_callback(lambda _, a=address, t0=sent[server]: METRICS.observe_rpc(
                        a, time.perf_counter() - t0))
                else:
                    # The last one is called blocking on this thread: a future starts a
                    # channel spin thread when its channel was idle, ~0.1-0.2 ms a call.
                    calls[server] = _Blocking(view.run_stubs[server].RunExperts, request, self.timeout_s, metadata)
                    METRICS.observe_rpc(address, time.perf_counter() - sent[server])
            acc.rpcs += len(calls)
            failed, missing = [], []
            for server, call in calls.items():
                address = view.addresses[server]
                try:
                    reply = call_result(address, call)
                    if server in on_lane:  # until read here: it may have come back while others were read
                        METRICS.observe_rpc(address, time.perf_counter() - sent[server])
                except ExpertsMissing:
                    missing.append(server)
                    continue
                except SharedMemoryUnreachable as exc:
                    self.transport.unreachable(address, str(exc))
                    failed.append(server)  # sent again as bytes, not suspect
                    continue
                except Unavailable as exc:
                    if server in on_lane:
                        # A lane belongs to one server process: if this one comes back, it
                        # is a new process with a new lane, named when we attach again.
                        self.transport.forget(address)
                    self._suspect(view, server, exc)
                    errors.append(exc)
                    failed.append(server)
                    continue
                acc.compute_ns[server] = acc.compute_ns.get(server, 0) + reply.compute_ns
                acc.server_codec_ns = max(acc.server_codec_ns, reply.codec_ns)
                acc.bytes_received += len(reply.outputs.data)
                td = time.perf_counter_ns()
                out = self.transport.unpack(payloads.pop(server), reply, hidden)
                acc.gateway_codec_ns += time.perf_counter_ns() - td
                start = 0
                for expert, tokens in by_server[server]:
                    parts.setdefault(expert, []).append((tokens, out[start:start + len(tokens)]))
                    acc.loads[server] += len(tokens)
                    acc.replica_tokens += len(tokens) if view.home[layer][expert] != server else 0
                    start += len(tokens)
        except BaseException:
            for call in calls.values():
                call.cancel()  # the layer failed: do not leave the other servers computing for nobody
            raise
        finally:
            for payload in payloads.values():  # calls that did not return OK: never reuse their memory
                self.transport.done(payload, ok=False)
        return failed, missing

    def _assign(self, view: ServerView, layer: int, token_lists: list[tuple[int, torch.Tensor]]
                ) -> tuple[dict[int, list[tuple[int, torch.Tensor]]], list[tuple[int, int]]]:
        """(server -> [(expert, token indices)], orphans [(expert, tokens)]) for one layer:
        home servers, ready replicas and stand-ins that are not suspect, by the dispatch
        policy (gateway/replication.py). Orphans have no healthy holder."""
        with self.replica_lock:
            suspect = set(view.suspect)
            ready = [set(keys) for keys in view.ready] if view.planned else None
            standins = [{e for (pl, e) in keys if pl == layer} for keys in view.standins] if suspect else None
        if len(suspect) == len(view.addresses):
            suspect = set()  # nobody is healthy: try everyone again (they may be back) rather than fail now
        if ready is None and not suspect:  # the common case: every expert to its home server
            by_server: dict[int, list[tuple[int, torch.Tensor]]] = {}
            for expert, tokens in token_lists:
                by_server.setdefault(view.home[layer][expert], []).append((expert, tokens))
            return by_server, []
        num_experts = len(view.home[layer])
        counts = [0] * num_experts
        for expert, tokens in token_lists:
            counts[expert] = len(tokens)
        holders = [[view.home[layer][e]] for e in range(num_experts)]
        for s, keys in enumerate(ready or []):
            for (pl, e) in keys:
                if pl == layer and s != holders[e][0]:
                    holders[e].append(s)
        for s, experts in enumerate(standins or []):
            for e in experts:
                if s not in holders[e]:
                    holders[e].append(s)
        holders = [[s for s in h if s not in suspect] for h in holders]
        orphans = [(e, counts[e]) for e in range(num_experts) if counts[e] and not holders[e]]
        if orphans:
            return {}, orphans
        chunks = assign_layer(counts, holders, len(view.addresses), self.policy, group_cost=self.group_cost)
        by_server = {}
        for expert, tokens in token_lists:
            start = 0
            for s, n in chunks[expert]:
                by_server.setdefault(s, []).append((expert, tokens[start:start + n]))  # contiguous run
                start += n
        return by_server, []


class _Blocking:
    """A unary call made blocking, shaped like the future call_result() reads."""

    def __init__(self, method, request, timeout_s: float, metadata=()):
        try:
            self._reply, self._error = method(request, timeout=timeout_s, metadata=metadata), None
        except grpc.RpcError as err:
            self._reply, self._error = None, err

    def result(self):
        if self._error is not None:
            raise self._error
        return self._reply

    def cancel(self) -> bool:
        return False  # it has ended


def _merge(items: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
    """Groups to send again, one per expert (its tokens ascending), experts ascending."""
    by_expert: dict[int, list[torch.Tensor]] = {}
    for expert, tokens in items:
        by_expert.setdefault(expert, []).append(tokens)
    return [(e, torch.sort(torch.cat(ts)).values if len(ts) > 1 else ts[0]) for e, ts in sorted(by_expert.items())]


def _join(tokens: torch.Tensor, parts: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """One expert's outputs [n_e, d_model] in the order of `tokens`, from the parts that
    servers computed: (their token indices, their rows). One part is the common case."""
    if len(parts) == 1:
        return parts[0][1]
    out = parts[0][1].new_empty((len(tokens), parts[0][1].shape[1]))
    for part_tokens, rows in parts:
        out[torch.searchsorted(tokens, part_tokens)] = rows
    return out


@dataclass
class _LayerAccumulator:
    """Figures of one layer call summed over its rounds (gateway/dispatch_stats.LayerCall)."""

    num_servers: int
    loads: list[int] = field(default_factory=list)
    compute_ns: dict[int, int] = field(default_factory=dict)
    server_codec_ns: int = 0  # max over servers of their tensor codec time
    gateway_codec_ns: int = 0  # encoding requests and decoding replies here
    rpcs: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_shared: int = 0  # hidden states sent through shared memory instead of bytes
    replica_tokens: int = 0  # computed by a replica or stand-in rather than the home server

    def __post_init__(self):
        self.loads = self.loads or [0] * self.num_servers

    def record(self, stats: DispatchStats, view: ServerView, layer: int, token_lists, wall_ns: int, lock) -> None:
        if log.isEnabledFor(logging.DEBUG):
            log.debug("layer %d: tokens per server %s", layer, self.loads)
        with lock:
            planned = [(e, s) for (pl, e, s) in view.planned if pl == layer]
            ready_hits = sum((layer, e) in view.ready[s] for e, s in planned)
        stats.record(LayerCall(
            addresses=view.addresses, loads=self.loads, compute_ns=self.compute_ns, codec_ns=self.server_codec_ns,
            tokens=sum(len(t) for _, t in token_lists), rpcs=self.rpcs, bytes_sent=self.bytes_sent, bytes_shared=self.bytes_shared,
            bytes_received=self.bytes_received, wall_ns=wall_ns, gateway_codec_ns=self.gateway_codec_ns,
            replica_tokens=self.replica_tokens, planned_checks=len(planned), planned_ready=ready_hits, layer=layer))


_CONCAT_ELEMENTS = 1 << 18  # RemoteExperts combines by one index_add_ up to this many output elements
_PYTHON_GROUPING = 16  # group_tokens groups calls of up to this many tokens with Python lists


def group_tokens(onehot: torch.Tensor) -> tuple[list[tuple[int, torch.Tensor]], torch.Tensor, list[int]]:
    """HF's routing mask -> the groups HF's expert loop forms, in as few ops as we can.

    onehot [N, E]: a token's row is one-hot at its expert, or all zero when it was dropped
    over capacity. Returns (token_lists, kept, counts):
      token_lists [(expert, token indices [n_e])]: experts ascending, n_e > 0, each
        expert's tokens ascending (HF's torch.where order), dropped tokens left out;
      kept [n]: the concatenation of those token indices;
      counts [E]: tokens per expert.
    A decode step routes one token per row: up to _PYTHON_GROUPING tokens, grouping
    Python lists beats the tensor ops' fixed cost (7 against 19 us for one token, 12
    against 19 for 8; at 32 the tensor ops win, 19 against 22: benchmarks/dispatch_ops.py).
    """
    num_experts = onehot.shape[1]
    if onehot.shape[0] <= _PYTHON_GROUPING:
        by_expert: dict[int, list[int]] = {}
        for token, row in enumerate(onehot.tolist()):
            top = max(row)
            if top > 0:
                by_expert.setdefault(row.index(top), []).append(token)
        experts = sorted(by_expert)
        kept = torch.tensor([t for e in experts for t in by_expert[e]], dtype=torch.long, device=onehot.device)
        counts = [0] * num_experts
        for e in experts:
            counts[e] = len(by_expert[e])
        return list(zip(experts, kept.split([counts[e] for e in experts]))), kept, counts
    # Dropped tokens get key E, after every expert; one stable sort then orders the rest
    # by expert, and by token within an expert.
    key = torch.where(onehot.amax(-1) > 0, onehot.argmax(-1), num_experts)  # [N]
    order = torch.argsort(key, stable=True)
    n = torch.bincount(key, minlength=num_experts + 1).tolist()  # [E + 1]
    kept = order[:len(key) - n[num_experts]]
    token_lists = [(e, tokens) for e, tokens in enumerate(kept.split(n[:num_experts])) if n[e]]
    return token_lists, kept, n[:num_experts]


class RemoteExperts(nn.Module):
    """Drop-in for HF's SwitchTransformersExperts of one sparse layer; holds no weights."""

    def __init__(self, layer: int, clients: ExpertClients | None = None):
        super().__init__()
        self.layer = layer
        self.clients = clients
        self.on_call: Callable[[int], None] | None = None  # hears each call's routed tokens (Engine: decoder's)

    def forward(self, hidden_states: torch.Tensor, selected_experts: torch.Tensor, routing_weights: torch.Tensor) -> torch.Tensor:
        """hidden_states [N, d_model]; selected_experts [N, 1, E] one-hot, all-zero for
        tokens dropped over capacity; routing_weights [N, 1] top-1 router probability.
        Returns [N, d_model]: zero for dropped tokens, else expert(x) * probability."""
        if self.clients is None:
            raise RuntimeError("RemoteExperts used before the gateway connected it to expert servers")
        t0 = time.perf_counter_ns()
        token_lists, kept, counts = group_tokens(selected_experts[:, 0, :])
        final = torch.zeros_like(hidden_states)
        if token_lists:
            outputs = self.clients.run_layer(self.layer, hidden_states, token_lists)
            # HF's SwitchTransformersExperts adds each expert's rows, scaled by their router
            # probability, into zeros with one index_add_ per expert. A token has one expert,
            # so every row is added once, to zero: one index_add_ over all experts' rows gives
            # the same bits with four ops instead of four per expert. Concatenating the rows
            # copies them, which costs more than the per-expert ops save beyond ~1 MB
            # (benchmarks/dispatch_ops.py), so large calls keep HF's loop.
            if len(token_lists) == 1:
                expert, top_x = token_lists[0]
                final.index_add_(0, top_x, (outputs[expert] * routing_weights[top_x]).to(hidden_states.dtype))
            elif len(kept) * hidden_states.shape[1] <= _CONCAT_ELEMENTS:
                rows = torch.cat([outputs[expert] for expert, _ in token_lists])
                final.index_add_(0, kept, (rows * routing_weights[kept]).to(hidden_states.dtype))
            else:
                for expert, top_x in token_lists:
                    final.index_add_(0, top_x, (outputs[expert] * routing_weights[top_x]).to(hidden_states.dtype))
        self.clients.add_dispatch_time(time.perf_counter_ns() - t0)
        METRICS.layer_done(self.layer, counts, time.perf_counter_ns() - t0)
        if self.on_call is not None:
            self.on_call(len(kept))
        return final
