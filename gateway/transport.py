"""How a layer call's hidden states travel to an expert server and back.

Dispatch (gateway/dispatch.py) decides who gets which tokens; this module moves them.
Two ways:
  grpc - the rows as bytes inside the RunExperts message (tensor_codec), any host;
  shm  - for a server on this host: the rows are written into a shared-memory segment
         (moe_common/shm.py), the message names the region, and the server writes its
         outputs over the rows in place. gRPC then carries only the control message,
         so no copy goes through Python gRPC's ~1 GB/s byte path. When the server offers
         a local lane (moe_common/lane.py), that control message goes over a Unix
         socket instead of gRPC, which cuts ~0.5 ms of fixed cost per call.

`--transport auto` (the default) asks each server once whether it can map this
gateway's memory (AttachSharedMemory with a nonce) and uses shm where it can, bytes
elsewhere; `shm` makes a server that cannot an error; `grpc` never tries.

Correctness under faults: a segment goes back to the pool only after its call returned
OK. A call that failed, timed out or was cancelled may still be computing and could
write into its region later, so its segment is dropped (unlinked) rather than reused.
"""

from __future__ import annotations

import logging
import secrets
import threading
from dataclasses import dataclass

import grpc
import torch

from gateway.config import TRANSPORTS
from gateway.lane import Lane
from moe_common import shm, tensor_codec
from moe_common.errors import FailedPrecondition
from moe_protos.moe.expert.v1 import expert_pb2

log = logging.getLogger(__name__)

_MIN_SEGMENT = 1 << 20  # segments come in powers of two from 1 MiB, so a few serve every call size


class SegmentPool:
    """The segments this gateway writes hidden states into, reused across calls.
    Thread-safe: concurrent layer calls each take their own segment."""

    def __init__(self, max_free: int = 8):
        self.max_free = max_free
        self._lock = threading.Lock()
        self._free: list[shm.Segment] = []  # ascending size
        self._all: dict[str, shm.Segment] = {}
        self.created = 0

    def acquire(self, nbytes: int) -> shm.Segment:
        """A segment of at least `nbytes` that no call is using."""
        with self._lock:
            for i, segment in enumerate(self._free):
                if segment.size >= nbytes:
                    return self._free.pop(i)
        size = max(_MIN_SEGMENT, 1 << max(nbytes - 1, 0).bit_length())
        segment = shm.Segment.create(shm.unique_name("rows"), size)
        with self._lock:
            self._all[segment.name] = segment
            self.created += 1
        return segment

    def release(self, segment: shm.Segment) -> None:
        """Back to the pool, once its call has returned."""
        with self._lock:
            if segment.name not in self._all:
                return  # the pool was closed meanwhile
            self._free.append(segment)
            self._free.sort(key=lambda s: s.size)
            extra = self._free[:-self.max_free] if len(self._free) > self.max_free else []
            del self._free[:len(extra)]
        for segment in extra:  # keep the largest: they serve every smaller call too
            self.discard(segment)

    def discard(self, segment: shm.Segment) -> None:
        """Never reuse `segment` (its call failed and a server may still write into it)."""
        with self._lock:
            self._all.pop(segment.name, None)
        _unpin(segment)
        segment.unlink()

    def close(self) -> None:
        with self._lock:
            segments, self._all, self._free = list(self._all.values()), {}, []
        for segment in segments:
            _unpin(segment)
            segment.unlink()


def _pin(segment: shm.Segment) -> None:
    """Page-lock a segment for a gateway on CUDA, so copies between the GPU and the
    segment run at DMA speed rather than through a pageable bounce buffer (~5x on an
    H200 for 12 MB). Once per segment; a failure only costs that speed."""
    if segment.pinned is not None:
        return
    segment.pinned = 0
    try:
        ptr = torch.frombuffer(segment.buf, dtype=torch.uint8).data_ptr()
        err = torch.cuda.cudart().cudaHostRegister(ptr, segment.size, 0)
        segment.pinned = ptr if int(err) == 0 else 0
        if not segment.pinned:
            log.warning("cudaHostRegister of %s failed (%s); copies go through pageable memory", segment.name, err)
    except Exception as exc:  # noqa: BLE001 - an optimisation, never a reason to fail a call
        log.warning("could not page-lock %s (%s); copies go through pageable memory", segment.name, exc)


def _unpin(segment: shm.Segment) -> None:
    if segment.pinned:
        try:
            torch.cuda.cudart().cudaHostUnregister(segment.pinned)
        except Exception as exc:  # noqa: BLE001
            log.warning("cudaHostUnregister of %s failed: %s", segment.name, exc)
        segment.pinned = 0


@dataclass
class Payload:
    """One server's rows of a layer call, packed for its RunExperts request."""

    tensor: expert_pb2.Tensor  # hidden_states: dtype and shape, and the bytes unless shared
    region: expert_pb2.SharedRegion | None = None
    segment: shm.Segment | None = None
    rows: torch.Tensor | None = None  # [n, d_model] in the segment, in the wire dtype

    @property
    def nbytes(self) -> int:
        return self.rows.nbytes if self.rows is not None else len(self.tensor.data)


class Transport:
    """Packs rows for each server and unpacks its outputs, by bytes or shared memory."""

    def __init__(self, mode: str = "auto", probe_timeout_s: float = 5.0, local_lane: bool = True):
        if mode not in TRANSPORTS:
            raise ValueError(f"transport must be one of {TRANSPORTS}, not {mode!r}")
        self.mode = mode if shm.available() or mode == "shm" else "grpc"
        self.probe_timeout_s = probe_timeout_s
        self.local_lane = local_lane  # False: control messages over gRPC even where a lane is offered
        self.pool = SegmentPool()
        self._lock = threading.Lock()
        self._shared: dict[str, bool] = {}  # address -> whether it maps our segments
        self._lanes: dict[str, Lane] = {}  # address -> its local lane, when it offered one
        if self.mode != "grpc":
            removed = shm.remove_orphans()
            if removed:
                log.info("removed %d shared-memory segments of gateways that no longer run", len(removed))

    def kind(self, address: str) -> str:
        """"shm" or "grpc": how calls to `address` move hidden states now ("?" before the first call)."""
        with self._lock:
            shared = self._shared.get(address)
        if self.mode == "grpc":
            return "grpc"
        return "?" if shared is None else ("shm" if shared else "grpc")

    def lane(self, address: str) -> Lane | None:
        """The local lane of `address`, for calls whose rows are in shared memory; None: gRPC."""
        if not self.local_lane:
            return None
        with self._lock:
            return self._lanes.get(address)

    def pack(self, address: str, stub, hidden: torch.Tensor, index: torch.Tensor, wire_dtype: str) -> Payload:
        """hidden [N, d_model], index [n] (rows to send) -> the payload for `address`."""
        if not self._uses_shm(address, stub):
            return Payload(tensor_codec.encode(hidden[index], wire_dtype))
        dtype = tensor_codec.WIRE_DTYPES[wire_dtype][1]
        shape = (len(index), hidden.shape[1])
        nbytes = shape[0] * shape[1] * dtype.itemsize
        segment = self.pool.acquire(nbytes)
        rows = segment.tensor(0, dtype, shape)
        if hidden.is_cuda:
            _pin(segment)
        if hidden.dtype == dtype and hidden.device.type == "cpu":
            torch.index_select(hidden, 0, index, out=rows)  # gathered straight into shared memory
        else:
            rows.copy_(hidden[index])  # a cast, or a device-to-host copy
        return Payload(expert_pb2.Tensor(dtype=tensor_codec.WIRE_DTYPES[wire_dtype][0], shape=list(shape)),
                       expert_pb2.SharedRegion(segment=segment.name, offset=0), segment, rows)

    def unpack(self, payload: Payload, reply: expert_pb2.RunExpertsResponse, like: torch.Tensor) -> torch.Tensor:
        """The server's outputs [n, d_model] in the dtype and on the device of `like` (the
        hidden states), owned by the caller; frees the payload."""
        if reply.outputs_shared and payload.rows is not None:
            # Copied out of the segment before it serves another call.
            out = payload.rows.to(device=like.device, dtype=like.dtype, copy=True)
        else:
            out = tensor_codec.decode(reply.outputs).to(device=like.device, dtype=like.dtype)
        self.done(payload, ok=True)
        return out

    def done(self, payload: Payload, ok: bool) -> None:
        """The payload's call ended: reuse its segment if it returned OK, drop it otherwise."""
        if payload.segment is None:
            return
        segment, payload.segment, payload.rows = payload.segment, None, None
        if ok:
            self.pool.release(segment)
        else:
            self.pool.discard(segment)

    def unreachable(self, address: str, reason: str) -> None:
        """`address` could not map a segment (it moved to another host): bytes from now on,
        or an error under --transport shm."""
        if self.mode == "shm":
            raise FailedPrecondition(f"--transport shm, but expert server {address} cannot map this "
                                     f"gateway's shared memory: {reason}")
        log.warning("expert server %s cannot map shared memory any more (%s); sending bytes", address, reason)
        with self._lock:
            self._shared[address] = False
            lane = self._lanes.pop(address, None)
        if lane is not None:
            lane.close()

    def forget(self, address: str) -> None:
        """Ask `address` again on its next call (a server that restarted may run elsewhere)."""
        with self._lock:
            self._shared.pop(address, None)
            lane = self._lanes.pop(address, None)
        if lane is not None:
            lane.close()  # a restarted server has a new lane: AttachSharedMemory names it

    def close(self) -> None:
        with self._lock:
            lanes, self._lanes = list(self._lanes.values()), {}
        for lane in lanes:
            lane.close()
        self.pool.close()

    def _uses_shm(self, address: str, stub) -> bool:
        if self.mode == "grpc":
            return False
        with self._lock:
            shared = self._shared.get(address)
        if shared is None:
            shared = self._probe(address, stub)
        return shared

    def _probe(self, address: str, stub) -> bool:
        """AttachSharedMemory with a fresh segment holding a nonce; caches a definite answer."""
        nonce = secrets.token_bytes(16)
        segment = shm.Segment.create(shm.unique_name("probe"), len(nonce))
        try:
            segment.buf[:len(nonce)] = nonce
            try:
                reply = stub.AttachSharedMemory(
                    expert_pb2.AttachSharedMemoryRequest(segment=segment.name, nonce=nonce), timeout=self.probe_timeout_s)
                attached, reason = reply.attached, reply.reason
            except grpc.RpcError as err:
                if err.code() != grpc.StatusCode.UNIMPLEMENTED:
                    return False  # unreachable now: bytes for this call, ask again next time
                attached, reason = False, "the server predates shared memory"
        finally:
            segment.unlink()
        if not attached:
            if self.mode == "shm":
                raise FailedPrecondition(f"--transport shm, but expert server {address} cannot map this "
                                         f"gateway's shared memory: {reason}")
            log.info("expert server %s: hidden states go as bytes (%s)", address, reason)
        else:
            log.info("expert server %s: hidden states go through shared memory%s", address,
                     ", layer calls over its local lane" if reply.lane else "")
        with self._lock:
            self._shared[address] = attached
            old = self._lanes.pop(address, None)
            if attached and reply.lane:
                self._lanes[address] = Lane(reply.lane, reply.lane_token)
        if old is not None:
            old.close()
        return attached
