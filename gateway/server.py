"""moe-gateway: the client-facing gRPC server.

    moe-gateway --model tiny --expert-servers 127.0.0.1:50061,127.0.0.1:50062 --port 50051

Serves moe.gateway.v1.GatewayService, inference.GRPCInferenceService (Open
Inference Protocol v2), grpc.health.v1.Health and server reflection. Health is
NOT_SERVING until the model is loaded and every expert server holds its experts.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from gateway.batcher import Batcher
from gateway.config import GatewayConfig
from gateway.engine import Engine
from gateway.membership import Membership
from gateway.metrics import Exposure, server_interceptors
from gateway.servicer import Counters, GatewayServicer, InferenceServicer, MembershipServicer
from moe_common import metrics, model_source, serving, tls
from moe_protos.inference import grpc_predict_v2_pb2 as oip
from moe_protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAMES = [
    gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
    oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
    gateway_pb2.DESCRIPTOR.services_by_name["MembershipService"].full_name,
]


class Gateway:
    """A running gateway: gRPC server, engine, batcher and membership. stop() releases all."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        self.engine = Engine(config)
        self.batcher = Batcher(self.engine, config.max_batch_size, config.max_wait_ms, config.max_queued_prompts)
        self.membership = Membership(self.engine)
        counters = Counters()
        self.server, self.port, health = serving.create_server(
            config.address,
            [
                lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
                    GatewayServicer(self.engine, self.batcher, counters, self.membership), s),
                lambda s: gateway_pb2_grpc.add_MembershipServiceServicer_to_server(MembershipServicer(self.membership), s),
                lambda s: oip_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.engine, self.batcher, counters), s),
            ],
            SERVICE_NAMES,
            max_workers=config.max_workers,
            tls=config.tls,
            interceptors=server_interceptors(),
        )
        self.metrics = None
        # Bound and answering health (NOT_SERVING) while expert servers load their experts.
        try:
            self.engine.connect()
        except BaseException:
            self.stop()
            raise
        self.membership.start()
        self.metrics = Exposure(self)
        serving.set_serving(health, SERVICE_NAMES)

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        self.membership.stop()
        self.server.stop(grace=2).wait()
        self.batcher.stop()
        self.engine.close()


def parse_args(argv=None) -> GatewayConfig:
    p = argparse.ArgumentParser(prog="moe-gateway", description="Serve a Switch Transformer whose experts run on expert servers.")
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, or preset (tiny, base-e<E>[-l<L>])")
    p.add_argument("--expert-servers", default="", help="comma-separated host:port of the expert servers")
    p.add_argument("--expert-discovery", default="",
                   help="NAME:PORT re-resolved every --membership-interval-s; each address is an expert server "
                        "(a Kubernetes headless Service or compose service); new ones join")
    p.add_argument("--membership-interval-s", type=float, default=1.0, help="period of discovery and the health watch")
    p.add_argument("--evict-after-s", type=float, default=10.0,
                   help="move an unreachable expert server's experts to the others after this long")
    p.add_argument("--join-timeout-s", type=float, default=10.0, help="how long a joining expert server may take to be SERVING")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    p.add_argument("--model-name", default="switch", help="name clients use for the model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=50051)
    p.add_argument("--max-batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.add_argument("--max-prompts-per-request", type=int, default=64)
    p.add_argument("--max-queued-prompts", type=int, default=1024, help="beyond it requests get RESOURCE_EXHAUSTED")
    p.add_argument("--max-workers", type=int, default=64, help="gRPC handler threads")
    p.add_argument("--startup-timeout-s", type=float, default=600.0, help="waiting for expert servers to load")
    p.add_argument("--max-input-tokens", type=int, default=512)
    p.add_argument("--max-new-tokens-limit", type=int, default=512)
    p.add_argument("--default-max-new-tokens", type=int, default=32)
    p.add_argument("--device", default="cpu", help="where the gateway runs its model (attention, norms, routers): "
                   "cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the gateway's model (only float32 reproduces a float32 checkpoint exactly)")
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of hidden states sent to expert servers (only float32 is exact)")
    p.add_argument("--transport", default="auto", choices=["auto", "shm", "grpc"],
                   help="how hidden states reach expert servers: auto uses shared memory with servers on this "
                        "host and bytes in the message elsewhere; shm requires shared memory; grpc never uses it")
    p.add_argument("--expert-timeout-s", type=float, default=60.0)
    p.add_argument("--predictor", default="", help="host:port of the predictor service (optional)")
    p.add_argument("--predictor-timeout-ms", type=float, default=50.0, help="deadline of one forecast call")
    p.add_argument("--replication", default="off", choices=["off", "reactive", "window", "predictive"],
                   help="how replicas of hot experts are planned (predictive needs --predictor)")
    p.add_argument("--replica-policy", default="whole", choices=["whole", "split"],
                   help="whole: each expert's tokens to one holder (bit-identical outputs); "
                        "split: also split one expert's tokens over holders (float-tolerance outputs)")
    p.add_argument("--replication-window", type=int, default=8, help="batches per plan in window mode")
    p.add_argument("--replication-min-gain", type=float, default=0.02,
                   help="keep the current replicas unless a new plan cuts the forecast makespan by this share")
    p.add_argument("--redundancy", type=int, default=1,
                   help="keep every logical expert on this many servers (home + standby replicas within "
                        "--replica-memory): with 2, a crashed server's experts need no loading")
    p.add_argument("--record-traces", type=Path, default=None, help="record every pass's routing into this directory")
    p.add_argument("--log-level", default="INFO")
    tls.add_arguments(p)
    metrics.add_arguments(p)
    a = p.parse_args(argv)
    serving.configure_logging(a.log_level, a.log_format)
    try:
        return GatewayConfig(
            model=a.model,
            expert_servers=[s.strip() for s in a.expert_servers.split(",") if s.strip()],
            expert_discovery=a.expert_discovery,
            membership_interval_s=a.membership_interval_s,
            evict_after_s=a.evict_after_s,
            join_timeout_s=a.join_timeout_s,
            cache_dir=a.cache_dir,
            model_name=a.model_name,
            host=a.host,
            port=a.port,
            max_batch_size=a.max_batch_size,
            max_wait_ms=a.max_wait_ms,
            max_prompts_per_request=a.max_prompts_per_request,
            max_queued_prompts=a.max_queued_prompts,
            max_workers=a.max_workers,
            startup_timeout_s=a.startup_timeout_s,
            max_input_tokens=a.max_input_tokens,
            max_new_tokens_limit=a.max_new_tokens_limit,
            default_max_new_tokens=a.default_max_new_tokens,
            device=a.device,
            dtype=a.dtype,
            wire_dtype=a.wire_dtype,
            transport=a.transport,
            expert_timeout_s=a.expert_timeout_s,
            predictor=a.predictor,
            predictor_timeout_ms=a.predictor_timeout_ms,
            record_traces=a.record_traces,
            replication=a.replication,
            replica_policy=a.replica_policy,
            replication_window=a.replication_window,
            replication_min_gain=a.replication_min_gain,
            redundancy=a.redundancy,
            tls=tls.from_args(a),
            metrics_port=a.metrics_port,
        )
    except ValueError as exc:
        p.error(str(exc))


def main(argv=None) -> int:
    serving.die_with_parent()
    config = parse_args(argv)
    gateway = Gateway(config)
    log.info("gateway on %s:%d serving model %r (%s) with %d expert servers",
             config.host, gateway.port, config.model_name, gateway.engine.source.spec, len(gateway.engine.clients.addresses))
    if gateway.metrics.port:
        log.info("gateway metrics on http://%s:%d/metrics", config.host, gateway.metrics.port)
    serving.wait_for_termination()
    log.info("shutting down")
    gateway.stop()
    return 0
