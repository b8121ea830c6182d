"""moe-gateway: the client-facing gRPC server.

    moe-gateway --model tiny --expert-servers 127.0.0.1:50061,127.0.0.1:50062 --port 50051

Serves moe.gateway.v1.GatewayService, inference.GRPCInferenceService (Open
Inference Protocol v2), grpc.health.v1.Health and server reflection on the client
port. Health is NOT_SERVING until the model is loaded and every expert server holds
its experts. What changes the deployment (MembershipService) is served only on the
admin port (--admin-port, loopback by default), which also answers a full GetStatus.
"""

from __future__ import annotations

import argparse
import logging
import signal
from pathlib import Path

from gateway.batcher import Batcher
from gateway.config import GatewayConfig
from gateway.engine import Engine
from gateway.membership import Membership
from gateway.metrics import Exposure, server_interceptors
from gateway.scheduler import ContinuousScheduler
from gateway.servicer import Counters, GatewayServicer, InferenceServicer, MembershipServicer
from moe_common import auth, metrics, model_source, serving, tls
from moe_common.cli_help import HelpFormatter
from moe_protos.inference import grpc_predict_v2_pb2 as oip
from moe_protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAMES = [  # the client port
    gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
    oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name,
]
ADMIN_SERVICE_NAMES = [
    gateway_pb2.DESCRIPTOR.services_by_name["MembershipService"].full_name,
    gateway_pb2.DESCRIPTOR.services_by_name["GatewayService"].full_name,
]


class Gateway:
    """A running gateway: gRPC server, engine, batcher and membership. stop() releases all."""

    def __init__(self, config: GatewayConfig):
        self.config = config
        # Read first: a missing key file fails the start before the model loads.
        self.api_keys = (auth.ApiKeys(config.api_keys_file, config.api_key_rate_per_s, config.api_key_max_concurrent)
                         if config.api_keys_file is not None else None)
        self.engine = Engine(config)
        if config.scheduler == "continuous":
            self.batcher = ContinuousScheduler(self.engine, config.max_batch_size, config.max_batch_tokens,
                                               config.max_queued_prompts, config.admission_wait_steps)
        else:
            self.batcher = Batcher(self.engine, config.max_batch_size, config.max_wait_ms, config.max_queued_prompts)
        self.membership = Membership(self.engine)
        counters = Counters()
        self.admin_server = None
        self.metrics = None
        self.server, self.port, health = serving.create_server(
            config.address,
            [
                lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(GatewayServicer(
                    self.engine, self.batcher, counters, self.membership, public=config.public_status), s),
                lambda s: oip_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(self.engine, self.batcher, counters), s),
            ],
            SERVICE_NAMES,
            max_workers=config.max_workers,
            max_message_bytes=config.client_max_message_bytes,
            tls=config.tls,
            # Outermost first: request counts and ids (gateway/metrics.py), then API keys, so
            # refused calls are counted too.
            interceptors=[*server_interceptors(),
                          *([auth.ApiKeyInterceptor(self.api_keys)] if self.api_keys is not None else [])],
            internal=False,
        )
        try:
            # The control plane: cluster credentials (token, peer allow-list) apply here.
            self.admin_server, self.admin_port, admin_health = serving.create_server(
                config.admin_address,
                [
                    lambda s: gateway_pb2_grpc.add_MembershipServiceServicer_to_server(MembershipServicer(self.membership), s),
                    lambda s: gateway_pb2_grpc.add_GatewayServiceServicer_to_server(
                        GatewayServicer(self.engine, self.batcher, counters, self.membership), s),
                ],
                ADMIN_SERVICE_NAMES,
                max_workers=8,
                tls=config.tls,
            )
        except BaseException:
            self.stop()
            raise
        # Bound and answering health (NOT_SERVING) while expert servers load their experts.
        try:
            self.engine.connect()
            self.membership.check_members_sample()  # servers given at start hold the checkpoint's experts too
        except BaseException:
            self.stop()
            raise
        self.membership.start()
        self.metrics = Exposure(self)
        serving.set_serving(admin_health, ADMIN_SERVICE_NAMES)
        serving.set_serving(health, SERVICE_NAMES)

    def reload_api_keys(self) -> None:
        if self.api_keys is not None:
            self.api_keys.reload()

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        self.membership.stop()
        if self.admin_server is not None:
            self.admin_server.stop(grace=2)
        self.server.stop(grace=2).wait()
        self.batcher.stop()
        self.engine.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-gateway", formatter_class=HelpFormatter,
                                description="Serve a Switch Transformer whose experts run on expert servers.")
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, or preset (tiny, base-e<E>[-l<L>])")
    p.add_argument("--expert-servers", default="", help="comma-separated host:port of the expert servers")
    p.add_argument("--expert-discovery", default="",
                   help="NAME:PORT re-resolved every --membership-interval-s; each address is an expert server "
                        "(a Kubernetes headless Service or compose service); new ones join")
    p.add_argument("--membership-interval-s", type=float, default=1.0, help="period of discovery and the health watch")
    p.add_argument("--evict-after-s", type=float, default=10.0,
                   help="move an unreachable expert server's experts to the others after this long")
    p.add_argument("--join-timeout-s", type=float, default=10.0, help="how long a joining expert server may take to be SERVING")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR,
                   help="where presets are built and hub checkpoints are kept")
    p.add_argument("--model-name", default="switch", help="name clients use for the model")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=50051, help="client port (0 = any free one, logged)")
    p.add_argument("--admin-host", default="127.0.0.1",
                   help="address of the admin port (MembershipService, full GetStatus); loopback by default")
    p.add_argument("--admin-port", type=int, default=0,
                   help="port of the control plane (0 = any free one, logged); never give clients this port")
    p.add_argument("--api-keys-file", type=Path, default=None,
                   help="client API keys, one per line (reloaded on SIGHUP); clients send "
                        "'authorization: Bearer KEY'; without it the client port is open")
    p.add_argument("--api-key-rate-per-s", type=float, default=0.0, help="requests per second per key (0 = no limit)")
    p.add_argument("--api-key-max-concurrent", type=int, default=0, help="requests in flight per key (0 = no limit)")
    p.add_argument("--client-status", default="auto", choices=["auto", "full", "public"],
                   help="GetStatus on the client port: public leaves out internal addresses; auto = full on loopback")
    p.add_argument("--max-batch-size", type=int, default=8, help="prompts per batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="how long a request waits for others to batch with")
    p.add_argument("--scheduler", default="continuous", choices=["static", "continuous"],
                   help="continuous (default): requests join and leave the running batch at every decoding step; "
                        "static: a batch runs to its end")
    p.add_argument("--max-batch-tokens", type=int, default=4096,
                   help="continuous scheduler: prompt tokens per admission step")
    p.add_argument("--admission-wait-steps", type=int, default=16,
                   help="continuous scheduler: decode steps an arrival may wait for others to share its encoder pass "
                        "(0: admit at every step)")
    p.add_argument("--max-prompts-per-request", type=int, default=64, help="more prompts in one request: INVALID_ARGUMENT")
    p.add_argument("--max-queued-prompts", type=int, default=1024, help="beyond it requests get RESOURCE_EXHAUSTED")
    p.add_argument("--max-workers", type=int, default=64, help="gRPC handler threads")
    p.add_argument("--startup-timeout-s", type=float, default=600.0, help="waiting for expert servers to load")
    p.add_argument("--max-input-tokens", type=int, default=512, help="longer prompts: INVALID_ARGUMENT")
    p.add_argument("--max-new-tokens-limit", type=int, default=512, help="largest max_new_tokens a request may ask for")
    p.add_argument("--default-max-new-tokens", type=int, default=32, help="max_new_tokens of a request that sets none")
    p.add_argument("--device", default="cpu", help="where the gateway runs its model (attention, norms, routers): "
                   "cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the gateway's model (only float32 reproduces a float32 checkpoint exactly)")
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of hidden states sent to expert servers (only float32 is exact)")
    p.add_argument("--transport", default="auto", choices=["auto", "shm", "grpc"],
                   help="how hidden states reach expert servers: auto uses shared memory with servers on this "
                        "host and bytes in the message elsewhere; shm requires shared memory; grpc never uses it")
    p.add_argument("--no-local-lane", dest="local_lane", action="store_false",
                   help="send layer calls whose rows are in shared memory over gRPC, not over the expert "
                        "server's Unix socket (the local lane)")
    p.add_argument("--expert-timeout-s", type=float, default=60.0, help="deadline of one call to an expert server")
    p.add_argument("--predictor", default="", help="host:port of the predictor service (optional)")
    p.add_argument("--predictor-timeout-ms", type=float, default=50.0, help="deadline of one forecast call")
    p.add_argument("--replication", default="off", choices=["off", "reactive", "window", "predictive"],
                   help="how replicas of hot experts are planned (predictive needs --predictor)")
    p.add_argument("--replica-policy", default="whole", choices=["whole", "split", "auto"],
                   help="whole: each expert's tokens to one holder (bit-identical outputs); "
                        "split: also split one expert's tokens over holders (float-tolerance outputs); "
                        "auto: per layer call, whole unless split finishes more than 5%% sooner")
    p.add_argument("--replica-group-cost", type=float, default=0.0,
                   help="fixed cost of one expert group, in tokens' worth, for dispatch and planning: 0 on CPUs; "
                        "group_s / token_s of benchmarks/gpu_costs.py on a launch-bound GPU")
    p.add_argument("--replica-sharing", default="auto", choices=["auto", "off"],
                   help="auto: servers that share a host's cores (GetInfo) bound a layer by that host's work, so "
                        "the planner moves no weights that only shuffle turns on the same cores; off: plan as if "
                        "every server had cores of its own")
    p.add_argument("--replication-window", type=int, default=8, help="batches per plan in window mode")
    p.add_argument("--replication-min-gain", type=float, default=0.02,
                   help="keep the current replicas unless a new plan cuts the forecast makespan by this share")
    p.add_argument("--redundancy", type=int, default=1,
                   help="keep every logical expert on this many servers (home + standby replicas within "
                        "--replica-memory): with 2, a crashed server's experts need no loading")
    p.add_argument("--record-traces", type=Path, default=None, help="record every pass's routing into this directory")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    tls.add_arguments(p)
    metrics.add_arguments(p)
    return p


def parse_args(argv=None) -> GatewayConfig:
    p = build_parser()
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
            scheduler=a.scheduler,
            max_batch_tokens=a.max_batch_tokens,
            admission_wait_steps=a.admission_wait_steps,
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
            local_lane=a.local_lane,
            expert_timeout_s=a.expert_timeout_s,
            predictor=a.predictor,
            predictor_timeout_ms=a.predictor_timeout_ms,
            record_traces=a.record_traces,
            replication=a.replication,
            replica_policy=a.replica_policy,
            replica_group_cost=a.replica_group_cost,
            replica_sharing=a.replica_sharing,
            replication_window=a.replication_window,
            replication_min_gain=a.replication_min_gain,
            redundancy=a.redundancy,
            tls=tls.from_args(a),
            admin_host=a.admin_host,
            admin_port=a.admin_port,
            api_keys_file=a.api_keys_file,
            api_key_rate_per_s=a.api_key_rate_per_s,
            api_key_max_concurrent=a.api_key_max_concurrent,
            client_status=a.client_status,
            metrics_port=a.metrics_port,
        )
    except ValueError as exc:
        p.error(str(exc))


def main(argv=None) -> int:
    serving.die_with_parent()
    config = parse_args(argv)
    gateway = Gateway(config)
    signal.signal(signal.SIGHUP, lambda *_: gateway.reload_api_keys())
    log.info("gateway on %s:%d serving model %r (%s) with %d expert servers",
             config.host, gateway.port, config.model_name, gateway.engine.source.spec, len(gateway.engine.clients.addresses))
    log.info("admin port (membership) on %s:%d; API keys %s", config.admin_host, gateway.admin_port,
             f"from {config.api_keys_file}" if config.api_keys_file else "off (the client port is open)")
    if gateway.metrics.port:
        log.info("gateway metrics on http://%s:%d/metrics", config.host, gateway.metrics.port)
    serving.wait_for_termination()
    log.info("shutting down")
    gateway.stop()
    return 0
