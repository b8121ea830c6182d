"""gRPC servicer of moe.predictor.v1.PredictorService over a Predictor."""

from __future__ import annotations

import time

import numpy as np

from moe_common.errors import InvalidArgument
from moe_common.traces import DECODER, ENCODER
from moe_protos.moe.predictor.v1 import predictor_pb2 as pb
from moe_protos.moe.predictor.v1 import predictor_pb2_grpc
from predictor_service.metrics import METRICS
from predictor_service.predictor import Predictor

KIND_FROM_PB = {pb.PASS_KIND_ENCODER: ENCODER, pb.PASS_KIND_DECODER: DECODER}


class PredictorServicer(predictor_pb2_grpc.PredictorServiceServicer):
    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    def Forecast(self, request, context):
        self.predictor.check_model(request.model_id)
        if request.kind not in KIND_FROM_PB:
            raise InvalidArgument("kind must be PASS_KIND_ENCODER or PASS_KIND_DECODER")
        b, s = request.batch_size, request.seq_len
        if b * s != len(request.token_ids):
            raise InvalidArgument(f"batch_size {b} x seq_len {s} != {len(request.token_ids)} token ids")
        t0 = time.perf_counter_ns()
        tokens = np.asarray(request.token_ids, dtype=np.int64).reshape(b, s)
        out = self.predictor.forecast(KIND_FROM_PB[request.kind], tokens)
        reply = pb.ForecastResponse(method=self.predictor.method)
        for layer, load, hot in out:
            reply.layers.add(layer=layer, load=load.tolist(), hot_experts=hot)
        reply.forecast_ns = time.perf_counter_ns() - t0
        METRICS.forecast.observe(reply.forecast_ns / 1e9)
        return reply

    def ReportLoads(self, request, context):
        self.predictor.check_model(request.model_id)
        self.predictor.report([(x.layer, np.asarray(x.load, dtype=np.float64)) for x in request.layers])
        return pb.ReportLoadsResponse()

    def GetStatus(self, request, context):
        return pb.GetStatusResponse(**self.predictor.status())
