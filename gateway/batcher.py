"""Batching of concurrent client requests.

Requests wait in arrival order. The worker takes the oldest request, waits up to
max_wait_ms for more requests with the same decoding parameters (up to
max_batch_size prompts together), and runs them as one batch. Each request hears
about its own tokens as they are generated and gets its result as soon as its own
rows are finished, not when the whole batch is. A request with more prompts than
max_batch_size runs as a batch of its own; a seeded sampling request always runs
alone, since a batch shares one random stream and the seed promises the same tokens
whatever else arrives. A cancelled request (its client went away or its deadline
passed) leaves the queue at once, stops taking part in its batch, and its handler
stops waiting: a handler thread is never held by a request nobody waits for.

When a batch starts, the prompts queued to form the next one are handed to the engine
(`Engine.upcoming`; or, if none is queued yet, those of the first request to arrive
while it runs), so that predictive replication forecasts and prefetches them while
this batch runs rather than making the next batch wait.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from gateway import tracing
from gateway.engine import Engine, RowResult, Sampling
from moe_common.errors import Cancelled, ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


@dataclass(eq=False)  # a job is itself: compared and removed by identity
class Job:
    """One client request: its prompts and where its events go."""

    prompts: list[list[int]]  # encoder token ids per prompt
    max_new_tokens: list[int]  # per prompt
    sampling: Sampling
    stream: bool = False  # also report each token as it is generated
    request_id: str = ""  # the client's or a generated one (moe_common/tracing.py)
    arrival_ns: int = field(default_factory=time.perf_counter_ns)
    # ("token", index, token_id, finish_reason) | ("done", [RowResult], Timings dict) | ("error", exception)
    events: queue.Queue = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        """The client went away: stop taking part, and wake whoever waits on the events
        (the gRPC handler thread), which would otherwise wait for a reply nobody reads."""
        self.cancelled.set()
        self.events.put(("error", Cancelled("the request was cancelled or its deadline passed")))

    def next_event(self) -> tuple:
        """The next event: ("token", ...), ("done", ...) or ("error", exception)."""
        return self.events.get()

    def wait(self):
        """Block until the job finishes; returns (results, timings) or raises its error."""
        while True:
            kind, *rest = self.next_event()
            if kind == "done":
                return rest[0], rest[1]
            if kind == "error":
                raise rest[0]

    @property
    def runs_alone(self) -> bool:
        return self.sampling.do_sample and self.sampling.seed is not None


class Batcher:
    def __init__(self, engine: Engine, max_batch_size: int, max_wait_ms: float, max_queued_prompts: int = 1024):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.max_queued_prompts = max_queued_prompts
        self._pending: list[Job] = []
        self._cv = threading.Condition()
        self._stopped = False
        self._announce_on_submit = False  # a batch runs and nothing queued was announced yet
        self._worker = threading.Thread(target=self._run, name="batcher", daemon=True)
        self._worker.start()

    def submit(self, job: Job) -> Job:
        with self._cv:
            if job.cancelled.is_set():
                return job  # its client already went away; its error event is queued
            if self._stopped:
                raise Unavailable("the gateway is shutting down")
            queued = sum(len(j.prompts) for j in self._pending)
            if queued + len(job.prompts) > self.max_queued_prompts:
                raise ResourceExhausted(f"{queued} prompts are already waiting (limit {self.max_queued_prompts}); retry later")
            self._pending.append(job)
            self._cv.notify()
            rows = self._next_rows() if self._announce_on_submit else []
            self._announce_on_submit = self._announce_on_submit and not rows
        if rows:
            self.engine.upcoming(rows)
        return job

    def cancel(self, job: Job) -> None:
        """Cancel a job (its RPC ended): it leaves the queue now, so it neither counts
        against max_queued_prompts nor holds its handler thread until its turn."""
        job.cancel()
        with self._cv:
            if job in self._pending:
                self._pending.remove(job)
                self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._worker.join(timeout=10)

    def requests_waiting(self) -> int:
        """Requests queued for a batch that has not started (moe_num_requests_waiting)."""
        with self._cv:
            return len(self._pending)

    def _take_batch(self) -> list[Job] | None:
        """Wait for work; return the next batch (oldest job first), or None when stopped."""
        with self._cv:
            while True:
                while not self._pending and not self._stopped:
                    self._cv.wait()
                if self._stopped:
                    for job in self._pending:
                        job.events.put(("error", Unavailable("the gateway is shutting down")))
                    return None
                self._pending = [j for j in self._pending if not j.cancelled.is_set()]
                if self._pending:
                    break
            first = self._pending[0]
            deadline = first.arrival_ns / 1e9 + self.max_wait_s
            batch = self._compatible(first)
            while (not first.runs_alone and sum(len(j.prompts) for j in batch) < self.max_batch_size
                   and not self._stopped):
                remaining = deadline - time.perf_counter_ns() / 1e9
                if remaining <= 0:
                    break
                self._cv.wait(timeout=remaining)
                batch = self._compatible(first)
            for job in batch:
                self._pending.remove(job)
            return batch

    def _compatible(self, first: Job) -> list[Job]:
        """The jobs that would run with `first` (oldest first); call under self._cv."""
        if first.runs_alone:
            return [first]
        batch, rows = [], 0
        for job in self._pending:
            if job.sampling != first.sampling or job.cancelled.is_set():
                continue
            if batch and rows + len(job.prompts) > self.max_batch_size:
                break
            batch.append(job)
            rows += len(job.prompts)
        return batch

    def _next_rows(self) -> list[list[int]]:
        """The prompts of the batch that would form now from the queue; call under self._cv."""
        first = next((j for j in self._pending if not j.cancelled.is_set()), None)
        return [] if first is None else [p for job in self._compatible(first) for p in job.prompts]

    def _run(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            with self._cv:
                rows = self._next_rows()
                self._announce_on_submit = not rows
            if rows:
                self.engine.upcoming(rows)
            try:
                self._run_batch(batch)
            finally:
                with self._cv:
                    self._announce_on_submit = False

    def _run_batch(self, batch: list[Job]) -> None:
        owners = [(job, i) for job in batch for i in range(len(job.prompts))]  # row -> (job, prompt index)
        tracing.batch_started(batch, len(owners))
        rows = [job.prompts[i] for job, i in owners]
        limits = [job.max_new_tokens[i] for job, i in owners]
        first_row = {}  # job -> its first row
        for row, (job, _) in enumerate(owners):
            first_row.setdefault(id(job), row)
        open_rows = {id(job): sum(1 for i, limit in enumerate(job.max_new_tokens) if limit > 0) for job in batch}
        start = time.perf_counter_ns()
        first_token = {}
        results = [RowResult([], "length") for _ in rows]  # filled token by token
        finished: set[int] = set()

        def finish(job: Job) -> None:
            # Called on the batcher thread only; each job is finished once.
            if id(job) in finished:
                return
            finished.add(id(job))
            a = first_row[id(job)]
            now = time.perf_counter_ns()
            timings = dict(queue_ns=start - job.arrival_ns, first_token_ns=first_token.get(id(job), start) - start,
                           total_ns=now - job.arrival_ns, batch_size=len(rows))
            job.events.put(("done", results[a: a + len(job.prompts)], timings))

        def on_token(row: int, token: int, reason: str | None) -> None:
            job, index = owners[row]
            first_token.setdefault(id(job), time.perf_counter_ns())
            results[row].token_ids.append(token)
            if reason is not None:
                results[row].finish_reason = reason
            if job.stream:
                job.events.put(("token", index, token, reason))
            if reason is not None:
                open_rows[id(job)] -= 1
                if open_rows[id(job)] == 0:
                    finish(job)

        def stop_row(row: int) -> bool:
            return owners[row][0].cancelled.is_set()

        try:
            self.engine.generate_batch(rows, limits, batch[0].sampling, on_token, stop_row)
        except Exception as exc:  # noqa: BLE001 - every unfinished job of the batch gets the error
            log.warning("batch of %d prompts failed: %s", len(rows), exc)
            for job in batch:
                if id(job) not in finished:
                    job.events.put(("error", exc))
            return
        for job in batch:  # jobs whose rows were all empty, or cancelled part-way
            finish(job)
