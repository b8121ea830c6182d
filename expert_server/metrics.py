"""The expert server's Prometheus metrics.

Compute time and tokens per logical expert come from one hook in the servicer
(`run_done`), replica loading from another (`replicas_loaded`); weight memory is read
from the ExpertStore at scrape time. One `ExpertServerMetrics` per process (`METRICS`),
as prometheus_client keeps one default registry.
"""

from __future__ import annotations

import threading

import numpy as np
from prometheus_client import Histogram
from prometheus_client.core import GaugeMetricFamily

from moe_common import metrics as common

class ExpertServerMetrics:
    def __init__(self):
        self.registry = r = common.new_registry()
        self.compute = Histogram("moe_expert_compute_seconds", "Expert FFN compute of one RunExperts call",
                                 buckets=common.FAST_BUCKETS, registry=r)
        self.replica_load = Histogram("moe_replica_load_seconds",
                                      "Time of one SetReplicas call that loaded replica weights",
                                      buckets=common.LATENCY_BUCKETS, registry=r)
        self._lock = threading.Lock()
        self._tokens = np.zeros((0, 0), dtype=np.int64)  # [L, E] tokens computed per logical expert
        self.registry.register(_Tokens(self))

    def run_done(self, layer: int, groups, compute_ns: int) -> None:
        """A RunExperts call computed `groups` (ExpertGroup messages) of `layer` in compute_ns."""
        self.compute.observe(compute_ns / 1e9)
        with self._lock:
            width = max((g.expert for g in groups), default=-1) + 1
            if layer >= self._tokens.shape[0] or width > self._tokens.shape[1]:
                grown = np.zeros((max(layer + 1, self._tokens.shape[0]), max(width, self._tokens.shape[1])),
                                 dtype=np.int64)
                grown[:self._tokens.shape[0], :self._tokens.shape[1]] = self._tokens
                self._tokens = grown
            row = self._tokens[layer]
            for g in groups:
                row[g.expert] += g.num_tokens

    def replicas_loaded(self, bytes_loaded: int, seconds: float) -> None:
        if bytes_loaded:
            self.replica_load.observe(seconds)

    def tokens(self) -> np.ndarray:
        with self._lock:
            return self._tokens.copy()


class _Tokens:
    def __init__(self, m: ExpertServerMetrics):
        self.m = m

    def collect(self):
        yield common.LayerExpertCounter("moe_expert_server_tokens", "Tokens this server computed per logical expert",
                                        self.m.tokens(), skip_zero=True)


class StoreCollector:
    """Weight memory of one ExpertStore, read at scrape time."""

    def __init__(self, store):
        self.store = store

    def collect(self):
        replica = self.store.replica_bytes()  # standby and hot replicas; stand-ins count as home
        g = GaugeMetricFamily("moe_expert_weight_bytes", "Expert weight memory: home experts and replicas",
                              labels=["kind"])
        g.add_metric(["home"], self.store.weight_bytes() - replica)
        g.add_metric(["replica"], replica)
        yield g
        yield GaugeMetricFamily("moe_replica_memory_limit_bytes", "Memory allowed for replicas (--replica-memory)",
                                value=self.store.replica_memory)


METRICS = ExpertServerMetrics()


class Exposure:
    """One store's figures in METRICS, and /metrics on host:port when port > 0. stop() ends both."""

    def __init__(self, store, host: str, port: int):
        self.collector = StoreCollector(store)
        METRICS.registry.register(self.collector)
        try:
            self.server = common.serve(METRICS.registry, host, port)
        except BaseException:
            METRICS.registry.unregister(self.collector)
            raise

    @property
    def port(self) -> int:
        return self.server.port if self.server is not None else 0

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
        if self.collector is not None:
            METRICS.registry.unregister(self.collector)
            self.collector = None
