"""The local lane: RunExperts between a gateway and an expert server on one host,
without gRPC.

Why: with shared memory (moe_common/shm.py) a layer call's message is only a few
hundred bytes of control, yet a Python gRPC round trip costs 0.4-0.7 ms of fixed
overhead on each side (channel, thread pool, HTTP/2 framing), while a round trip over
a Unix socket costs about 10 us (benchmarks/layer_call.py measures both). A request
makes one call per sparse layer and server, so that overhead is most of an unloaded
request's time on small models. gRPC stays the control plane and carries everything
else (and every call to another host, and every call whose rows travel as bytes).

How:
  - the server listens on a Unix SOCK_SEQPACKET socket in the abstract namespace
    (Linux; no file to clean up when it dies), `lane_name()`. Seqpacket keeps
    message boundaries, so a message is one send and one recv, and there is no framing.
  - AttachSharedMemory (over gRPC, with the deployment's credentials) hands the caller
    the lane's name and a random token. A connection must present that token first,
    and its peer must be a process of the server's own user (SO_PEERCRED): holding the
    token is holding the right to call, as for the gRPC channel.
  - one connection carries one call at a time; the gateway keeps a pool per server.

Messages (all little-endian):
  hello   - the token (TOKEN_BYTES); answered by one byte, 0.
  request - u16 len(request id), u16 len(batch id), both ids (ASCII), then the
            serialized RunExpertsRequest.
  reply   - u8 status (grpc.StatusCode's number, 0 = OK), then the serialized
            RunExpertsResponse when OK, else the error's details (UTF-8).
"""

from __future__ import annotations

import secrets
import socket
import struct

import grpc

TOKEN_BYTES = 16
MAX_MESSAGE = 1 << 20  # control messages only: groups and a tensor header, never rows
_IDS = struct.Struct("<HH")
_CODES = {code.value[0]: code for code in grpc.StatusCode}


def available() -> bool:
    """Whether this host has Unix seqpacket sockets in the abstract namespace (Linux)."""
    return hasattr(socket, "AF_UNIX") and hasattr(socket, "SOCK_SEQPACKET") and hasattr(socket, "SO_PEERCRED")


def lane_name(pid: int) -> str:
    """A fresh abstract socket name (the leading NUL is added by `address`)."""
    return f"moe-lane-{pid}-{secrets.token_hex(8)}"


def address(name: str) -> bytes:
    """The abstract-namespace address of `name` for bind/connect."""
    return b"\0" + name.encode()


def new_socket() -> socket.socket:
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def receive(sock: socket.socket) -> bytes:
    """One whole message; b"" when the peer closed. Raises ValueError on an oversized one."""
    data, _, flags, _ = sock.recvmsg(MAX_MESSAGE)
    if flags & socket.MSG_TRUNC:
        raise ValueError(f"local lane message over {MAX_MESSAGE} bytes")
    return data


def encode_request(request: bytes, request_id: str = "", batch_id: str = "") -> bytes:
    rid, bid = request_id.encode(), batch_id.encode()
    return _IDS.pack(len(rid), len(bid)) + rid + bid + request


def decode_request(message: bytes) -> tuple[bytes, str, str]:
    """-> (serialized request, request id, batch id). ValueError when malformed."""
    if len(message) < _IDS.size:
        raise ValueError("local lane request shorter than its header")
    n_rid, n_bid = _IDS.unpack_from(message)
    start = _IDS.size
    end = start + n_rid + n_bid
    if end > len(message):
        raise ValueError("local lane request ids run past its end")
    ids = message[start:end].decode("ascii")
    return message[end:], ids[:n_rid], ids[n_rid:]


def encode_reply(code: grpc.StatusCode, body: bytes) -> bytes:
    return bytes([code.value[0]]) + body


def decode_reply(message: bytes) -> tuple[grpc.StatusCode, bytes]:
    """-> (status, body: the serialized reply when OK, else the details)."""
    if not message:
        raise ValueError("empty local lane reply")
    return _CODES.get(message[0], grpc.StatusCode.UNKNOWN), message[1:]
