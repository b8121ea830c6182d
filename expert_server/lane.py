"""The server end of the local lane (moe_common/lane.py): RunExperts from a gateway on
this host over a Unix socket, answered by the same servicer method as over gRPC.

One thread accepts; each connection gets a thread that serves its calls one at a time
(a gateway opens one connection per concurrent layer call to this server, as gRPC would
run each call on a pool thread). Errors map to status codes exactly as the gRPC
interceptor maps them (moe_common/errors.py), so the gateway handles both alike.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
import struct
import threading
import time
from typing import Callable

import grpc
from google.protobuf.message import DecodeError

from moe_common import lane, tracing
from moe_common.errors import MoEError
from moe_protos.moe.expert.v1 import expert_pb2

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64  # a gateway needs one per concurrent layer call to this server


class LaneServer:
    """Listens on a fresh abstract socket; `name` and `token` go to callers through
    AttachSharedMemory. run(request) -> RunExpertsResponse raises MoEError for the
    caller's mistakes; on_call() is told of every call (the drain's activity clock)."""

    def __init__(self, run: Callable[[expert_pb2.RunExpertsRequest], expert_pb2.RunExpertsResponse],
                 on_call: Callable[[], None] = lambda: None):
        self.run = run
        self.on_call = on_call
        self.name = lane.lane_name(os.getpid())
        self.token = secrets.token_bytes(lane.TOKEN_BYTES)
        self._uid = os.getuid()
        self._listener = lane.new_socket()
        self._listener.bind(lane.address(self.name))
        self._listener.listen(16)
        self._lock = threading.Lock()
        self._connections: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._stopping = False
        self._acceptor = threading.Thread(target=self._accept, name="lane-accept", daemon=True)
        self._acceptor.start()

    def stop(self, grace_s: float = 2.0) -> None:
        """Stop taking calls; a call being computed still gets its reply (within grace_s)."""
        with self._lock:
            self._stopping = True
            connections, threads = list(self._connections), list(self._threads)
        try:
            self._listener.shutdown(socket.SHUT_RDWR)  # wakes accept()
        except OSError:
            pass
        self._listener.close()
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RD)  # its thread ends after the reply it owes
            except OSError:
                pass
        deadline = time.monotonic() + grace_s
        for thread in [self._acceptor, *threads]:
            thread.join(max(0.0, deadline - time.monotonic()))

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return  # stopped
            with self._lock:
                if self._stopping or len(self._connections) >= MAX_CONNECTIONS:
                    conn.close()
                    continue
                self._connections.add(conn)
                thread = threading.Thread(target=self._serve, args=(conn,), name="lane-conn", daemon=True)
                self._threads.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            if self._admit(conn):
                while True:
                    message = lane.receive(conn)
                    if not message:
                        return  # the gateway closed it, or stop()
                    conn.sendall(self._handle(message))
        except (OSError, ValueError) as exc:
            log.debug("local lane connection ended: %s", exc)
        finally:
            with self._lock:
                self._connections.discard(conn)
                self._threads.discard(threading.current_thread())
            conn.close()

    def _admit(self, conn: socket.socket) -> bool:
        """Only this user's processes that hold the token may call."""
        pid, uid, _gid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                            struct.calcsize("3i")))
        if uid != self._uid:
            log.warning("local lane: refused a connection from pid %d of uid %d", pid, uid)
            return False
        conn.settimeout(5.0)  # a hello that never comes does not hold a thread for ever
        if not secrets.compare_digest(lane.receive(conn), self.token):
            log.warning("local lane: refused a connection from pid %d without the token", pid)
            return False
        conn.settimeout(None)
        conn.sendall(b"\0")
        return True

    def _handle(self, message: bytes) -> bytes:
        self.on_call()
        t0 = time.perf_counter()
        try:
            body, rid, bid = lane.decode_request(message)
            request = expert_pb2.RunExpertsRequest.FromString(body)
        except (ValueError, UnicodeDecodeError, DecodeError) as exc:
            return lane.encode_reply(grpc.StatusCode.INVALID_ARGUMENT, f"malformed request: {exc}".encode())
        token = tracing.set_current(rid, bid)
        try:
            reply = self.run(request)
            return lane.encode_reply(grpc.StatusCode.OK, reply.SerializeToString())
        except MoEError as exc:
            log.info("RunExperts (local lane) -> %s: %s", exc.code.name, exc)
            return lane.encode_reply(exc.code, str(exc).encode())
        except Exception as exc:  # noqa: BLE001 - the caller gets INTERNAL, as over gRPC
            log.exception("RunExperts (local lane) failed")
            return lane.encode_reply(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}".encode())
        finally:
            tracing.log_call("RunExperts", t0, rid)
            tracing.reset_current(token)
