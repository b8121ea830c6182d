"""Domain errors and the one interceptor that maps them to gRPC status codes.

Domain code raises these; servicers never pick status codes themselves. Anything
else that escapes a handler is a bug and becomes INTERNAL (logged with traceback).
"""

from __future__ import annotations

import logging

import grpc

log = logging.getLogger(__name__)


class MoEError(Exception):
    """Base class: an error a client can act on, with the status code it maps to."""

    code = grpc.StatusCode.INTERNAL


class InvalidArgument(MoEError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(MoEError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(MoEError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(MoEError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(MoEError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(MoEError):
    code = grpc.StatusCode.UNAVAILABLE


class Cancelled(MoEError):
    """The client went away (cancelled, or its deadline passed) before the reply."""

    code = grpc.StatusCode.CANCELLED


def _abort(context: grpc.ServicerContext, exc: BaseException, method: str):
    if type(exc) is Exception and context.code() not in (None, grpc.StatusCode.OK):
        raise exc  # the servicer already called context.abort(): keep its status
    if isinstance(exc, MoEError):
        log.info("%s -> %s: %s", method, exc.code.name, exc)
        context.abort(exc.code, str(exc))
    log.exception("%s failed with an unexpected error", method)
    context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(exc).__name__}: {exc}")


class _Undecodable:
    """A request whose bytes do not parse as its message type."""

    def __init__(self, reason: str):
        self.reason = reason


def _check_decoded(request, context) -> None:
    if isinstance(request, _Undecodable):
        # gRPC itself would answer INTERNAL ("Exception deserializing request!"): the
        # client sent bad bytes, so say so.
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"the request is not a valid message: {request.reason}")


class ErrorMappingInterceptor(grpc.ServerInterceptor):
    """Turns MoEError into its status code, requests that do not parse into
    INVALID_ARGUMENT, and anything else into INTERNAL."""

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method
        replaced = {}
        if handler.request_deserializer is not None:
            parse = handler.request_deserializer

            def request_deserializer(raw):
                try:
                    return parse(raw)
                except Exception as exc:  # noqa: BLE001 - answered as INVALID_ARGUMENT
                    return _Undecodable(f"{type(exc).__name__}: {exc}")

            replaced["request_deserializer"] = request_deserializer
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            def unary_unary(request, context):
                _check_decoded(request, context)
                try:
                    return inner(request, context)
                except Exception as exc:  # noqa: BLE001 - mapped to a status code
                    _abort(context, exc, method)

            return handler._replace(unary_unary=unary_unary, **replaced)
        if handler.unary_stream is not None:
            inner_stream = handler.unary_stream

            def unary_stream(request, context):
                _check_decoded(request, context)
                try:
                    yield from inner_stream(request, context)
                except Exception as exc:  # noqa: BLE001 - mapped to a status code
                    _abort(context, exc, method)

            return handler._replace(unary_stream=unary_stream, **replaced)
        return handler
