"""Who may call what: client API keys on the gateway's client port, and the cluster
credentials (shared token, mTLS peer allow-list) every internal call must carry.

Two planes:
  client plane    the gateway's client port (Generate, GenerateStream, GetStatus, OIP).
                  With --api-keys-file every call but health needs
                  `authorization: Bearer KEY`; per-key rate and concurrency limits.
  cluster plane   expert servers, the predictor and the gateway's admin port. With
                  --cluster-token-file every call but health needs the token in the
                  `x-moe-cluster-token` metadata; with --allowed-peers (mutual TLS) the
                  caller's certificate must name an allowed SAN or CN.

Both checks are gRPC server interceptors; health stays open so probes and the
gateway's health watch need no secret. Keys and tokens are compared in constant time,
and a refusal never says which part was wrong.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import grpc

log = logging.getLogger(__name__)

HEALTH_PREFIX = "/grpc.health.v1.Health/"
TOKEN_HEADER = "x-moe-cluster-token"
UNAUTHENTICATED_MESSAGE = "missing or invalid credentials"  # the same for every failure: no hints


def is_loopback(host: str) -> bool:
    """Whether binding `host` keeps a server reachable from this machine only."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def check_bind(host: str, secured: bool, insecure: bool, what: str) -> None:
    """Refuse to expose an internal service beyond loopback without a cluster token or
    mutual TLS, unless the operator said --insecure (e.g. a private network with
    NetworkPolicies). Raises ValueError with the flags that fix it."""
    if secured or insecure or is_loopback(host):
        return
    raise ValueError(f"{what} would bind {host}, beyond loopback, with no caller authentication: give "
                     "--cluster-token-file FILE or mutual TLS (--tls-require-client-cert), or --insecure to "
                     "serve unauthenticated anyway")


def read_secret_lines(path: Path) -> list[str]:
    """Non-empty lines of a key or token file, without '#' comments."""
    lines = [line.strip() for line in Path(path).read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#")]


def read_token(path: Path) -> str:
    """The one token line of a --cluster-token-file; ValueError saying what is wrong."""
    try:
        lines = read_secret_lines(path)
    except OSError as exc:
        raise ValueError(f"cannot read cluster token file {path}: {exc}") from None
    if len(lines) != 1:
        raise ValueError(f"cluster token file {path} must hold exactly one token line, has {len(lines)}")
    if len(lines[0]) < 16:
        raise ValueError(f"cluster token in {path} is shorter than 16 characters: use e.g. `openssl rand -hex 32`")
    return lines[0]


def _digest(text: str) -> bytes:
    # Compare fixed-length digests so compare_digest's time does not depend on lengths either.
    return hashlib.sha256(text.encode()).digest()


def _metadata(handler_call_details, name: str) -> str | None:
    for key, value in handler_call_details.invocation_metadata or ():
        if key == name:
            return value if isinstance(value, str) else value.decode(errors="replace")
    return None


def _wrap(handler, before: Callable[[grpc.ServicerContext], Callable[[], None] | None]):
    """The handler with `before(context)` run first in every call (it may abort); what
    it returns runs when the call ends, also for streamed replies."""

    def unary(inner):
        def call(request, context):
            done = before(context)
            try:
                return inner(request, context)
            finally:
                if done is not None:
                    done()
        return call

    def streaming(inner):
        def call(request, context):
            done = before(context)
            try:
                yield from inner(request, context)
            finally:
                if done is not None:
                    done()
        return call

    if handler.unary_unary is not None:
        return handler._replace(unary_unary=unary(handler.unary_unary))
    if handler.stream_unary is not None:
        return handler._replace(stream_unary=unary(handler.stream_unary))
    if handler.unary_stream is not None:
        return handler._replace(unary_stream=streaming(handler.unary_stream))
    return handler._replace(stream_stream=streaming(handler.stream_stream))


def _deny(code: grpc.StatusCode, message: str):
    def before(context):
        context.abort(code, message)
    return before


# ---------------------------------------------------------------------------
# Client plane: API keys
# ---------------------------------------------------------------------------


@dataclass
class _KeyState:
    tokens: float  # token bucket of the request rate
    refilled: float  # when tokens was last topped up (monotonic s)
    in_flight: int = 0


class ApiKeys:
    """The keys of --api-keys-file and their limits. reload() re-reads the file (SIGHUP);
    a file that cannot be read keeps the previous keys. Thread-safe."""

    def __init__(self, path: Path, rate_per_s: float = 0.0, max_concurrent: int = 0):
        if rate_per_s < 0 or max_concurrent < 0:
            raise ValueError("--api-key-rate-per-s and --api-key-max-concurrent must be >= 0 (0: no limit)")
        self.path = Path(path)
        self.rate_per_s = rate_per_s
        self.burst = max(1.0, rate_per_s)  # a second's worth of requests may arrive at once
        self.max_concurrent = max_concurrent
        self._lock = threading.Lock()
        self._digests: list[bytes] = []
        self._state: dict[bytes, _KeyState] = {}
        try:  # read when the gateway starts (a mounted secret need not exist where flags are checked)
            keys = read_secret_lines(self.path)
        except OSError as exc:
            raise ValueError(f"cannot read --api-keys-file {self.path}: {exc}") from None
        if not keys:
            raise ValueError(f"API key file {self.path} holds no keys")
        self._set(keys)

    def _set(self, keys: list[str]) -> None:
        digests = [_digest(k) for k in keys]
        with self._lock:
            self._digests = digests
            self._state = {d: s for d, s in self._state.items() if d in digests}  # revoked keys lose their state

    def reload(self) -> int:
        """Re-read the file; returns how many keys it holds now (the old ones stay on error)."""
        try:
            keys = read_secret_lines(self.path)
        except OSError as exc:
            log.error("API keys not reloaded, keeping %d: %s", len(self._digests), exc)
            return len(self._digests)
        if not keys:
            log.error("API keys not reloaded: %s holds no keys; keeping %d", self.path, len(self._digests))
            return len(self._digests)
        self._set(keys)
        log.info("API keys reloaded from %s: %d keys", self.path, len(keys))
        return len(keys)

    def match(self, presented: str | None) -> bytes | None:
        """The digest identifying the key presented, or None. Compares against every key
        (no early exit), each in constant time."""
        if not presented:
            return None
        got = _digest(presented)
        found = None
        for d in self._digests:
            if hmac.compare_digest(got, d):
                found = d
        return found

    def acquire(self, key: bytes) -> str | None:
        """Admit one call of `key`: None, or why it is refused (rate or concurrency)."""
        now = time.monotonic()
        with self._lock:
            s = self._state.setdefault(key, _KeyState(self.burst, now))
            if self.max_concurrent and s.in_flight >= self.max_concurrent:
                return f"this API key already has {s.in_flight} requests in flight (limit {self.max_concurrent})"
            if self.rate_per_s:
                s.tokens = min(self.burst, s.tokens + (now - s.refilled) * self.rate_per_s)
                s.refilled = now
                if s.tokens < 1.0:
                    return f"this API key is over its rate of {self.rate_per_s:g} requests per second"
                s.tokens -= 1.0
            s.in_flight += 1
            return None

    def release(self, key: bytes) -> None:
        with self._lock:
            s = self._state.get(key)
            if s is not None:
                s.in_flight -= 1


def bearer(handler_call_details) -> str | None:
    value = _metadata(handler_call_details, "authorization")
    if value is None:
        return None
    scheme, _, key = value.partition(" ")
    return key.strip() if scheme.lower() == "bearer" else None


class ApiKeyInterceptor(grpc.ServerInterceptor):
    """Client port: every call but health needs a valid key within its limits."""

    def __init__(self, keys: ApiKeys):
        self.keys = keys

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        key = self.keys.match(bearer(handler_call_details))
        if key is None:
            return _wrap(handler, _deny(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE))

        def admit(context):
            refused = self.keys.acquire(key)
            if refused is not None:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, refused)
            return lambda: self.keys.release(key)

        return _wrap(handler, admit)


# ---------------------------------------------------------------------------
# Cluster plane: shared token and mTLS peer identities
# ---------------------------------------------------------------------------


def peer_names(context: grpc.ServicerContext) -> set[str]:
    """The SANs and CN of the caller's verified certificate (empty without mutual TLS)."""
    auth = context.auth_context() or {}
    names = set()
    for prop in ("x509_subject_alternative_name", "x509_common_name"):
        names.update(v.decode(errors="replace") for v in auth.get(prop, []))
    return names


class ClusterInterceptor(grpc.ServerInterceptor):
    """Internal servers: every call but health carries the cluster token (when one is
    configured) and comes from an allowed certificate identity (when allowed_peers)."""

    def __init__(self, token: str | None, allowed_peers: frozenset[str] = frozenset()):
        self.token = _digest(token) if token else None
        self.allowed_peers = allowed_peers

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(HEALTH_PREFIX):
            return handler
        if self.token is not None:
            presented = _metadata(handler_call_details, TOKEN_HEADER)
            if presented is None or not hmac.compare_digest(_digest(presented), self.token):
                return _wrap(handler, _deny(grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE))
        if not self.allowed_peers:
            return handler

        def check_peer(context):
            if not peer_names(context) & self.allowed_peers:
                context.abort(grpc.StatusCode.PERMISSION_DENIED, "the caller's certificate is not allowed here")
            return None

        return _wrap(handler, check_peer)


class _TokenCallDetails(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class TokenClientInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
                             grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor):
    """Adds the cluster token to every call of a channel."""

    def __init__(self, token: str):
        self.token = token

    def _details(self, details):
        return _TokenCallDetails(details, [*(details.metadata or ()), (TOKEN_HEADER, self.token)])

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):
        return continuation(self._details(details), request_iterator)
