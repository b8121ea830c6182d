"""Shared-memory segments for the same-host transport of hidden states.

When the gateway and an expert server run on one machine, a layer call's hidden states
need not cross gRPC as bytes (about 1 GB/s in Python gRPC): the gateway writes them into
a segment under /dev/shm, the RunExperts message names the segment and the offset, the
server computes straight from that memory and writes its outputs over the inputs, and the
reply carries only shapes and timings (gateway/transport.py decides when to do this).

Glossary:
  segment  - a file under /dev/shm that both processes map; the gateway creates and
             unlinks it, servers only open it by name.
  region   - one tensor's bytes inside a segment: (segment name, byte offset) plus the
             dtype and shape that the RunExperts message carries anyway.

Plain files and mmap rather than multiprocessing.shared_memory: that module's resource
tracker unlinks segments a *reader* opened when the reader exits (Python < 3.13), which
would pull memory from under the gateway whenever an expert server restarts.
"""

from __future__ import annotations

import collections
import math
import mmap
import os
import re
import secrets
import threading
from pathlib import Path

import torch

from moe_common.errors import FailedPrecondition, InvalidArgument

SHM_DIR = Path("/dev/shm")
# Only names this project makes may be opened: no paths, no other programs' segments.
SEGMENT_NAME = re.compile(r"moe-[A-Za-z0-9_-]{1,200}")
# Where a FAILED_PRECONDITION detail starts when a server cannot open a segment (another
# host, another /dev/shm, another user): the gateway then falls back to bytes.
UNREACHABLE = "shared memory unreachable"


def available() -> bool:
    """Whether this host has a /dev/shm to put segments in."""
    return SHM_DIR.is_dir() and os.access(SHM_DIR, os.W_OK)


def check_name(name: str) -> None:
    if not SEGMENT_NAME.fullmatch(name):
        raise InvalidArgument(f"shared-memory segment {name!r} is not a name of the form moe-[A-Za-z0-9_-]+")


class Segment:
    """One mapped segment. `create` makes a new one (the owner unlinks it); `open` maps
    an existing one. The mapping lives until the last tensor viewing it is gone."""

    def __init__(self, name: str, buf: mmap.mmap, owner: bool):
        self.name = name
        self.buf = buf
        self.size = len(buf)
        self.owner = owner
        self.pinned = None  # a CUDA gateway page-locks it: the registered address, or 0 after a failure

    @classmethod
    def create(cls, name: str, size: int) -> "Segment":
        check_name(name)
        path = SHM_DIR / name
        # 0600: only this user's processes (our expert servers) may map it.
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
            buf = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(path)
            raise
        finally:
            os.close(fd)
        return cls(name, buf, owner=True)

    @classmethod
    def open(cls, name: str) -> "Segment":
        """Map an existing segment; FailedPrecondition (starting with UNREACHABLE) when this
        host has no such segment or may not map it."""
        check_name(name)
        try:
            fd = os.open(SHM_DIR / name, os.O_RDWR)
        except OSError as exc:
            raise FailedPrecondition(f"{UNREACHABLE}: cannot open segment {name} here ({exc.strerror}); "
                                     f"the caller runs on another host or as another user") from None
        try:
            size = os.fstat(fd).st_size
            if size == 0:
                raise FailedPrecondition(f"{UNREACHABLE}: segment {name} is empty")
            buf = mmap.mmap(fd, size)
        finally:
            os.close(fd)
        return cls(name, buf, owner=False)

    def tensor(self, offset: int, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
        """A tensor of `shape` viewing this segment's bytes from `offset` (no copy).
        InvalidArgument when the region does not lie inside the segment."""
        itemsize = dtype.itemsize
        count = math.prod(shape)
        if offset < 0 or offset % itemsize or offset + count * itemsize > self.size:
            raise InvalidArgument(f"region of {count * itemsize} bytes at offset {offset} does not fit segment "
                                  f"{self.name} of {self.size} bytes (or is not aligned to {itemsize})")
        if count == 0:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(self.buf, dtype=dtype, count=count, offset=offset).view(shape)

    def unlink(self) -> None:
        """Remove the name (the owner's job); memory goes once every mapping is gone."""
        try:
            os.unlink(SHM_DIR / self.name)
        except FileNotFoundError:
            pass


class SegmentCache:
    """The segments a server has opened, by name, the `capacity` most recently used.

    A gateway reuses a few segments for every call (at most 8 kept free, gateway/transport.py),
    so a server opens each once. Evicting only drops our reference: calls still computing
    keep their mapping alive. A segment the gateway dropped stays in memory while a server
    still maps it, so the capacity bounds that memory too: keep it small.
    """

    def __init__(self, capacity: int = 16):
        self.capacity = capacity
        self._lock = threading.Lock()
        self._segments: collections.OrderedDict[str, Segment] = collections.OrderedDict()

    def get(self, name: str) -> Segment:
        with self._lock:
            segment = self._segments.get(name)
            if segment is not None:
                self._segments.move_to_end(name)
                return segment
        segment = Segment.open(name)  # outside the lock: calls for other segments go on
        with self._lock:
            self._segments[name] = segment
            while len(self._segments) > self.capacity:
                self._segments.popitem(last=False)
        return segment

    def forget(self, name: str) -> None:
        with self._lock:
            self._segments.pop(name, None)


def process_prefix(pid: int | None = None) -> str:
    """Name prefix of the segments one gateway process makes: moe-gw-<pid>-."""
    return f"moe-gw-{os.getpid() if pid is None else pid}-"


def unique_name(kind: str) -> str:
    return f"{process_prefix()}{kind}-{secrets.token_hex(6)}"


def remove_orphans() -> list[str]:
    """Unlink the segments of gateway processes that no longer run (a gateway killed with
    SIGKILL cannot unlink its own). Returns the names removed."""
    removed = []
    if not SHM_DIR.is_dir():
        return removed
    for path in SHM_DIR.glob("moe-gw-*"):
        m = re.match(r"moe-gw-(\d+)-", path.name)
        if not m or _alive(int(m[1])):
            continue
        try:
            path.unlink()
            removed.append(path.name)
        except OSError:
            pass  # another user's, or gone already
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, another user's
    return True
