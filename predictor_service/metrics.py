"""The predictor service's Prometheus metrics: forecast compute time (a hook in the
servicer) and calls by method and status (a server interceptor)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

from moe_common import metrics as common

# Full method name -> `method` label of moe_predictor_requests_total.
METHODS = {f"/moe.predictor.v1.PredictorService/{m}": m for m in ("Forecast", "ReportLoads", "GetStatus")}


class PredictorMetrics:
    def __init__(self):
        self.registry = r = common.new_registry()
        self.forecast = Histogram("moe_predictor_forecast_seconds", "Compute time of one forecast",
                                  buckets=common.FAST_BUCKETS, registry=r)
        self.requests = Counter("moe_predictor_requests", "Predictor calls by method and gRPC status code",
                                ["method", "status"], registry=r)
        self.interceptor = common.RpcMetricsInterceptor(METHODS, self.requests)


METRICS = PredictorMetrics()
