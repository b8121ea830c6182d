"""The gateway end of the local lane (moe_common/lane.py): RunExperts to an expert server
on this host over a Unix socket instead of gRPC, for calls whose rows are in shared memory.

`Lane.start` sends the request at once and returns a `LaneCall`, shaped like the gRPC
future that dispatch reads (result(), cancel()), so a layer's calls to several servers
are all on their way before the gateway waits for any. Failures surface as `LaneError`,
a grpc.RpcError with the status code the same failure has over gRPC (a server that died:
UNAVAILABLE; too slow: DEADLINE_EXCEEDED), so connections.call_result maps both alike.
"""

from __future__ import annotations

import socket
import threading
import time

import grpc
from google.protobuf.message import DecodeError

from moe_common import lane, tracing
from moe_protos.moe.expert.v1 import expert_pb2


class LaneError(grpc.RpcError):
    """A failed local-lane call, read like a failed gRPC call."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(f"{code.name}: {details}")
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details


class Lane:
    """Connections to one expert server's lane, pooled: each call takes an idle one (or
    opens one) and gives it back once its reply is in. Thread-safe."""

    def __init__(self, name: str, token: bytes, max_idle: int = 8):
        self.name = name
        self._token = token
        self._max_idle = max_idle
        self._lock = threading.Lock()
        self._idle: list[socket.socket] = []
        self._closed = False

    def start(self, request: expert_pb2.RunExpertsRequest, timeout_s: float,
              metadata: tuple[tuple[str, str], ...] = ()) -> "LaneCall":
        """Send `request` now; the reply is read by LaneCall.result(). Raises OSError when
        it could not be sent (no such lane: the server restarted or stopped), so the
        caller can send it over gRPC instead, where a restarted server simply answers.
        A server that accepts but does not answer gives a call that fails DEADLINE_EXCEEDED."""
        ids = dict(metadata)
        message = lane.encode_request(request.SerializeToString(), ids.get(tracing.REQUEST_ID_KEY, ""),
                                      ids.get(tracing.BATCH_ID_KEY, ""))
        deadline = time.monotonic() + timeout_s
        try:
            sock = self._take(timeout_s)
        except TimeoutError:  # it is there but does not answer: as a gRPC call past its deadline
            return LaneCall(self, None, deadline, LaneError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                                            "local lane: no answer to the hello"))
        try:
            sock.sendall(message)
        except BaseException:
            sock.close()
            raise
        return LaneCall(self, sock, deadline)

    def close(self) -> None:
        with self._lock:
            self._closed, idle, self._idle = True, self._idle, []
        for sock in idle:
            sock.close()

    def _take(self, timeout_s: float) -> socket.socket:
        with self._lock:
            if self._idle:
                return self._idle.pop()
        sock = lane.new_socket()
        try:
            sock.settimeout(timeout_s)
            sock.connect(lane.address(self.name))
            sock.sendall(self._token)
            if lane.receive(sock) != b"\0":
                raise ConnectionRefusedError("the expert server refused the lane token")
        except ValueError as exc:
            sock.close()
            raise ConnectionRefusedError(str(exc)) from None
        except BaseException:
            sock.close()
            raise
        return sock

    def _give_back(self, sock: socket.socket) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self._max_idle:
                self._idle.append(sock)
                return
        sock.close()


class LaneCall:
    """One call on its way; result() waits for its reply (until the deadline)."""

    def __init__(self, owner: Lane, sock: socket.socket | None, deadline: float, error: LaneError | None = None):
        self._owner, self._sock, self._deadline, self._error = owner, sock, deadline, error
        self._reply: expert_pb2.RunExpertsResponse | None = None

    def result(self) -> expert_pb2.RunExpertsResponse:
        if self._sock is not None:
            self._receive()
        if self._error is not None:
            raise self._error
        return self._reply

    def cancel(self) -> bool:
        """Abandon the call: its connection is closed (a reply may still be on its way)."""
        if self._sock is None:
            return False
        self._sock.close()
        self._sock, self._error = None, LaneError(grpc.StatusCode.CANCELLED, "local lane call cancelled")
        return True

    def _receive(self) -> None:
        sock, self._sock = self._sock, None
        try:
            sock.settimeout(max(self._deadline - time.monotonic(), 1e-3))
            message = lane.receive(sock)
            if not message:
                raise ConnectionResetError("the expert server closed the local lane")
            code, body = lane.decode_reply(message)
        except socket.timeout:
            sock.close()
            self._error = LaneError(grpc.StatusCode.DEADLINE_EXCEEDED, "local lane: deadline exceeded")
            return
        except (OSError, ValueError) as exc:
            sock.close()
            self._error = LaneError(grpc.StatusCode.UNAVAILABLE, f"local lane: {exc}")
            return
        self._owner._give_back(sock)
        if code != grpc.StatusCode.OK:
            self._error = LaneError(code, body.decode(errors="replace"))
            return
        try:
            self._reply = expert_pb2.RunExpertsResponse.FromString(body)
        except DecodeError as exc:
            self._error = LaneError(grpc.StatusCode.INTERNAL, f"local lane reply is not a RunExpertsResponse: {exc}")
