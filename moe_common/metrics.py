"""Prometheus plumbing shared by the three services: the /metrics HTTP endpoint, a
registry with process (RSS, CPU, file descriptors) and GPU memory figures, the
request counter of a gRPC service, and the `--metrics-port` / `--log-format` flags.

Names follow what vLLM and TGI users alert on: prefix `moe_`, base units (`_seconds`,
`_bytes`, `_total`). Labels stay bounded: method, status code, sparse layer x expert,
member address; never a request id. Each service's own metrics live in its package
(gateway/metrics.py, expert_server/metrics.py, predictor_service/metrics.py).
"""

from __future__ import annotations

import argparse
import logging
import sys
import threading
import time

import grpc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector
from prometheus_client import disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from moe_common import tracing

log = logging.getLogger(__name__)

# Latency buckets (seconds) from 1 ms to 2 min: expert calls take ms, long generations minutes.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
# Per-layer and per-call figures: 50 us to 10 s.
FAST_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 10.0)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """--metrics-port and --log-format, the same on every service."""
    p.add_argument("--metrics-port", type=int, default=0,
                   help="serve Prometheus metrics on http://HOST:PORT/metrics (0 = off); HOST is the service's --host")
    p.add_argument("--log-format", default="text", choices=list(tracing.LOG_FORMATS),
                   help="text lines, or one JSON object per line (with request_id and batch_id fields)")


def check_port(port: int) -> None:
    if not 0 <= port <= 65535:
        raise ValueError(f"--metrics-port must be in 0..65535 (0 = off), not {port}")


class GpuMemoryCollector:
    """moe_gpu_memory_bytes{device, kind="allocated"|"reserved"} of every CUDA device this
    process initialised; nothing on a CPU-only process (torch is not imported for it)."""

    def collect(self):
        torch = sys.modules.get("torch")
        if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
            return
        g = GaugeMetricFamily("moe_gpu_memory_bytes", "CUDA memory of this process by torch's allocator",
                              labels=["device", "kind"])
        for i in range(torch.cuda.device_count()):
            g.add_metric([f"cuda:{i}", "allocated"], torch.cuda.memory_allocated(i))
            g.add_metric([f"cuda:{i}", "reserved"], torch.cuda.memory_reserved(i))
        yield g


def new_registry() -> CollectorRegistry:
    """A registry with the process, platform, garbage collector and GPU memory figures."""
    # No `_created` sample beside every counter and histogram: they double the series of
    # the labelled families, and Prometheus' rate() does not need them.
    disable_created_metrics()
    registry = CollectorRegistry(auto_describe=True)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    registry.register(GpuMemoryCollector())
    return registry


class LayerExpertCounter(Metric):
    """A counter family {layer, expert} from a table [L, E], formatted in one pass.

    prometheus_client formats each sample in Python at ~10-25 us; a gateway of 24 sparse
    layers x 128 experts has 3072 of them, 40-60 ms a scrape. exposition() writes this
    family's text as one join instead (benchmarks/metrics_scrape.py measures both).
    `samples` stays empty: read the table, not the registry."""

    def __init__(self, name: str, documentation: str, table, skip_zero: bool = False):
        super().__init__(name, documentation, "counter")
        self.table = table  # [L, E] integer counts
        self.skip_zero = skip_zero  # leave out experts that never ran (an expert server's non-held ones)

    def text(self) -> str:
        head = f"# HELP {self.name}_total {self.documentation}\n# TYPE {self.name}_total counter\n"
        rows = []
        for layer, counts in enumerate(self.table.tolist()):
            rows.extend(f'{self.name}_total{{layer="{layer}",expert="{e}"}} {n}'
                        for e, n in enumerate(counts) if n or not self.skip_zero)
        return head + "".join(r + "\n" for r in rows)


class _Families:
    """A registry-shaped holder of already collected families (for generate_latest)."""

    def __init__(self, families):
        self.families = families

    def collect(self):
        return self.families


def exposition(registry: CollectorRegistry) -> bytes:
    """The Prometheus text format of `registry`, LayerExpertCounter families written fast."""
    out, normal = [], []
    for family in registry.collect():
        if isinstance(family, LayerExpertCounter):
            out.append(generate_latest(_Families(normal)))
            normal = []
            out.append(family.text().encode())
        else:
            normal.append(family)
    out.append(generate_latest(_Families(normal)))
    return b"".join(out)


class MetricsServer:
    """/metrics of `registry` over HTTP on host:port, in a daemon thread. stop() closes it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int):
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):
                if self.path.split("?", 1)[0] not in ("/metrics", "/"):
                    self.send_error(404, "only /metrics here")
                    return
                try:
                    body = exposition(registry)
                except Exception as exc:  # noqa: BLE001 - a broken collector is a 500, not a dead endpoint
                    log.exception("collecting metrics failed")
                    self.send_error(500, str(exc))
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE_LATEST)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):  # one line per scrape is noise
                pass

        try:
            self._server = ThreadingHTTPServer((host, port), Handler)
        except OSError as exc:
            raise OSError(f"could not serve metrics on {host}:{port}: {exc}") from exc
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="metrics-http", daemon=True)
        self._thread.start()
        self.host = host
        self.port = self._server.server_address[1]
        log.info("metrics on http://%s:%d/metrics", host, self.port)

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(registry: CollectorRegistry, host: str, port: int) -> MetricsServer | None:
    """Start /metrics when port > 0 (the --metrics-port convention); None when off."""
    return MetricsServer(registry, host, port) if port else None


def _code_name(context) -> str:
    code = context.code()
    if code is None:
        return "OK"
    return code.name if isinstance(code, grpc.StatusCode) else str(code)


class RpcMetricsInterceptor(grpc.ServerInterceptor):
    """Counts each call of `methods` (full method name -> label) by status code in
    `counter` (labels: its label, status) and observes its duration in `duration`
    (a histogram without labels; None: not timed). Outermost interceptor: it sees the
    code the error mapping set."""

    def __init__(self, methods: dict[str, str], counter, duration=None):
        self.methods = methods
        self.counter = counter
        self.duration = duration
        self.active = 0  # calls of `methods` being handled now
        self._lock = threading.Lock()

    def _start(self) -> float:
        with self._lock:
            self.active += 1
        return time.perf_counter()

    def _done(self, label: str, context, t0: float, failed: bool) -> None:
        with self._lock:
            self.active -= 1
        code = _code_name(context)
        if failed and code == "OK":
            # No code set: the handler raised past the error mapping, or (a stream) the
            # client went away and gRPC closed the generator.
            code = "UNKNOWN" if context.is_active() else "CANCELLED"
        self.counter.labels(label, code).inc()
        if self.duration is not None:
            self.duration.observe(time.perf_counter() - t0)

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        label = self.methods.get(handler_call_details.method)
        if handler is None or label is None:
            return handler
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary_unary(request, context):
                t0, failed = self._start(), True
                try:
                    reply = inner(request, context)
                    failed = False
                    return reply
                finally:
                    self._done(label, context, t0, failed)

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def unary_stream(request, context):
                t0, failed = self._start(), True
                try:
                    yield from inner_stream(request, context)
                    failed = False
                finally:
                    self._done(label, context, t0, failed)

            return handler._replace(unary_stream=unary_stream)
        return handler
