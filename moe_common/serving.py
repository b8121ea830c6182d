"""gRPC plumbing shared by every service: server creation with health checking,
reflection and error mapping; channels with raised message limits; waiting on the
health service."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import threading
import time
from concurrent import futures
from typing import Callable, Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from moe_common import tracing
from moe_common.errors import ErrorMappingInterceptor
from moe_common.tls import PLAINTEXT, TlsConfig

log = logging.getLogger(__name__)

# Hidden states of a big batch are tens of MB; gRPC's default receive limit is 4 MiB.
DEFAULT_MAX_MESSAGE_BYTES = 1 << 30


def message_options(max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_receive_message_length", max_message_bytes),
    ]


class ActivityInterceptor(grpc.ServerInterceptor):
    """Notes when the last call of any method (health checks included) arrived."""

    def __init__(self):
        self.last_call = time.monotonic()

    def touch(self) -> None:
        """A call arrived (also told by servers' other ways in, e.g. the local lane)."""
        self.last_call = time.monotonic()

    def intercept_service(self, continuation, handler_call_details):
        self.touch()
        return continuation(handler_call_details)


def create_server(
    address: str,
    register: Iterable[Callable[[grpc.Server], None]],
    service_names: Iterable[str],
    max_workers: int = 16,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    tls: TlsConfig = PLAINTEXT,
    interceptors: Iterable[grpc.ServerInterceptor] = (),
    internal: bool = True,
) -> tuple[grpc.Server, int, health.HealthServicer]:
    """Build and start a server on `address` ("host:port", port 0 = any free one).

    Adds grpc.health.v1.Health (every service NOT_SERVING until the caller says
    otherwise) and server reflection. internal: a cluster-plane server, which enforces
    the cluster token and peer allow-list of `tls` (moe_common/auth.py); the gateway's
    client port is not one. Returns (server, bound port, health servicer).
    """
    cluster = tls.interceptors() if internal else []
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers),
        interceptors=[*cluster, *interceptors, ErrorMappingInterceptor()],
        # Without so_reuseport=0 a second server binds a port already in use and the two
        # silently split the traffic (e.g. a stack started twice on one port).
        options=[*message_options(max_message_bytes), ("grpc.so_reuseport", 0)],
    )
    for add in register:
        add(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = list(service_names)
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        if tls.serving:
            port = server.add_secure_port(address, tls.server_credentials())
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise OSError(f"could not bind {address}: is another server using it?") from exc
    server.start()
    return server, port, health_servicer


def set_serving(health_servicer: health.HealthServicer, service_names: Iterable[str], serving: bool = True):
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        health_servicer.set(name, status)


def wait_for_serving(address: str, timeout_s: float = 120.0, is_alive: Callable[[], bool] | None = None,
                     tls: TlsConfig = PLAINTEXT) -> None:
    """Block until `address` answers SERVING on its health service.

    Polls with a short per-call deadline; raises TimeoutError after timeout_s, or
    RuntimeError as soon as is_alive() says the process behind it died.
    """
    deadline = time.monotonic() + timeout_s
    with tls.channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if is_alive is not None and not is_alive():
                raise RuntimeError(f"the process serving {address} exited before it was ready")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{address} was not SERVING after {timeout_s:.0f} s")
            time.sleep(0.1)


def wait_for_termination() -> None:
    """Block the main thread until SIGINT or SIGTERM."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def pick_free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (the OS may hand it out again; bind soon)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def pick_free_port_run(count: int, host: str = "127.0.0.1", tries: int = 100) -> int:
    """The first of `count` consecutive ports that were all free a moment ago: what
    `moe-serve --metrics-port BASE` needs (BASE for the gateway, BASE+1 for the
    predictor, BASE+2+i for expert server i). Like pick_free_port, bind soon."""
    for _ in range(tries):
        base = pick_free_port(host)  # the OS's choice: a port nobody is about to take
        if base + count > 65536:
            continue
        held = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(s)
                s.bind((host, port))
            return base
        except OSError:
            continue  # one of them is taken: start from another free port
        finally:
            for s in held:
                s.close()
    raise RuntimeError(f"found no {count} consecutive free ports on {host} in {tries} tries")


def configure_logging(level: str = "INFO", fmt: str = "text") -> None:
    """One line per record, text or JSON (--log-format), with the request ids of the
    call being handled (moe_common/tracing.py)."""
    tracing.configure(level, fmt)


# Set by gateway/launcher.py on the processes it starts: the pid they must not outlive.
PARENT_PID_ENV = "MOE_PARENT_PID"


def die_with_parent() -> None:
    """When started by moe-serve or a test (MOE_PARENT_PID set), get SIGTERM when that
    parent dies (Linux PR_SET_PDEATHSIG), and stop at once if it already has.

    Done here, in the child, rather than in a preexec_fn: a preexec_fn makes subprocess
    fork() instead of vfork(), and gRPC's fork handlers can deadlock a fork() that meets
    its shutdown thread (seen in CI: the parent hung in __run_prefork_handlers)."""
    parent = os.environ.pop(PARENT_PID_ENV, "")
    if not parent:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        return  # not Linux: Ctrl-C / SIGTERM handling still stops the children
    if os.getppid() != int(parent):  # the parent died before prctl: nobody will signal us
        os.kill(os.getpid(), signal.SIGTERM)
