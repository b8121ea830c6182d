"""Keeping a moe-serve stack up: restart crashed children, add and remove expert servers.

A crashed expert server or predictor is restarted on its own address, after a backoff
that doubles with each recent restart, up to a limit of restarts within a window
(restart_delay, pure). Meanwhile the gateway rides on: a restarted expert server
comes back empty and the gateway gives it its home experts again on its first call
(gateway/dispatch.py); one that stayed down past --evict-after-s was evicted, and
re-joins through --register-with. Only two things stop the stack: the gateway
exiting, and a child crashing once more after its restart limit; the supervisor says
which (`stop_reason`).
"""

from __future__ import annotations

import logging
import subprocess
import time
from dataclasses import dataclass, field
from typing import Callable

log = logging.getLogger("moe-serve")


@dataclass(frozen=True)
class RestartPolicy:
    """When a crashed child is restarted, and when the stack gives up instead."""

    backoff_s: float = 1.0  # wait before the first restart; doubles with each recent restart
    max_backoff_s: float = 30.0
    limit: int = 5  # restarts of one child within window_s; one more crash stops the stack
    window_s: float = 600.0

    def __post_init__(self):
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("need 0 <= --restart-backoff-s <= max backoff")
        if self.limit < 0 or self.window_s <= 0:
            raise ValueError("need --restart-limit >= 0 and --restart-window-s > 0")


def restart_delay(restarts: list[float], now: float, policy: RestartPolicy) -> float | None:
    """Seconds to wait before restarting a child that crashed at `now`, given when it was
    restarted before; None when it was restarted `policy.limit` times within the window."""
    recent = [t for t in restarts if now - t < policy.window_s]
    if len(recent) >= policy.limit:
        return None
    return min(policy.max_backoff_s, policy.backoff_s * 2 ** len(recent))


@dataclass(eq=False)
class Child:
    """One supervised process: what it is, where it serves, and how to start it again."""

    role: str  # "expert server", "predictor" or "gateway"
    address: str
    proc: subprocess.Popen
    respawn: Callable[[], subprocess.Popen] | None  # None: not restarted (its exit stops the stack)
    restarts: list[float] = field(default_factory=list)  # when it was restarted (monotonic s)
    restart_at: float | None = None  # a restart is due then

    @property
    def name(self) -> str:
        return f"{self.role} {self.address}"


class Supervisor:
    """The children of a running stack (Stack.processes), restarted as RestartPolicy says."""

    def __init__(self, stack, policy: RestartPolicy, clock: Callable[[], float] = time.monotonic):
        self.stack = stack
        self.policy = policy
        self.clock = clock
        self.children: list[Child] = []
        self.leaving: list[subprocess.Popen] = []  # told to stop; their exit is expected
        self.stop_reason = ""

    def watch(self, role: str, address: str, proc: subprocess.Popen,
              respawn: Callable[[], subprocess.Popen] | None) -> Child:
        child = Child(role, address, proc, respawn)
        self.children.append(child)
        if proc not in self.stack.processes:
            self.stack.processes.append(proc)
        return child

    def expert_servers(self) -> list[Child]:
        return [c for c in self.children if c.role == "expert server"]

    def retire(self, child: Child) -> None:
        """Stop supervising a child about to be told to stop (its exit is expected)."""
        self.children.remove(child)
        self.leaving.append(child.proc)

    def poll(self) -> bool:
        """Restart crashed children whose backoff has passed; False (and stop_reason) once
        the stack must stop."""
        now = self.clock()
        self.leaving = [p for p in self.leaving if p.poll() is None]  # reap those that finished draining
        for child in self.children:
            if child.restart_at is None and child.proc.poll() is not None:
                code = child.proc.returncode
                if child.respawn is None:
                    self.stop_reason = f"the {child.name} exited (code {code})"
                    return False
                delay = restart_delay(child.restarts, now, self.policy)
                if delay is None:
                    self.stop_reason = (f"the {child.name} exited (code {code}) after {self.policy.limit} restarts "
                                        f"within {self.policy.window_s:.0f} s (--restart-limit)")
                    return False
                child.restart_at = now + delay
                log.error("the %s exited (code %s); restarting it in %.1f s (restart %d of at most %d in %.0f s)",
                          child.name, code, delay, len(child.restarts) + 1, self.policy.limit, self.policy.window_s)
            if child.restart_at is not None and now >= child.restart_at:
                old = child.proc
                child.proc = child.respawn()
                child.restarts.append(now)
                child.restart_at = None
                self.stack.processes[self.stack.processes.index(old)] = child.proc
                log.info("restarted the %s (pid %d)", child.name, child.proc.pid)
        return True
