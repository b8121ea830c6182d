"""Channels to expert servers, and what their RPC errors mean to the gateway.

How bytes reach a server, kept apart from who gets which tokens (gateway/dispatch.py).
A channel is opened for a member on first use and kept while it is a member; a call
to an address that is not a member (a server asking to join, a status read of a view
that has just changed) goes over a channel of its own that is closed afterwards, so
channels never pile up for addresses that left or never joined.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import grpc

from gateway.metrics import METRICS
from moe_common import shm, tracing
from moe_common.errors import FailedPrecondition, MoEError, Unavailable
from moe_common.serving import message_options
from moe_common.tls import PLAINTEXT, TlsConfig
from moe_protos.moe.expert.v1 import expert_pb2_grpc


class ExpertServerError(MoEError):
    """An expert server answered with an error the gateway did not expect: a bug on
    our side, so INTERNAL, whatever code the server used."""


class ExpertsMissing(MoEError):
    """An expert server does not hold an expert the gateway sent it (it restarted)."""

    code = grpc.StatusCode.UNAVAILABLE


class SharedMemoryUnreachable(MoEError):
    """An expert server cannot map the shared-memory segment a call named (it runs on
    another host now): send that call's rows as bytes (gateway/transport.py)."""

    code = grpc.StatusCode.FAILED_PRECONDITION


def call_result(address: str, call):
    """The reply of a call to the expert server at `address` (a future or a reply), with
    its RPC error as the domain error the gateway acts on."""
    try:
        return call.result()
    except grpc.RpcError as err:
        code, details = err.code(), err.details()
        where = f"expert server {address}"
        if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED):
            raise Unavailable(f"{where} is unavailable ({code.name}: {details})") from None
        if code == grpc.StatusCode.NOT_FOUND:
            raise ExpertsMissing(f"{where} lost experts it is home to: {details}") from None
        if code == grpc.StatusCode.FAILED_PRECONDITION and (details or "").startswith(shm.UNREACHABLE):
            raise SharedMemoryUnreachable(f"{where}: {details}") from None
        if code == grpc.StatusCode.FAILED_PRECONDITION:
            raise FailedPrecondition(f"{where}: {details}") from None
        if code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            # Not a bug of ours: the deployment's credentials disagree (--cluster-token-file, --allowed-peers).
            raise FailedPrecondition(f"{where} refused the gateway's cluster credentials ({code.name}: {details}): "
                                     "check --cluster-token-file and --allowed-peers on both") from None
        raise ExpertServerError(f"{where} failed: {code.name}: {details}") from None


class Connections:
    """One channel and stub per member address. Thread-safe."""

    def __init__(self, tls: TlsConfig = PLAINTEXT):
        self.tls = tls
        self._lock = threading.Lock()
        self._channels: dict[str, grpc.Channel] = {}
        self._stubs: dict[str, expert_pb2_grpc.ExpertServiceStub] = {}
        self._plain: dict[str, expert_pb2_grpc.ExpertServiceStub] = {}  # same channel, no interceptor

    def _open(self, address: str) -> grpc.Channel:
        # Reconnect within a second once a server is back (gRPC's default backoff grows to 2 minutes).
        options = [*message_options(), ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.min_reconnect_backoff_ms", 100), ("grpc.max_reconnect_backoff_ms", 1000)]
        return self.tls.channel(address, options=options)

    def stub(self, address: str) -> expert_pb2_grpc.ExpertServiceStub:
        """The stub of a member, opening its channel on first use."""
        with self._lock:
            if address not in self._stubs:
                self._channels[address] = self._open(address)
                # Request ids in the metadata of each call (RunExperts, the hot one, goes
                # through plain_stub and passes them itself), and RunExperts timed per server.
                traced = tracing.intercept(self._channels[address], on_done=METRICS.rpc_timer(address))
                self._stubs[address] = expert_pb2_grpc.ExpertServiceStub(traced)
                self._plain[address] = expert_pb2_grpc.ExpertServiceStub(self._channels[address])
            return self._stubs[address]

    def plain_stub(self, address: str) -> expert_pb2_grpc.ExpertServiceStub:
        """The member's stub without the tracing interceptor, for RunExperts: a Python
        interceptor costs ~35 us a call, so the layer call passes the request ids as
        metadata= and times itself (gateway/dispatch.py)."""
        self.stub(address)
        with self._lock:
            return self._plain[address]

    @contextlib.contextmanager
    def stub_for_call(self, address: str) -> Iterator[expert_pb2_grpc.ExpertServiceStub]:
        """A stub for one call: the member's own, or, for any other address, one on a
        channel that is closed when the block ends."""
        with self._lock:
            stub = self._stubs.get(address)
        if stub is not None:
            yield stub
            return
        channel = self._open(address)
        try:
            yield expert_pb2_grpc.ExpertServiceStub(channel)
        finally:
            channel.close()

    def is_open(self, address: str) -> bool:
        with self._lock:
            return address in self._channels

    def close(self, address: str) -> None:
        with self._lock:
            self._stubs.pop(address, None)
            self._plain.pop(address, None)
            channel = self._channels.pop(address, None)
        if channel is not None:
            channel.close()

    def retain(self, addresses) -> None:
        """Close every channel but those of `addresses` (the members after a change)."""
        with self._lock:
            gone = [a for a in self._channels if a not in set(addresses)]
        for address in gone:
            self.close(address)

    def close_all(self) -> None:
        self.retain(())
