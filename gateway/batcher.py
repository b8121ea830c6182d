"""Batching of concurrent client requests.

Requests wait in arrival order. The worker takes the oldest request, waits up to
max_wait_ms for more requests with the same decoding parameters (up to
max_batch_size prompts together), runs them as one batch, and reports every
token and the final results back to each request through its event queue. A
request with more prompts than max_batch_size runs as a batch of its own.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from gateway.engine import Engine, RowResult, Sampling
from moe_common.errors import Unavailable

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One client request: its prompts and where its events go."""

    prompts: list[list[int]]  # encoder token ids per prompt
    max_new_tokens: list[int]  # per prompt
    sampling: Sampling
    stream: bool = False  # also report each token as it is generated
    arrival_ns: int = field(default_factory=time.perf_counter_ns)
    # ("token", index, token_id, finish_reason) | ("done", [RowResult], Timings dict) | ("error", exception)
    events: queue.Queue = field(default_factory=queue.Queue)

    def wait(self):
        """Block until the job finishes; returns (results, timings) or raises its error."""
        while True:
            kind, *rest = self.events.get()
            if kind == "done":
                return rest[0], rest[1]
            if kind == "error":
                raise rest[0]


class Batcher:
    def __init__(self, engine: Engine, max_batch_size: int, max_wait_ms: float):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self._pending: list[Job] = []
        self._cv = threading.Condition()
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> Job:
        with self._cv:
            if self._stopped:
                raise Unavailable("the gateway is shutting down")
            self._pending.append(job)
            self._cv.notify()
        return job

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._worker.join(timeout=10)

    def _take_batch(self) -> list[Job] | None:
        """Wait for work; return the next batch (oldest job first), or None when stopped."""
        with self._cv:
            while not self._pending and not self._stopped:
                self._cv.wait()
            if self._stopped:
                for job in self._pending:
                    job.events.put(("error", Unavailable("the gateway is shutting down")))
                return None
            first = self._pending[0]
            deadline = first.arrival_ns / 1e9 + self.max_wait_s

            def compatible() -> list[Job]:
                batch, rows = [], 0
                for job in self._pending:
                    if job.sampling != first.sampling:
                        continue
                    if batch and rows + len(job.prompts) > self.max_batch_size:
                        break
                    batch.append(job)
                    rows += len(job.prompts)
                return batch

            batch = compatible()
            while sum(len(j.prompts) for j in batch) < self.max_batch_size and not self._stopped:
                remaining = deadline - time.perf_counter_ns() / 1e9
                if remaining <= 0:
                    break
                self._cv.wait(timeout=remaining)
                batch = compatible()
            for job in batch:
                self._pending.remove(job)
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._run_batch(batch)

    def _run_batch(self, batch: list[Job]) -> None:
        owners = [(job, i) for job in batch for i in range(len(job.prompts))]  # row -> (job, prompt index)
        rows = [job.prompts[i] for job, i in owners]
        limits = [job.max_new_tokens[i] for job, i in owners]
        start = time.perf_counter_ns()

        def on_token(row: int, token: int, reason: str | None) -> None:
            job, index = owners[row]
            if job.stream:
                job.events.put(("token", index, token, reason))

        try:
            results, first_token_ns = self.engine.generate_batch(rows, limits, batch[0].sampling, on_token)
        except Exception as exc:  # noqa: BLE001 - every job of the batch gets the error
            log.warning("batch of %d prompts failed: %s", len(rows), exc)
            for job in batch:
                job.events.put(("error", exc))
            return
        end = time.perf_counter_ns()
        row = 0
        for job in batch:
            mine: list[RowResult] = results[row: row + len(job.prompts)]
            row += len(job.prompts)
            timings = dict(
                queue_ns=start - job.arrival_ns,
                first_token_ns=(first_token_ns - start) if first_token_ns else 0,
                total_ns=end - job.arrival_ns,
                batch_size=len(rows),
            )
            job.events.put(("done", mine, timings))
