"""moe-expert-server: serve the experts of one shard over gRPC.

    moe-expert-server --model tiny --port 50061                 # experts assigned by the gateway
    moe-expert-server --model tiny --port 50061 --shard 0/2     # preload shard 0 of 2 (home placement)
    moe-expert-server --model DIR --experts 0:0-3,1:0-3         # preload these (layer:expert)
    moe-expert-server --model tiny --port 50063 --register-with 127.0.0.1:50052   # join a running gateway (its admin port)

On SIGTERM the server drains: health turns NOT_SERVING, GetInfo says draining, the
gateway moves its home experts to the other servers (gateway/membership.py), and
the server exits once it holds none (or after --drain-timeout-s).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

import grpc

from expert_server.config import GROUP_EXECUTORS, ExpertServerConfig, parse_bytes, parse_expert_list
from expert_server.experts import ExpertStore
from expert_server.kernels import KERNELS
from expert_server.lane import LaneServer
from expert_server.metrics import Exposure
from expert_server.servicer import ExpertServicer
from moe_common import lane, metrics, model_source, serving, tls, tracing
from moe_common.cli_help import HelpFormatter
from moe_common.placement import experts_of_server, home_placement
from moe_protos.moe.expert.v1 import expert_pb2, expert_pb2_grpc
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

log = logging.getLogger(__name__)
SERVICE_NAME = expert_pb2.DESCRIPTOR.services_by_name["ExpertService"].full_name


def initial_experts(config: ExpertServerConfig, store: ExpertStore) -> list[tuple[int, int]]:
    if config.experts == "all":
        return [(layer, e) for layer in range(len(store.layers)) for e in range(store.num_experts)]
    if config.experts:
        return parse_expert_list(config.experts)
    if config.shard is not None:
        index, count = config.shard
        return experts_of_server(home_placement(len(store.layers), store.num_experts, count), index)
    return []


class ExpertServer:
    """A running expert server: gRPC server, expert store, and its shutdown (drain)."""

    def __init__(self, config: ExpertServerConfig):
        if config.threads:
            import torch

            torch.set_num_threads(config.threads)
        self.config = config
        source = model_source.resolve(config.model, config.cache_dir)
        self.store = ExpertStore(source, config.device, config.dtype, config.group_executor, config.replica_memory,
                                 kernel=config.expert_kernel)
        self.servicer = ExpertServicer(self.store, config.tls, config.simulate_load_delay_s,
                                       shared_memory=config.shared_memory)
        self.activity = serving.ActivityInterceptor()
        self.server, self.port, self.health = serving.create_server(
            config.address,
            [lambda s: expert_pb2_grpc.add_ExpertServiceServicer_to_server(self.servicer, s)],
            [SERVICE_NAME],
            max_workers=config.max_workers,
            tls=config.tls,
            interceptors=[self.activity, tracing.IncomingInterceptor()],
        )
        self.metrics = None
        self.lane = None
        try:
            if config.shared_memory and config.local_lane and lane.available():
                self.lane = self.servicer.lane = LaneServer(lambda request: self.servicer.RunExperts(request, None),
                                                            self.activity.touch)
            self.store.assign(initial_experts(config, self.store))
            self.metrics = Exposure(self.store, config.host, config.metrics_port)
        except BaseException:
            self.stop()
            raise
        serving.set_serving(self.health, [SERVICE_NAME])

    def register(self) -> None:
        """Join the gateway given by --register-with (it moves a share of experts here)."""
        me = self.config.advertised(self.port)
        try:
            with self.config.tls.channel(self.config.register_with) as channel:
                change = gateway_pb2_grpc.MembershipServiceStub(channel).AddExpertServer(
                    gateway_pb2.AddExpertServerRequest(address=me), timeout=self.config.drain_timeout_s + 600)
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.ALREADY_EXISTS:
                raise
            # Restarted at the address of a member (moe-serve restarts a crashed server so):
            # the gateway gives this server its home experts back on its first call.
            log.info("gateway %s: %s is already a member; it re-assigns our experts on first use",
                     self.config.register_with, me)
            return
        log.info("joined gateway %s as %s: %d experts moved in %.2f s", self.config.register_with, me,
                 change.experts_moved, change.total_s)

    def drain(self) -> None:
        """Shut down without failing requests: say NOT_SERVING (draining), ask the gateway to
        move our home experts away (or wait for its health watch to), and serve until we hold
        none, or nobody has called for drain_quiet_s (no gateway is watching: it stopped
        first, or never used us), or the drain timeout passes."""
        self.servicer.draining.set()
        serving.set_serving(self.health, [SERVICE_NAME], serving=False)
        deadline = time.monotonic() + self.config.drain_timeout_s
        if self.store.home() and self.config.register_with:
            try:
                with self.config.tls.channel(self.config.register_with) as channel:
                    gateway_pb2_grpc.MembershipServiceStub(channel).RemoveExpertServer(
                        gateway_pb2.RemoveExpertServerRequest(address=self.config.advertised(self.port)),
                        timeout=self.config.drain_timeout_s)
            except grpc.RpcError as err:
                log.warning("leaving gateway %s: %s: %s", self.config.register_with, err.code().name, err.details())
        while self.store.home() and time.monotonic() < deadline:
            if time.monotonic() - self.activity.last_call > self.config.drain_quiet_s:
                log.info("no calls for %.1f s: no gateway is using this server; stopping", self.config.drain_quiet_s)
                return
            time.sleep(0.1)
        if self.store.home():
            log.warning("drain timeout: stopping with %d home experts still assigned", len(self.store.home()))

    def stop(self) -> None:
        if self.metrics is not None:
            self.metrics.stop()
        stopped = self.server.stop(grace=2)
        if self.lane is not None:
            self.lane.stop(grace_s=2)
        stopped.wait()
        self.store.close()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-expert-server", formatter_class=HelpFormatter,
                                description="Serve expert FFNs of a Switch Transformer over gRPC.")
    p.add_argument("--model", required=True, help="checkpoint directory, hub id, or preset (tiny, base-e<E>[-l<L>])")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR, help="where presets are built")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (loopback by default)")
    p.add_argument("--port", type=int, default=0, help="port to bind (0 = any free port, printed at start)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="float32", help="compute dtype of expert weights")
    p.add_argument("--group-executor", default="sequential", choices=list(GROUP_EXECUTORS),
                   help="run the experts of one call one after another, on a thread pool, or (CUDA) each "
                        "on one of 4 CUDA streams; all three are bit-identical")
    p.add_argument("--expert-kernel", default="exact", choices=list(KERNELS),
                   help="exact: HF's ops per expert, bit-identical to HF (default); grouped: one grouped GEMM "
                        "per projection over the layer's stacked experts (for CUDA, in bf16 there; not bit-exact)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0 = all cores)")
    p.add_argument("--replica-memory", default="0", help="memory for replicas of other servers' experts, e.g. 2GB")
    p.add_argument("--experts", default="", help='experts to load at start: "all" or "L:E,L:E-E,..."')
    p.add_argument("--shard", default=None, help="INDEX/COUNT: load this shard of the default home placement")
    p.add_argument("--max-workers", type=int, default=16, help="gRPC handler threads")
    p.add_argument("--register-with", default="", help="the gateway's admin address (its --admin-port) to join at start and leave at shutdown")
    p.add_argument("--advertise", default="", help="host:port the gateway should call (default: --host:--port)")
    p.add_argument("--drain-timeout-s", type=float, default=60.0,
                   help="on SIGTERM, serve on until the gateway moved our experts away, at most this long")
    p.add_argument("--drain-quiet-s", type=float, default=2.5,
                   help="...or until no call (health checks included) arrived for this long")
    p.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                   help="refuse hidden states in shared memory from a gateway on this host (it then sends bytes)")
    p.add_argument("--no-local-lane", dest="local_lane", action="store_false",
                   help="take layer calls from a gateway on this host over gRPC only, not over a Unix socket")
    p.add_argument("--simulate-load-delay-s", type=float, default=0.0,
                   help="testing: wait this long in every AssignExperts or SetReplicas that loads experts (a slow disk)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    tls.add_arguments(p)
    metrics.add_arguments(p)
    return p


def parse_args(argv=None) -> ExpertServerConfig:
    p = build_parser()
    a = p.parse_args(argv)
    serving.configure_logging(a.log_level, a.log_format)
    shard = None
    if a.shard:
        index, _, count = a.shard.partition("/")
        if not (index.isdigit() and count.isdigit()):
            p.error(f"--shard must look like INDEX/COUNT, e.g. 0/2, not {a.shard!r}")
        shard = (int(index), int(count))
    try:
        return ExpertServerConfig(
            model=a.model,
            cache_dir=a.cache_dir,
            host=a.host,
            port=a.port,
            device=a.device,
            dtype=a.dtype,
            group_executor=a.group_executor,
            expert_kernel=a.expert_kernel,
            experts=a.experts,
            shard=shard,
            max_workers=a.max_workers,
            threads=a.threads,
            replica_memory=parse_bytes(a.replica_memory),
            register_with=a.register_with,
            advertise=a.advertise,
            drain_timeout_s=a.drain_timeout_s,
            drain_quiet_s=a.drain_quiet_s,
            simulate_load_delay_s=a.simulate_load_delay_s,
            shared_memory=a.shared_memory,
            local_lane=a.local_lane,
            tls=tls.from_args(a),
            metrics_port=a.metrics_port,
        )
    except ValueError as exc:
        p.error(str(exc))


def main(argv=None) -> int:
    serving.die_with_parent()
    config = parse_args(argv)
    server = ExpertServer(config)
    store = server.store
    log.info(
        "expert server on %s:%d: model %s (%s), %d experts held, %.1f MB, device %s",
        config.host, server.port, config.model, store.source.model_id, len(store.held()), store.weight_bytes() / 1e6,
        store.device,
    )
    if config.register_with:
        try:
            server.register()
        except (grpc.RpcError, ValueError) as err:
            detail = f"{err.code().name}: {err.details()}" if isinstance(err, grpc.RpcError) else str(err)
            log.error("could not join gateway %s: %s", config.register_with, detail)
            server.stop()
            return 1
    serving.wait_for_termination()
    log.info("shutting down: draining")
    server.drain()
    server.stop()
    return 0
