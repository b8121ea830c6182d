"""The gateway's Prometheus metrics.

Two kinds of figure:
  - per-request and per-call ones (latency histograms, token counters, tokens per
    logical expert) are recorded by hooks, each a single call placed at the edge: the
    servicers (request_finished), the batcher (gateway/tracing.py batch_started), the
    end of a sparse layer's dispatch (layer_done), the channels to expert servers and
    the predictor (call_done), the membership change (membership_changed) and the
    forecast check (forecast_checked);
  - figures the gateway already keeps as running totals (tokens per server, replicas,
    prefetch hits, forecast counters, members) are read at scrape time by
    `GatewayCollector`, so serving pays nothing for them.

One `GatewayMetrics` per process (`METRICS`), as prometheus_client keeps one default
registry: the hooks sit in modules below the gateway object and need no handle to it.
This module imports nothing of the gateway, so any layer may call it.
"""

from __future__ import annotations

import threading
import time
from collections import deque

import numpy as np
from prometheus_client import Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from moe_common import metrics as common
from moe_common import tracing

BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
BALANCE_WINDOW_S = 60.0  # moe_balancedness covers the dispatches of about this long
FORECAST_ERROR_PASSES = 256  # moe_forecast_error: mean over this many recent passes

# Full method name -> the `api` label of moe_requests_total.
API_METHODS = {
    "/moe.gateway.v1.GatewayService/Generate": "generate",
    "/moe.gateway.v1.GatewayService/GenerateStream": "generate_stream",
    "/inference.GRPCInferenceService/ModelInfer": "model_infer",
}


class GatewayMetrics:
    def __init__(self):
        self.registry = r = common.new_registry()
        self.requests = Counter("moe_requests", "Client requests by API and gRPC status code",
                                ["api", "status"], registry=r)
        self.request_duration = Histogram("moe_request_duration_seconds", "Time from a request's arrival to its reply",
                                          buckets=common.LATENCY_BUCKETS, registry=r)
        self.queue_duration = Histogram("moe_queue_duration_seconds", "Time a request waited for its batch",
                                        buckets=common.LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("moe_time_to_first_token_seconds", "Time from arrival to a request's first token",
                              buckets=common.LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("moe_time_per_output_token_seconds", "Decoding time per generated token after the first",
                              buckets=common.FAST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("moe_prompt_tokens", "Prompt (encoder) tokens of finished requests", registry=r)
        self.generation_tokens = Counter("moe_generation_tokens", "Tokens generated for finished requests", registry=r)
        self.batch_size = Histogram("moe_batch_size", "Prompts per batch run", buckets=BATCH_BUCKETS, registry=r)
        self.layer_dispatch = Histogram("moe_layer_dispatch_seconds", "Wall time of one sparse layer's expert dispatch",
                                        ["layer"], buckets=common.FAST_BUCKETS, registry=r)
        self.expert_rpc = Histogram("moe_expert_rpc_seconds", "RunExperts call time per expert server",
                                    ["server"], buckets=common.FAST_BUCKETS, registry=r)
        self.forecast = Histogram("moe_forecast_seconds", "Forecast call time to the predictor",
                                  buckets=common.FAST_BUCKETS, registry=r)
        # Counts moe_requests_total and times moe_request_duration_seconds (server.py installs it).
        self.interceptor = common.RpcMetricsInterceptor(API_METHODS, self.requests, self.request_duration)
        self.membership_changes = Counter("moe_membership_changes", "Expert server membership changes by kind",
                                          ["kind"], registry=r)
        self._layer_children: dict[int, object] = {}
        self._rpc_children: dict[str, object] = {}
        self._lock = threading.Lock()
        self._expert_tokens = np.zeros((0, 0), dtype=np.int64)  # [L, E] tokens routed per logical expert
        self._forecast_l1: deque = deque(maxlen=FORECAST_ERROR_PASSES)
        self.registry.register(_ExpertTokens(self))
        self.registry.register(_ForecastError(self))

    # ---- hooks ----

    def request_finished(self, prompts: list[list[int]], results, timings: dict) -> None:
        """A request got its reply: its token counts and the batcher's timings (ns)."""
        generated = [len(r.token_ids) for r in results]
        self.prompt_tokens.inc(sum(len(p) for p in prompts))
        self.generation_tokens.inc(sum(generated))
        self.queue_duration.observe(timings["queue_ns"] / 1e9)
        if generated and max(generated) > 0:
            first = timings["queue_ns"] + timings["first_token_ns"]
            self.ttft.observe(first / 1e9)
            steps = max(generated)
            if steps > 1:
                self.tpot.observe((timings["total_ns"] - first) / 1e9 / (steps - 1))

    def layer_done(self, layer: int, counts, ns: int) -> None:
        """A sparse layer's dispatch ended: tokens per expert counts [E] (a tensor or a list), its wall time."""
        child = self._layer_children.get(layer)
        if child is None:
            child = self._layer_children[layer] = self.layer_dispatch.labels(str(layer))
        child.observe(ns / 1e9)
        c = counts.cpu().numpy() if hasattr(counts, "cpu") else np.asarray(counts)
        with self._lock:
            if layer >= self._expert_tokens.shape[0] or len(c) > self._expert_tokens.shape[1]:
                grown = np.zeros((max(layer + 1, self._expert_tokens.shape[0]),
                                  max(len(c), self._expert_tokens.shape[1])), dtype=np.int64)
                grown[:self._expert_tokens.shape[0], :self._expert_tokens.shape[1]] = self._expert_tokens
                self._expert_tokens = grown
            self._expert_tokens[layer, :len(c)] += c

    def rpc_timer(self, address: str):
        """on_done(method, seconds) for the channel to expert server `address` (moe_common.tracing.intercept)."""
        def on_done(method: str, seconds: float) -> None:
            if method.endswith("/RunExperts"):
                self.observe_rpc(address, seconds)
        return on_done

    def observe_rpc(self, address: str, seconds: float) -> None:
        """One RunExperts call to expert server `address` took `seconds`."""
        child = self._rpc_children.get(address)
        if child is None:
            child = self._rpc_children[address] = self.expert_rpc.labels(address)
        child.observe(seconds)

    def predictor_timer(self, method: str, seconds: float) -> None:
        """on_done for the channel to the predictor."""
        if method.endswith("/Forecast"):
            self.forecast.observe(seconds)

    def forecast_checked(self, forecast: dict, layers, loads: np.ndarray) -> None:
        """A pass ended: its forecast {layer: load [E]} against its actual loads [len(layers), E].
        The error is the L1 distance of the two normalized loads (0 = perfect, 2 = disjoint),
        as the predictor's own live_load_l1."""
        errors = []
        for j, layer in enumerate(layers):
            f = forecast.get(layer)
            if f is None:
                continue
            a = np.asarray(loads[j], dtype=np.float64)
            fs, as_ = f.sum(), a.sum()
            if fs > 0 and as_ > 0:
                errors.append(float(np.abs(f / fs - a / as_).sum()))
        if errors:
            with self._lock:
                self._forecast_l1.append(sum(errors) / len(errors))

    def membership_changed(self, kind: str) -> None:
        """kind: join, leave (graceful) or evict."""
        self.membership_changes.labels(kind).inc()

    # ---- reads ----

    def expert_tokens(self) -> np.ndarray:
        with self._lock:
            return self._expert_tokens.copy()


class _ExpertTokens:
    def __init__(self, m: GatewayMetrics):
        self.m = m

    def collect(self):
        yield common.LayerExpertCounter("moe_expert_tokens", "Tokens routed to each logical expert (sparse layer x expert)",
                                        self.m.expert_tokens())


class _ForecastError:
    def __init__(self, m: GatewayMetrics):
        self.m = m

    def collect(self):
        with self.m._lock:
            recent = list(self.m._forecast_l1)
        yield GaugeMetricFamily("moe_forecast_error", "Mean L1 distance of forecast and actual normalized loads over "
                                f"the last {FORECAST_ERROR_PASSES} passes (0 = perfect, 2 = disjoint)",
                                value=sum(recent) / len(recent) if recent else 0.0)


def windowed_balancedness(history: deque, now: float, sum_mean: float, sum_max: float,
                          window_s: float = BALANCE_WINDOW_S) -> float:
    """vLLM's balancedness (mean over servers / max over servers, summed over layer
    dispatches) over about the last `window_s`, from snapshots (time, sum_mean, sum_max)
    of the running sums taken at scrapes. Appends the current one; keeps the newest
    snapshot older than the window as the baseline. 1.0 when nothing was dispatched."""
    history.append((now, sum_mean, sum_max))
    while len(history) > 2 and history[1][0] <= now - window_s:
        history.popleft()
    _, mean0, max0 = history[0]
    if len(history) == 1:
        mean0, max0 = 0.0, 0.0  # the first scrape: since start
    d_max = sum_max - max0
    return (sum_mean - mean0) / d_max if d_max > 0 else 1.0


class GatewayCollector:
    """Reads the running totals of one gateway at scrape time."""

    def __init__(self, gateway):
        self.gateway = gateway
        self._balance_history: deque = deque()
        self._lock = threading.Lock()

    def collect(self):
        g = self.gateway
        e = g.engine
        clients = e.clients
        view = clients.view
        st = clients.stats
        waiting = g.batcher.requests_waiting()
        running = max(0, METRICS.interceptor.active - waiting)
        yield GaugeMetricFamily("moe_num_requests_running", "Requests in a running batch", value=running)
        yield GaugeMetricFamily("moe_num_requests_waiting", "Requests queued for a batch", value=waiting)

        tokens = clients.tokens_per_server(view)
        c = CounterMetricFamily("moe_server_tokens", "Tokens each expert server computed", labels=["server"])
        for address, n in zip(view.addresses, tokens):
            c.add_metric([address], n)
        yield c
        with self._lock:
            balance = windowed_balancedness(self._balance_history, time.monotonic(), st.sum_mean_load, st.sum_max_load)
        yield GaugeMetricFamily("moe_balancedness", f"Mean over max tokens per server, over about the last "
                                f"{BALANCE_WINDOW_S:.0f} s of layer dispatches (1 = even)", value=balance)

        with clients.replica_lock:
            planned = len(view.planned)
            ready = sum(len(r) for r in view.ready)
            suspect = len(view.suspect)
        r = GaugeMetricFamily("moe_replicas", "Replicas of hot experts: planned, and loaded and in use", labels=["state"])
        r.add_metric(["planned"], planned)
        r.add_metric(["ready"], ready)
        yield r
        yield CounterMetricFamily("moe_prefetch_hits", "Planned replicas that were ready when their layer ran",
                                  value=st.planned_ready)
        yield CounterMetricFamily("moe_prefetch_misses", "Planned replicas that were not ready when their layer ran",
                                  value=st.planned_checks - st.planned_ready)
        moved = e.replicas.bytes_moved if e.replicas is not None else 0
        yield CounterMetricFamily("moe_replica_bytes_moved", "Weight bytes expert servers loaded for replicas",
                                  value=moved)

        f = CounterMetricFamily("moe_forecast_failures", "Forecasts not used, by reason", labels=["reason"])
        fc = e.observer.counters if e.observer is not None else None
        f.add_metric(["late"], fc.late if fc else 0)
        f.add_metric(["error"], fc.failed if fc else 0)
        f.add_metric(["report"], fc.reports_failed if fc else 0)
        yield f

        s = GaugeMetricFamily("moe_expert_servers", "Expert servers in the membership by state", labels=["state"])
        s.add_metric(["serving"], len(view.addresses) - suspect)
        s.add_metric(["suspect"], suspect)
        yield s


METRICS = GatewayMetrics()


class Exposure:
    """One gateway's figures in METRICS, and /metrics on --metrics-port when set. stop() ends both."""

    def __init__(self, gateway):
        self.collector = GatewayCollector(gateway)
        METRICS.registry.register(self.collector)
        try:
            self.server = common.serve(METRICS.registry, gateway.config.host, gateway.config.metrics_port)
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


def server_interceptors() -> list:
    """The gateway's server interceptors, outermost first: request counts and durations,
    then request ids (a bad client id is answered INVALID_ARGUMENT and counted so)."""
    return [METRICS.interceptor, tracing.IncomingInterceptor(origin=True, methods=frozenset(API_METHODS))]
