"""Request ids across processes, and the log formats that carry them.

Glossary: a *request id* names one client request. The gateway takes it from the
client (the `x-request-id` metadata key, or the Open Inference Protocol `id` field),
or makes one, and returns it (trailing metadata; the OIP reply's `id`). Requests run
in *batches*; every expert and predictor call the gateway makes for a batch carries
`x-request-id` (the batch's request ids, comma-separated) and `x-batch-id` in its
metadata. Each service keeps the ids of the call it is handling in a context
variable, and every log record made meanwhile carries them: with `--log-format json`
they are fields of the line, so one request can be followed through the gateway, the
expert servers and the predictor with one grep.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
import uuid

import grpc


REQUEST_ID_KEY = "x-request-id"
BATCH_ID_KEY = "x-batch-id"
MAX_REQUEST_ID_CHARS = 128
# Printable, no separators we use (comma) or whitespace: ids are logged and joined.
_VALID_ID = re.compile(r"[A-Za-z0-9._:/@=+\-]{1,%d}" % MAX_REQUEST_ID_CHARS)
# A handled call slower than this is logged at INFO with its ids (else at DEBUG).
SLOW_CALL_S = 1.0
LOG_FORMATS = ("text", "json")

log = logging.getLogger(__name__)

# (request id(s), batch id) of the call this thread handles; "" when none.
_current: contextvars.ContextVar[tuple[str, str]] = contextvars.ContextVar("moe_trace", default=("", ""))


def new_request_id() -> str:
    return uuid.uuid4().hex


def current() -> tuple[str, str]:
    """(request id(s), batch id) of the call being handled on this thread."""
    return _current.get()


def current_request_id() -> str:
    return _current.get()[0]


def outgoing_metadata() -> tuple[tuple[str, str], ...]:
    """The current ids as call metadata, for a hot path that passes metadata= itself
    instead of going through a channel wrapped by `intercept` (~35 us a call)."""
    rid, bid = _current.get()
    if not rid:
        return ()
    return ((REQUEST_ID_KEY, rid), (BATCH_ID_KEY, bid)) if bid else ((REQUEST_ID_KEY, rid),)


def set_current(request_id: str, batch_id: str = "") -> contextvars.Token:
    return _current.set((request_id, batch_id))


def reset_current(token: contextvars.Token) -> None:
    _current.reset(token)


def log_call(method: str, t0: float, request_id: str) -> None:
    """A handled call that carried a request id, with its duration since t0
    (perf_counter): at INFO when slow, else at DEBUG."""
    if not request_id:
        return
    took = time.perf_counter() - t0
    level = logging.INFO if took >= SLOW_CALL_S else logging.DEBUG
    if log.isEnabledFor(level):
        log.log(level, "%s took %.1f ms", method, took * 1e3)


def _metadata(context) -> dict[str, str]:
    return {k: v for k, v in (context.invocation_metadata() or ()) if isinstance(v, str)}


class IncomingInterceptor(grpc.ServerInterceptor):
    """Server side: the ids of each call, in the context while its handler runs.

    origin=True (the gateway): a call without an id gets one (from the OIP `id` field
    when the request has one, else a new one), and the id goes back in the trailing
    metadata. origin=False (expert server, predictor): ids come from the caller's
    metadata only, and calls that carry them are logged with their duration."""

    def __init__(self, origin: bool = False, methods: frozenset[str] | None = None):
        self.origin = origin
        self.methods = methods  # None: every method

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or (self.methods is not None and handler_call_details.method not in self.methods):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]

        def ids(request, context) -> tuple[str, str]:
            md = _metadata(context)
            rid, bid = md.get(REQUEST_ID_KEY, ""), md.get(BATCH_ID_KEY, "")
            if self.origin:
                given = rid or (getattr(request, "id", "") if isinstance(getattr(request, "id", None), str) else "")
                if given and not _VALID_ID.fullmatch(given):
                    # Outside the error-mapping interceptor: answer the status here.
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                  f"request id {given[:40]!r} must be 1-{MAX_REQUEST_ID_CHARS} characters of "
                                  f"letters, digits and ._:/@=+-")
                rid = given or new_request_id()
                context.set_trailing_metadata(((REQUEST_ID_KEY, rid),))
            return rid, bid

        def done(t0: float, rid: str, bid: str) -> None:
            if not self.origin:
                log_call(method, t0, rid)

        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary_unary(request, context):
                t0 = time.perf_counter()
                rid, bid = ids(request, context)
                token = _current.set((rid, bid))
                try:
                    return inner(request, context)
                finally:
                    done(t0, rid, bid)
                    _current.reset(token)

            return handler._replace(unary_unary=unary_unary)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def unary_stream(request, context):
                t0 = time.perf_counter()
                rid, bid = ids(request, context)
                # Set around each step, not the whole generator: gRPC may resume it
                # in another context.
                it = iter(inner_stream(request, context))
                while True:
                    token = _current.set((rid, bid))
                    try:
                        item = next(it)
                    except StopIteration:
                        done(t0, rid, bid)
                        return
                    finally:
                        _current.reset(token)
                    yield item

            return handler._replace(unary_stream=unary_stream)
        return handler


class _ClientCallDetails(grpc.ClientCallDetails):
    def __init__(self, details, metadata):
        self.method = details.method
        self.timeout = details.timeout
        self.metadata = metadata
        self.credentials = details.credentials
        self.wait_for_ready = getattr(details, "wait_for_ready", None)
        self.compression = getattr(details, "compression", None)


class OutgoingInterceptor(grpc.UnaryUnaryClientInterceptor):
    """Client side: adds the current ids to each unary call's metadata, and reports each
    call's duration to on_done(method, seconds) (None: not timed)."""

    def __init__(self, on_done=None):
        self.on_done = on_done

    def intercept_unary_unary(self, continuation, client_call_details, request):
        rid, bid = _current.get()
        if rid:
            metadata = [*(client_call_details.metadata or ()), (REQUEST_ID_KEY, rid)]
            if bid:
                metadata.append((BATCH_ID_KEY, bid))
            client_call_details = _ClientCallDetails(client_call_details, metadata)
        if self.on_done is None:
            return continuation(client_call_details, request)
        t0 = time.perf_counter()
        call = continuation(client_call_details, request)
        method = client_call_details.method
        call.add_done_callback(lambda _: self.on_done(method, time.perf_counter() - t0))
        return call


def intercept(channel: grpc.Channel, on_done=None) -> grpc.Channel:
    """`channel` with request ids in the metadata of its unary calls (and timed)."""
    return grpc.intercept_channel(channel, OutgoingInterceptor(on_done))


# ---------------------------------------------------------------------------
# Log formats
# ---------------------------------------------------------------------------


class TraceFilter(logging.Filter):
    """Puts the current ids on every record (request_id, batch_id; "" when none)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id, record.batch_id = _current.get()
        return True


class TextFormatter(logging.Formatter):
    """The usual one-line text, with the ids appended when the record has them."""

    def __init__(self):
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        rid, bid = getattr(record, "request_id", ""), getattr(record, "batch_id", "")
        if rid:
            text += f" [request_id={rid}" + (f" batch_id={bid}]" if bid else "]")
        return text


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the ids, and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("request_id", "batch_id"):
            value = getattr(record, key, "")
            if value:
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def configure(level: str = "INFO", fmt: str = "text") -> None:
    """Root logging for a service's entry point: one stderr handler, text or JSON lines."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"--log-format must be one of {LOG_FORMATS}, not {fmt!r}")
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    handler.addFilter(TraceFilter())
    # Not force=True: as before, a process whose root logger has handlers already (a test
    # run in-process under pytest's capture) keeps them.
    logging.basicConfig(level=level.upper(), handlers=[handler])
