"""The gateway's side of load forecasting and routing traces.

For every forward pass (the encoder pass, each decoder step) the gateway asks the
predictor service for a forecast as soon as the pass's tokens are known: the call
runs beside the pass under a deadline (--predictor-timeout-ms), and its arrival is
counted. Predictive replication plans from `forecast_batch`: the forecast of the
requests queued to run NEXT, asked on the replica planner's thread while the current
batch runs (gateway/replicas.py), so no batch waits for the predictor. When a pass
ends the gateway reports the loads the router actually produced, and optionally
appends the pass to a trace directory. The predictor being slow, down or wrong costs
a log line and a counter, never a request.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass

import grpc
import numpy as np
import torch

from gateway.metrics import METRICS
from moe_common import tracing
from moe_common.serving import message_options
from moe_common.tls import PLAINTEXT, TlsConfig
from moe_common.traces import DECODER, ENCODER, Pass, RoutingRecorder, TraceInfo, TraceWriter
from moe_protos.moe.predictor.v1 import predictor_pb2 as pb
from moe_protos.moe.predictor.v1 import predictor_pb2_grpc

log = logging.getLogger(__name__)
_KIND = {ENCODER: pb.PASS_KIND_ENCODER, DECODER: pb.PASS_KIND_DECODER}


@dataclass
class ForecastCounters:
    ok: int = 0  # forecasts that arrived before their pass ended
    late: int = 0  # still running when the pass ended (deadline too short or predictor slow)
    failed: int = 0  # errors: predictor down, deadline exceeded, rejected
    reports_failed: int = 0


class PassObserver:
    """Hooks the gateway's model: forecast requests, load reports and trace recording."""

    def __init__(self, model, info: TraceInfo, predictor_address: str = "", timeout_ms: float = 50.0,
                 trace_writer: TraceWriter | None = None, tls: TlsConfig = PLAINTEXT):
        self.info = info
        self.timeout_s = timeout_ms / 1000
        self.writer = trace_writer
        self.counters = ForecastCounters()
        self.address = predictor_address
        self.channel = tls.channel(predictor_address, options=message_options()) if predictor_address else None
        self.stub = (predictor_pb2_grpc.PredictorServiceStub(tracing.intercept(self.channel, METRICS.predictor_timer))
                     if self.channel else None)
        self.last_forecast: dict[int, np.ndarray] = {}  # layer -> expected load [E] of the latest pass
        self._pending = None
        self._decoder_tokens: torch.Tensor | None = None  # [B, t] decoder tokens of the current batch
        self._lock = threading.Lock()
        self.replicas = None  # a ReplicaManager, set by the engine once it knows the servers' slots
        self.recorder = RoutingRecorder(model, info, on_pass=self._on_pass, on_start=self._on_start)

    def close(self) -> None:
        self.recorder.remove()
        if self.writer is not None:
            self.writer.close()
        if self.channel is not None:
            self.channel.close()

    def _on_start(self, kind: int, batch_id: int, step: int, input_ids: torch.Tensor) -> None:
        if kind == ENCODER:
            self._decoder_tokens = None
            tokens = input_ids
        elif input_ids.shape[1] == 1 and self._decoder_tokens is not None and self._decoder_tokens.shape[0] == input_ids.shape[0]:
            tokens = self._decoder_tokens = torch.cat([self._decoder_tokens, input_ids], dim=1)
        else:
            tokens = self._decoder_tokens = input_ids
        planned_ahead = False
        if kind == ENCODER and self.replicas is not None:
            # Never waits: planning runs on its worker thread.
            planned_ahead = self.replicas.batch_started(input_ids)
        # A batch planned ahead had these very tokens forecast while the previous batch
        # ran: the predictor holds that forecast for this pass's load report already.
        if self.stub is not None and not planned_ahead:
            b, s = tokens.shape
            request = pb.ForecastRequest(model_id=self.info.model_id, kind=_KIND[kind], batch_size=b, seq_len=s,
                                         token_ids=tokens.reshape(-1).tolist())
            self._pending = self.stub.Forecast.future(request, timeout=self.timeout_s)

    def _on_pass(self, p: Pass) -> None:
        if self.writer is not None:
            self.writer.add(p)
        loads = p.loads(self.info.num_experts)
        if self.replicas is not None:
            self.replicas.observe(p, loads)
        if self.stub is None:
            return
        self._collect_forecast()
        METRICS.forecast_checked(self.last_forecast, self.info.layers_of(p.kind), loads)
        request = pb.ReportLoadsRequest(model_id=self.info.model_id, layers=[
            pb.LayerLoad(layer=layer, load=loads[j].tolist()) for j, layer in enumerate(self.info.layers_of(p.kind))])
        self.stub.ReportLoads.future(request, timeout=self.timeout_s * 10).add_done_callback(self._on_report_done)

    def warm_up(self, timeout_s: float) -> bool:
        """One forecast before the gateway reports SERVING, with a start-up deadline rather
        than the per-pass one: a predictor's first forecast is slow (the SRU's first call,
        lazy channel set-up), and timing it out would count as a failure on every fresh
        stack. Not counted; True when the predictor answered."""
        if self.stub is None:
            return True
        request = pb.ForecastRequest(model_id=self.info.model_id, kind=pb.PASS_KIND_ENCODER, batch_size=1, seq_len=1,
                                     token_ids=[0])
        try:
            self.stub.Forecast(request, timeout=timeout_s)
        except grpc.RpcError as err:
            log.warning("predictor %s did not answer a first forecast within %.0f s (%s: %s); serving anyway: each "
                        "pass asks it again, and passes without a forecast are counted in GetStatus",
                        self.address, timeout_s, err.code().name, err.details())
            return False
        return True

    def forecast_batch(self, input_ids: torch.Tensor) -> dict[int, np.ndarray] | None:
        """The forecast of an encoder pass over input_ids [B, S]: layer -> expected load
        [E], or None when the predictor fails or answers nonsense (counted and logged).
        Blocks up to the predictor deadline: call it off the request path."""
        if self.stub is None:
            return None
        b, s = input_ids.shape
        request = pb.ForecastRequest(model_id=self.info.model_id, kind=pb.PASS_KIND_ENCODER, batch_size=b, seq_len=s,
                                     token_ids=input_ids.reshape(-1).tolist())
        try:
            reply = self.stub.Forecast(request, timeout=self.timeout_s)
        except grpc.RpcError as err:
            self._count("failed", f"{err.code().name}: {err.details()}")
            return None
        return self._checked(reply)

    def _collect_forecast(self) -> None:
        pending, self._pending = self._pending, None
        self.last_forecast = {}  # none for a pass that asked for none (planned ahead)
        if pending is None:
            return
        if not pending.done():
            pending.cancel()
            self._count("late", None)
            return
        try:
            reply = pending.result()
        except grpc.FutureCancelledError:
            self._count("late", None)
            return
        except grpc.RpcError as err:
            self._count("failed", f"{err.code().name}: {err.details()}")
            return
        self.last_forecast = self._checked(reply) or {}

    def _checked(self, reply) -> dict[int, np.ndarray] | None:
        """A ForecastResponse as layer -> load [E]; None (counted as failed) when it cannot be right."""
        forecast = {f.layer: np.asarray(f.load, dtype=np.float64) for f in reply.layers}
        valid = set(self.info.encoder_layers) | set(self.info.decoder_layers)
        bad = [layer for layer, load in forecast.items()
               if layer not in valid or load.shape != (self.info.num_experts,) or not np.all(np.isfinite(load))
               or np.any(load < 0)]
        if bad:  # a forecast that cannot be right must not reach the planner
            self._count("failed", f"malformed forecast for layers {bad}")
            return None
        self._count("ok", None)
        return forecast

    def _on_report_done(self, future) -> None:
        if future.exception() is not None:
            self._count("reports_failed", str(future.exception()))

    def _count(self, what: str, error: str | None) -> None:
        with self._lock:
            n = getattr(self.counters, what) + 1
            setattr(self.counters, what, n)
        if error is not None and (n == 1 or n % 100 == 0):
            log.warning("predictor %s: forecast %s %d time(s), last: %s; those passes ran without a forecast "
                        "(requests are unaffected) and every later pass asks again", self.address, what, n, error)
