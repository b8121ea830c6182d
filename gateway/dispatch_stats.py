"""Statistics of the expert path: what every sparse-layer dispatch sent, to whom, and
how long it took. GetStatus, moe-bench and the replica manager's log read them.

Per-server figures are keyed by address, not index, since servers join and leave
(gateway/membership.py); only current members are kept (`retain`), so the maps stay
as small as the membership.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass
class LayerCall:
    """What one sparse-layer dispatch did. Times in nanoseconds; `loads[s]` and
    `compute_ns[s]` are per server of the view it ran on (`addresses`)."""

    addresses: list[str]
    loads: list[int]  # tokens each server computed
    compute_ns: dict[int, int]  # server -> expert compute it reported
    codec_ns: int  # max over servers of their tensor codec time
    tokens: int  # routed tokens sent
    rpcs: int
    bytes_sent: int
    bytes_received: int
    bytes_shared: int  # hidden states sent through shared memory (gateway/transport.py)
    wall_ns: int  # from encoding the first request to decoding the last reply
    gateway_codec_ns: int  # encoding requests and decoding replies here
    replica_tokens: int  # tokens computed by a replica rather than the home server
    planned_checks: int  # planned replicas of this layer...
    planned_ready: int  # ...that were ready (prefetch hits)
    layer: int = -1  # the sparse layer (-1: not given)


@dataclass
class DispatchStats:
    """Counters of the expert path, summed over calls. Times in nanoseconds. Thread-safe
    through its methods; plain field reads are for reports."""

    calls: int = 0  # sparse-layer dispatches
    rpcs: int = 0
    tokens: int = 0  # routed tokens sent (dropped tokens are not sent)
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_shared: int = 0  # hidden states sent through shared memory instead of bytes
    dispatch_ns: int = 0  # wall time inside RemoteExperts.forward
    rpc_wall_ns: int = 0  # from encoding the first request to decoding the last reply, per layer
    server_compute_ns: int = 0  # max over servers of their compute, per layer (the critical path)
    server_compute_mean_ns: float = 0.0  # mean over the view's servers (idle ones count 0), per layer
    compute_by_server: dict[str, int] = field(default_factory=dict)  # address -> compute ns reported
    server_codec_ns: int = 0  # max over servers of their tensor codec time, per layer
    gateway_codec_ns: int = 0  # encoding requests and decoding replies in the gateway
    tokens_by_server: dict[str, int] = field(default_factory=dict)  # address -> tokens computed
    # Balance: balancedness = sum_mean_load / sum_max_load over layer dispatches (vLLM's definition).
    sum_mean_load: float = 0.0
    sum_max_load: float = 0.0
    replica_tokens: int = 0  # tokens computed by a replica rather than the home server
    planned_checks: int = 0  # planned replicas whose layer ran...
    planned_ready: int = 0  # ...and were ready then (prefetch hits)
    # sparse layer -> [planned replicas checked, ready] (prefetch hits per layer: with
    # layer-ordered prefetches the first layers' replicas are ready first)
    hits_by_layer: dict[int, list[int]] = field(default_factory=dict)
    suspects: int = 0  # servers made suspect by a failed layer call
    stand_in_loads: int = 0  # logical experts loaded on stand-ins for suspect servers
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def record(self, c: LayerCall) -> None:
        with self._lock:
            self.calls += 1
            self.rpcs += c.rpcs
            self.tokens += c.tokens
            self.bytes_sent += c.bytes_sent
            self.bytes_shared += c.bytes_shared
            self.bytes_received += c.bytes_received
            self.rpc_wall_ns += c.wall_ns
            self.server_compute_ns += max(c.compute_ns.values(), default=0)
            self.server_compute_mean_ns += sum(c.compute_ns.values()) / len(c.addresses)
            self.server_codec_ns += c.codec_ns
            self.gateway_codec_ns += c.gateway_codec_ns
            for server, ns in c.compute_ns.items():
                address = c.addresses[server]
                self.compute_by_server[address] = self.compute_by_server.get(address, 0) + ns
            for address, load in zip(c.addresses, c.loads):
                self.tokens_by_server[address] = self.tokens_by_server.get(address, 0) + load
            self.sum_mean_load += sum(c.loads) / len(c.loads)
            self.sum_max_load += max(c.loads)
            self.replica_tokens += c.replica_tokens
            self.planned_checks += c.planned_checks
            self.planned_ready += c.planned_ready
            if c.layer >= 0 and c.planned_checks:
                hits = self.hits_by_layer.setdefault(c.layer, [0, 0])
                hits[0] += c.planned_checks
                hits[1] += c.planned_ready

    def count_fault(self, suspects: int = 0, stand_in_loads: int = 0) -> None:
        with self._lock:
            self.suspects += suspects
            self.stand_in_loads += stand_in_loads

    def add_dispatch_time(self, ns: int) -> None:
        with self._lock:
            self.dispatch_ns += ns

    def tokens_of(self, addresses: list[str]) -> list[int]:
        """Tokens each of these servers computed so far, in their order."""
        with self._lock:
            return [self.tokens_by_server.get(a, 0) for a in addresses]

    def compute_of(self, addresses: list[str]) -> list[int]:
        """Expert compute (ns) each of these servers reported so far, in their order."""
        with self._lock:
            return [self.compute_by_server.get(a, 0) for a in addresses]

    def hit_rate_by_layer(self, num_layers: int) -> list[float]:
        """Prefetch hit rate of each sparse layer 0..num_layers-1 (0.0 where nothing was planned)."""
        with self._lock:
            return [h[1] / h[0] if (h := self.hits_by_layer.get(layer)) else 0.0 for layer in range(num_layers)]

    def retain(self, addresses: list[str]) -> None:
        """Forget the per-server figures of servers that are no longer members."""
        keep = set(addresses)
        with self._lock:
            self.tokens_by_server = {a: n for a, n in self.tokens_by_server.items() if a in keep}
            self.compute_by_server = {a: n for a, n in self.compute_by_server.items() if a in keep}

    def balancedness(self) -> float:
        """vLLM's balancedness (gateway.replication.balancedness) over every layer dispatch so
        far, kept as two running sums instead of the whole [dispatches x servers] matrix."""
        return self.sum_mean_load / self.sum_max_load if self.sum_max_load else 1.0

    def reset(self) -> None:
        """Zero every counter."""
        with self._lock:
            fresh = DispatchStats()
            for name in fresh.__dataclass_fields__:
                if name != "_lock":
                    setattr(self, name, getattr(fresh, name))


@dataclass
class DecodeLayerCalls:
    """Sparse-layer calls of the decoder and the tokens they routed: their ratio is the
    batch expert servers see per decode step. Counted by the decoder's RemoteExperts
    (their on_call, set by the Engine), on the one thread that runs the model."""

    calls: int = 0
    tokens: int = 0

    def add(self, tokens: int) -> None:
        """One decoder sparse-layer call that routed `tokens` tokens (dropped ones not counted)."""
        self.calls += 1
        self.tokens += tokens
