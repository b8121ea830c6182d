"""Replica planning off the request path: one background thread runs the latest job.

The batcher's thread only hands work over. `submit(job)` replaces a job still waiting
(a newer batch's plan makes an older one's pointless) and returns at once, so a slow
predictor or a 60 ms plan at 64 servers never delays a batch. Jobs run one at a time,
in the order they are kept, on a thread of their own; an exception in a job is the
job's to handle (ReplicaManager logs and counts it) and never stops the worker.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)


class PlanWorker:
    def __init__(self, name: str = "replica-planner"):
        self._cv = threading.Condition()
        self._job: Callable[[], None] | None = None  # the next job; a newer submit replaces it
        self._running = False
        self._closed = False
        self.superseded = 0  # jobs replaced by a newer one before they ran
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        """Run `job` on the worker thread as soon as it is free; never blocks."""
        with self._cv:
            if self._closed:
                return
            if self._job is not None:
                self.superseded += 1
            self._job = job
            self._cv.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no job waits or runs (tests, shutdown); False on timeout."""
        with self._cv:
            return self._cv.wait_for(lambda: self._job is None and not self._running, timeout=timeout_s)

    def close(self, timeout_s: float = 5.0) -> None:
        """Drop a waiting job and stop after the running one."""
        with self._cv:
            self._closed = True
            self._job = None
            self._cv.notify_all()
        self._thread.join(timeout=timeout_s)

    def _run(self) -> None:
        while True:
            with self._cv:
                self._cv.wait_for(lambda: self._job is not None or self._closed)
                if self._closed:
                    return
                job, self._job = self._job, None
                self._running = True
            try:
                job()
            except Exception:  # noqa: BLE001 - jobs handle their own errors; this is a last resort
                log.exception("a replica planning job failed")
            finally:
                with self._cv:
                    self._running = False
                    self._cv.notify_all()
