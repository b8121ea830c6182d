"""Server views: one membership of the expert servers, and which view is current.

A *view* is who the expert servers are, the home placement among them, and the replicas
planned and ready on them (glossary in gateway/dispatch.py). A membership change
(gateway/membership.py) builds a new view and swaps it in; a layer call or a replica
plan keeps the view it started with, counted in flight, so the old view can be drained
before its servers drop experts and their channels close.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass, field
from typing import Iterator


@dataclass(eq=False)
class ServerView:
    """One membership of the expert servers: who they are, the home placement among them
    and the replicas planned and ready on them. Server indices (home[l][e], ready[s],
    the s of planned (layer, expert, s)) index `addresses`.

    A membership change (gateway/membership.py) builds a new view and swaps it in; a
    layer call (or a replica plan being sent) keeps the view it started with, and
    `inflight` counts those users so that the old view can be drained before its
    servers drop experts and their channels close.
    """

    addresses: list[str]
    stubs: list
    home: list[list[int]]
    slots: list[int]  # replica slots of each server
    run_stubs: list = field(default_factory=list)  # stubs[s] without the tracing interceptor (RunExperts)
    ready: list[set] = field(default_factory=list)  # ready[s]: {(layer, expert)} confirmed loaded on s
    planned: set = field(default_factory=set)  # {(layer, expert, server)} the current plan wants
    replica_sequence: list[int] = field(default_factory=list)  # a reply counts only if it answers the newest call
    synced: set = field(default_factory=set)  # servers sent a replica set under this view
    inflight: int = 0
    # Servers whose layer call failed, and since when (monotonic s): not holders until
    # they answer their health checks again (clear_suspect).
    suspect: dict[int, float] = field(default_factory=dict)
    # standins[s]: {(layer, expert)} server s loaded in place of a suspect home server.
    standins: list[set] = field(default_factory=list)

    def __post_init__(self):
        self.ready = self.ready or [set() for _ in self.addresses]
        self.replica_sequence = self.replica_sequence or [0] * len(self.addresses)
        self.standins = self.standins or [set() for _ in self.addresses]

    def experts_of(self, server: int) -> list[tuple[int, int]]:
        """The logical experts `server` is home to."""
        return [(layer, e) for layer, row in enumerate(self.home) for e, h in enumerate(row) if h == server]

    def held_by(self, server: int) -> set[tuple[int, int]]:
        """What `server` is told to hold besides replicas: its home experts and its stand-ins."""
        return set(self.experts_of(server)) | self.standins[server]


class Views:
    """The current ServerView and the views in use. `lock` also guards the mutable sets
    of a view (ready, planned, suspect, standins) between the batcher thread, SetReplicas
    callbacks and membership changes."""

    def __init__(self, view: ServerView):
        self.lock = threading.Lock()
        self._drained = threading.Condition(self.lock)
        self.current = view

    def swap(self, view: ServerView) -> ServerView:
        """Make `view` current; returns the previous one."""
        with self.lock:
            old, self.current = self.current, view
        return old

    @contextlib.contextmanager
    def using(self) -> Iterator[ServerView]:
        """The current view, counted in flight while the block runs."""
        with self.lock:
            view = self.current
            view.inflight += 1
        try:
            yield view
        finally:
            with self._drained:
                view.inflight -= 1
                self._drained.notify_all()

    def wait_drained(self, view: ServerView, timeout_s: float) -> bool:
        """Wait until no user runs on `view`; False on timeout."""
        with self._drained:
            return self._drained.wait_for(lambda: view.inflight == 0, timeout=timeout_s)
