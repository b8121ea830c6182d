"""A fresh moe-serve logs no warning on a clean start (issue 15): the predictor is warmed up
before the gateway reports SERVING, so its first forecast is not a counted failure."""

import signal
import subprocess
import sys

from moe_common.serving import pick_free_port
from moe_protos.moe.predictor.v1 import predictor_pb2_grpc
from tests.test_launcher import generate, get_status


def test_a_fresh_stack_logs_no_warning_and_counts_no_failed_forecast(tiny, tmp_path):
    port = pick_free_port()
    log = tmp_path / "moe-serve.log"
    with log.open("w") as log_file:
        # --replication predictive without --replica-memory: the implied memory is logged at INFO.
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.launcher", "--model", str(tiny.path), "--cache-dir", str(tiny.path.parents[1]),
             "--expert-servers", "2", "--port", str(port), "--replication", "predictive"],
            stdout=subprocess.PIPE, stderr=log_file, text=True)
        try:
            line = proc.stdout.readline()
            assert line.strip() == f"gateway listening on 127.0.0.1:{port}", log.read_text()
            generate(port)
            status = get_status(port)
            assert status.predictor.address and status.predictor.forecasts_failed == 0
            assert status.predictor.forecasts_ok > 0
            proc.send_signal(signal.SIGINT)
            assert proc.wait(timeout=60) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert "using --replica-memory 256MB (replication predictive needs room for replicas)" in text
    warnings = [line for line in text.splitlines() if " WARNING " in line or " ERROR " in line]
    assert not warnings, "\n".join(warnings)


class _SlowFirstPredictor(predictor_pb2_grpc.PredictorServiceServicer):
    """A predictor whose first forecast takes longer than the gateway's per-pass deadline
    (as a fresh one's does on a busy machine), then answers at once."""

    def __init__(self, info):
        self.info, self.calls = info, 0

    def Forecast(self, request, context):
        import time

        from moe_protos.moe.predictor.v1 import predictor_pb2 as pb

        self.calls += 1
        if self.calls == 1:
            time.sleep(0.5)
        return pb.ForecastResponse(layers=[pb.LayerForecast(layer=layer, load=[1.0] * self.info.num_experts)
                                           for layer in self.info.encoder_layers], method="window")


def _observer_against_slow_first_predictor(reference, tiny):
    import concurrent.futures

    import grpc

    from gateway.forecasts import PassObserver
    from moe_common.traces import TraceInfo

    model, _ = reference
    info = TraceInfo.from_config(model.config, tiny)
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(2))
    servicer = _SlowFirstPredictor(info)
    predictor_pb2_grpc.add_PredictorServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, PassObserver(model, info, f"127.0.0.1:{port}", timeout_ms=100)


def test_warm_up_takes_the_slow_first_forecast_off_the_count(reference, tiny):
    import torch

    ids = torch.tensor([[5, 6, 7, 1]])
    server, observer = _observer_against_slow_first_predictor(reference, tiny)
    try:
        assert observer.warm_up(10.0)
        assert observer.forecast_batch(ids) is not None
        assert (observer.counters.ok, observer.counters.failed) == (1, 0)
    finally:
        observer.close()
        server.stop(0)
    # Without it the same predictor's first forecast is a counted failure: what the warm-up prevents.
    server, observer = _observer_against_slow_first_predictor(reference, tiny)
    try:
        assert observer.forecast_batch(ids) is None
        assert observer.counters.failed == 1
    finally:
        observer.close()
        server.stop(0)
