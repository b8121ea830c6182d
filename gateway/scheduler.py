"""Continuous batching: iteration-level scheduling of the gateway's decode loop.

Glossary: a *row* is one prompt of a request; the *running set* is the rows decoding
now, one slot each in the decoder caches (gateway/decode_cache.py); *admission* runs the
encoder for waiting rows and gives them slots; a *step* runs the decoder once for every
running row and picks each row's next token with its own decoding parameters; a row
*retires* when it made its EOS or its max_new_tokens, or its client went away.

``RowDecoder`` is the model side (encoder pass at admission, one decoder step over the
running rows) and runs on any HF SwitchTransformersForConditionalGeneration: the
gateway's (RemoteExperts in the sparse layers) or the single-process reference.
``pick_tokens`` applies HF's own logits warpers row by row. ``ContinuousScheduler`` owns
the running set and serves the Batcher's interface (submit / cancel / stop, Job events),
so the servicers run on either.

Exactness against HF's generate() of the request alone: greedy rows take the argmax of
the float32 logits, as HF does; sampling rows apply HF's TemperatureLogitsWarper,
TopKLogitsWarper and TopPLogitsWarper in HF's order (gateway/engine.Sampling's fields;
the presets' generation configs add no other processor) and draw with
``torch.multinomial`` from the request's own random stream (``RandomStream``), seeded
with the request's seed: the stream HF draws from after ``torch.manual_seed(seed)``.

A request with several prompts is one batch for HF's generate(), and its rows share that
stream: every step, generate() draws ``torch.multinomial(probs [rows, vocab], 1)`` for
all of the request's rows at once, finished ones included, until the last one finishes.
On the CPU and GPU alike that draw is ``argmax(probs / q)`` with ``q`` one exponential
per entry of the whole [rows, vocab] tensor (torch's multinomial for one sample), so row
b's token depends on its own probabilities and on its position b in one draw over the
request's full width. The scheduler reproduces it: the request's rows are admitted in
the same step (so they step together), and every step any of them decodes, one draw of
the request's full width is made from its stream, with a placeholder distribution in
the positions of rows that finished (or never needed a token), whose draws are dropped,
as HF drops them. A seeded request's tokens therefore equal HF's generate() of that
request alone, whatever else shares the step, one prompt or several.
"""

from __future__ import annotations

import collections
import itertools
import logging
import threading
import time
from dataclasses import dataclass
from typing import Sequence

import torch
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper
from transformers.modeling_outputs import MoEModelOutput

from gateway import tracing
from gateway.batcher import Job
from gateway.decode_cache import RowCaches
from gateway.engine import Engine, RowResult, Sampling
from moe_common import tracing as request_ids
from moe_common.batching import pad_right
from moe_common.errors import ResourceExhausted, Unavailable

log = logging.getLogger(__name__)


class RowDecoder:
    """Admission and decode steps of a running set over an HF Switch Transformer."""

    def __init__(self, model, pad_token_id: int, rows: int = 8):
        cfg = model.config
        self.model = model
        self.pad_token_id = pad_token_id
        self.start_token_id = cfg.decoder_start_token_id
        self.d_model = cfg.d_model
        param = next(model.parameters())
        self.dtype, self.device = param.dtype, param.device
        self.cross = [block.layer[1].EncDecAttention for block in model.decoder.block]
        self.caches = RowCaches(len(self.cross), cfg.num_heads, cfg.d_kv, self.dtype, self.device, rows=rows)
        self.gather_ns = 0  # building each step's cache views and masks, summed
        self.steps = 0
        self.step_rows = 0  # rows over all steps: tokens each decoder sparse layer got per step, summed

    @torch.inference_mode()
    def admit(self, prompts: list[list[int]]) -> list[int]:
        """Run the encoder over new rows (right-padded, as HF's tokenizer pads) and give
        each a slot holding its cross-attention keys and values. Returns their slots."""
        input_ids, mask = (t.to(self.device) for t in pad_right(prompts, self.pad_token_id))
        hidden = self.model.encoder(input_ids=input_ids, attention_mask=mask).last_hidden_state  # [N, S, d]
        n, s = input_ids.shape
        keys, values = [], []
        for attn in self.cross:  # HF's own projections, as its cross-attention makes them on the first step
            keys.append(attn.k(hidden).view(n, s, attn.n_heads, attn.key_value_proj_dim).transpose(1, 2))  # [N, H, S, d_kv]
            values.append(attn.v(hidden).view(n, s, attn.n_heads, attn.key_value_proj_dim).transpose(1, 2))
        return [self.caches.add([k[i, :, :len(p)] for k in keys], [v[i, :, :len(p)] for v in values])
                for i, p in enumerate(prompts)]

    @torch.inference_mode()  # buffers grown during a step are inference tensors
    def remove(self, slot: int) -> int | None:
        """Retire the row in `slot`; returns the slot of the row that moved into it, if any."""
        return self.caches.remove(slot)

    @torch.inference_mode()
    def step(self, last_tokens: list[int]) -> torch.Tensor:
        """One decoder pass: last_tokens[slot] is the token each live row feeds (the
        decoder start token on its first step). Returns next-token logits [B, vocab], float32."""
        t0 = time.perf_counter_ns()
        cache, self_mask, enc_mask, src = self.caches.step_inputs()
        rows = self.caches.rows
        # Cross-attention reads its keys and values from the cache (is_updated); HF only
        # needs the encoder output's shape, so a zero-stride tensor stands in for it.
        encoder = torch.zeros((), dtype=self.dtype, device=self.device).expand(rows, src, self.d_model)
        ids = torch.tensor(last_tokens, dtype=torch.long, device=self.device)[:, None]  # [B, 1]
        self.gather_ns += time.perf_counter_ns() - t0
        out = self.model(encoder_outputs=MoEModelOutput(last_hidden_state=encoder), attention_mask=enc_mask,
                         decoder_input_ids=ids, decoder_attention_mask=self_mask, cache=cache, use_cache=True)
        self.caches.advance()
        self.steps += 1
        self.step_rows += rows
        return out.logits[:, -1].to(dtype=torch.float32)  # as HF's generate() casts them


def _warpers(s: Sampling) -> list:
    """HF's sampling warpers for these parameters, in the order generate() applies them."""
    out = []
    if s.temperature != 1.0:
        out.append(TemperatureLogitsWarper(s.temperature))
    if s.top_k != 0:
        out.append(TopKLogitsWarper(top_k=s.top_k, min_tokens_to_keep=1))
    if s.top_p < 1.0:
        out.append(TopPLogitsWarper(top_p=s.top_p, min_tokens_to_keep=1))
    return out


@dataclass(eq=False)
class RandomStream:
    """A sampling request's random stream, shared by its prompts (module docstring)."""

    generator: torch.Generator
    width: int = 1  # the request's prompts: the rows HF's generate() draws for at once


def make_stream(sampling: Sampling, device: torch.device, width: int = 1) -> RandomStream | None:
    """A sampling request's random stream: seeded, it is the stream torch.manual_seed(seed) gives."""
    if not sampling.do_sample:
        return None
    gen = torch.Generator(device=device)
    if sampling.seed is not None:
        gen.manual_seed(sampling.seed)
    else:
        gen.seed()
    return RandomStream(gen, width)


def pick_tokens(logits: torch.Tensor, samplings: Sequence[Sampling], streams: Sequence[RandomStream | None],
                positions: Sequence[int] | None = None) -> list[int]:
    """Next token per row: logits [B, vocab] float32; samplings[b], streams[b] and
    positions[b] (its prompt's index in its request; default 0) of row b.

    Greedy rows take the argmax. Sampling rows are warped together per stream (HF's
    warpers are row-wise) and drawn with one multinomial over the stream's full width,
    as HF's generate() draws for the request's batch (module docstring)."""
    out = logits.argmax(-1).tolist()  # HF's greedy search: argmax of the float32 logits
    by_stream: dict[int, list[int]] = {}
    for b, s in enumerate(samplings):
        if s.do_sample:
            by_stream.setdefault(id(streams[b]), []).append(b)
    for rows in by_stream.values():
        stream = streams[rows[0]]
        scores = logits[rows]  # [n, vocab]
        for warper in _warpers(samplings[rows[0]]):  # a stream's rows share their request's parameters
            scores = warper(None, scores)
        probs = torch.nn.functional.softmax(scores, dim=-1)
        where = [positions[b] for b in rows] if positions is not None else [0] * len(rows)
        if stream.width > 1:
            # Each row at its prompt's place in the request's draw. Rows not decoding this
            # step keep their places too; any valid distribution does, their tokens are dropped.
            full = torch.full((stream.width, probs.shape[-1]), 1.0 / probs.shape[-1], dtype=probs.dtype,
                              device=probs.device)  # [width, vocab]
            full[where] = probs
            probs = full
        picked = torch.multinomial(probs, num_samples=1, generator=stream.generator)[:, 0].tolist()
        for b, w in zip(rows, where):
            out[b] = picked[w]
    return out


def admission_due(running: int, free: int, waiting: int, ready_steps: int, max_wait_steps: int,
                  max_batch_size: int) -> bool:
    """Whether this step admits waiting rows (the scheduler's admission policy).

    running: rows decoding; free: slots free for new rows (max_batch_size - running);
    waiting: rows waiting; ready_steps: decode steps run since rows have been waiting
    with a slot free for them; max_wait_steps: --admission-wait-steps.

    An admission runs the arrivals' encoder pass between two decode steps, and every
    running row waits for it. Admitting rows one by one, as they arrive or as single
    slots free up, interrupts decoding once per row; one pass over several prompts costs
    less than as many passes over one (bigger matrix products, fewer expert calls). So
    admission waits for more arrivals or more free slots, but never when nothing decodes
    (no one to interrupt), and not once it can fill half a batch (a pass that big is worth
    running now). Otherwise waiting rows wait at most max_wait_steps decode steps (0:
    admit at every step) once a slot is free for them.
    """
    if waiting == 0:
        return False
    if running == 0:
        return True
    if free <= 0:
        return False
    return 2 * min(waiting, free) >= max_batch_size or ready_steps >= max_wait_steps


@dataclass(eq=False)
class _Row:
    job: Job
    index: int  # prompt index within the job
    prompt: list[int]
    limit: int  # max_new_tokens
    stream: RandomStream | None = None  # sampling: its request's, shared by the request's rows
    last: int = 0  # the token it feeds next step
    slot: int = -1


@dataclass(eq=False)
class _JobState:
    results: list[RowResult]
    open_rows: int
    admitted_ns: int = 0
    first_token_ns: int = 0
    batch_size: int = 0
    finished: bool = False


class ContinuousScheduler:
    """The decode loop that owns the running set (module docstring). Same interface as
    gateway/batcher.Batcher: submit(job), cancel(job), stop().

    Every iteration: retire rows whose client went away; when ``admission_due`` says so,
    admit waiting rows in arrival order (FIFO, never skipping the oldest) while slots are
    free (max_batch_size) and the admission's prompt tokens stay within max_batch_tokens
    (the oldest is admitted even alone over it); run one step. The rows of a sampling
    request with several prompts share its random stream and enter together (a request
    wider than max_batch_size enters alone when nothing decodes). Waiting rows therefore
    wait at most admission_wait_steps decode steps once a slot is free for them, and
    otherwise until as many rows ahead of them have retired.
    """

    def __init__(self, engine: Engine, max_batch_size: int, max_batch_tokens: int, max_queued_prompts: int = 1024,
                 admission_wait_steps: int = 0):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.max_queued_prompts = max_queued_prompts
        self.admission_wait_steps = admission_wait_steps
        self._steps = 0  # decode steps run
        self._batch_id = ""  # the latest admission's (gateway/tracing.py)
        self._ready_since: int | None = None  # the step since which rows wait with a slot free for them
        self._next: list[list[int]] = []  # prompts of the admission that waits for its turn (_take)
        self._announced: list[list[int]] = []  # the prompts last given to Engine.upcoming
        self.decoder = RowDecoder(engine.model, engine.pad_token_id, rows=max_batch_size)
        self.eos = engine.eos_token_id
        self._waiting: collections.deque[_Row] = collections.deque()
        self._running: list[_Row] = []  # by slot
        self._jobs: dict[int, _JobState] = {}  # id(job) -> state, while unfinished
        self._cv = threading.Condition()
        self._stopped = False
        self._worker = threading.Thread(target=self._run, name="scheduler", daemon=True)
        self._worker.start()

    # ---- the Batcher interface ----

    def submit(self, job: Job) -> Job:
        with self._cv:
            if job.cancelled.is_set():
                return job
            if self._stopped:
                raise Unavailable("the gateway is shutting down")
            if len(self._waiting) + len(job.prompts) > self.max_queued_prompts:
                raise ResourceExhausted(f"{len(self._waiting)} prompts are already waiting "
                                        f"(limit {self.max_queued_prompts}); retry later")
            state = _JobState([RowResult([], "length") for _ in job.prompts],
                              open_rows=sum(1 for limit in job.max_new_tokens if limit > 0))
            if state.open_rows == 0:  # nothing to generate
                job.events.put(("done", state.results, dict(queue_ns=0, first_token_ns=0,
                                total_ns=time.perf_counter_ns() - job.arrival_ns, batch_size=0)))
                return job
            self._jobs[id(job)] = state
            stream = make_stream(job.sampling, self.decoder.device, width=len(job.prompts))
            for i, (prompt, limit) in enumerate(zip(job.prompts, job.max_new_tokens)):
                if limit > 0:
                    self._waiting.append(_Row(job, i, prompt, limit, stream, last=self.decoder.start_token_id))
            self._cv.notify()
        return job

    def cancel(self, job: Job) -> None:
        job.cancel()
        with self._cv:
            self._waiting = collections.deque(r for r in self._waiting if r.job is not job)
            self._jobs.pop(id(job), None)  # running rows retire at the next step
            self._cv.notify()

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._worker.join(timeout=10)

    def requests_waiting(self) -> int:
        """Requests none of whose prompts is admitted yet (moe_num_requests_waiting). A row
        in its admission's encoder pass has left the queue: it runs."""
        with self._cv:
            queued = {id(row.job) for row in self._waiting}
            return sum(1 for j in queued if (state := self._jobs.get(j)) is not None and not state.admitted_ns)

    @property
    def stats(self) -> dict:
        """Decode-step figures: steps, rows over all steps, cache gather time."""
        d = self.decoder
        return dict(steps=d.steps, step_rows=d.step_rows, gather_ns=d.gather_ns,
                    compactions=d.caches.compactions, grows=d.caches.grows)

    # ---- the loop ----

    def _take(self) -> list[_Row] | None:
        """Wait for work; the rows to admit now (maybe none), or None when stopped."""
        with self._cv:
            while not self._waiting and not self._running and not self._stopped:
                self._cv.wait()
            if self._stopped:
                err = Unavailable("the gateway is shutting down")
                for job in {id(r.job): r.job for r in [*self._waiting, *self._running]}.values():
                    job.events.put(("error", err))
                self._waiting.clear()
                return None
            running = len(self._running)
            free = self.max_batch_size - running
            self._next = []
            if not (self._waiting and free > 0):
                self._ready_since = None
                if self._waiting:  # a full batch: the rows that would enter once the running ones retired
                    self._next = [r.prompt for r in itertools.islice(self._waiting, self._admissible(0))]
                return []
            if self._ready_since is None:
                self._ready_since = self._steps
            if not admission_due(running, free, len(self._waiting), self._steps - self._ready_since,
                                 self.admission_wait_steps, self.max_batch_size):
                # What would enter now enters when the wait ends, unless more arrive or
                # rows retire meanwhile: announced for predictive replication (_run).
                self._next = [r.prompt for r in itertools.islice(self._waiting, self._admissible(running))]
                return []
            admit = [self._waiting.popleft() for _ in range(self._admissible(running))]
            if admit:
                self._ready_since = None  # those left wait for the next free slot afresh
            return admit

    def _admissible(self, running: int) -> int:
        """How many rows at the head of the queue an admission takes now: in arrival order
        (FIFO, never skipping the oldest), whole units (_unit_at), while slots are free and
        the prompt tokens stay within max_batch_tokens (the oldest enters even alone over
        it; a unit wider than the batch enters alone when nothing decodes). Call under self._cv."""
        taken = tokens = 0
        while taken < len(self._waiting):
            unit = self._unit_at(taken)
            if running + taken + len(unit) > self.max_batch_size and (running or taken):
                break
            need = sum(len(r.prompt) for r in unit)
            if taken and tokens + need > self.max_batch_tokens:
                break
            taken += len(unit)
            tokens += need
        return taken

    def _unit_at(self, i: int) -> list[_Row]:
        """The waiting rows from position i that must enter together: row i, with the rest
        of its request's rows when they share a random stream (they step together)."""
        head = self._waiting[i]
        if head.stream is None or head.stream.width == 1:
            return [head]
        unit = []
        for row in itertools.islice(self._waiting, i, None):  # a request's rows were queued together, in order
            if row.job is not head.job:
                break
            unit.append(row)
        return unit

    def _run(self) -> None:
        while True:
            admit = self._take()
            if admit is None:
                return
            # Predictive replication forecasts and plans the next admission's prompts while
            # rows decode (ReplicaManager.upcoming); announced once per change.
            announce, self._next = self._next, []
            if announce and announce != self._announced:
                try:
                    self.engine.upcoming(announce)
                except Exception:  # noqa: BLE001 - replicas only speed serving up; never a request's failure
                    log.exception("announcing the next admission to the replica planner failed")
            self._announced = [] if admit else announce or self._announced
            try:
                for row in [r for r in self._running if r.job.cancelled.is_set()]:
                    self._retire(row)
                admit = [r for r in admit if not r.job.cancelled.is_set()]
                if admit:
                    self._admit(admit)
                if self._running:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - a bug here must not leave every handler waiting forever
                log.exception("the decode loop failed; failing its jobs and starting over with empty caches")
                for job in {id(r.job): r.job for r in [*admit, *self._running]}.values():
                    if self._jobs.pop(id(job), None) is not None:
                        job.events.put(("error", exc))
                self._running = []
                self.decoder = RowDecoder(self.engine.model, self.engine.pad_token_id, rows=self.max_batch_size)

    def _admit(self, rows: list[_Row]) -> None:
        # An admission is this scheduler's batch: its prompts are counted and logged as one,
        # and its encoder pass's calls carry its request ids and batch id.
        self._batch_id = tracing.batch_started(list({id(r.job): r.job for r in rows}.values()), len(rows))
        t0 = time.perf_counter_ns()
        try:
            slots = self.decoder.admit([r.prompt for r in rows])
        except Exception as exc:  # noqa: BLE001 - the admitted jobs get the error; the running set goes on
            log.warning("admitting %d prompts failed: %s", len(rows), exc)
            self._fail({id(r.job): r.job for r in rows}.values(), exc)
            return
        finally:
            self.engine.forward_ns += time.perf_counter_ns() - t0
        for row, slot in zip(rows, slots):
            assert slot == len(self._running)
            row.slot = slot
            self._running.append(row)
        batch = len(self._running)
        for row in rows:
            state = self._jobs.get(id(row.job))
            if state is not None and not state.admitted_ns:
                state.admitted_ns, state.batch_size = t0, batch

    def _step(self) -> None:
        rows = self._running
        # A step's expert calls carry the request ids of every row in it, and the batch id
        # of the latest admission.
        request_ids.set_current(",".join(dict.fromkeys(r.job.request_id for r in rows if r.job.request_id)),
                                self._batch_id)
        t0 = time.perf_counter_ns()
        try:
            logits = self.decoder.step([r.last for r in rows])
            tokens = pick_tokens(logits, [r.job.sampling for r in rows], [r.stream for r in rows],
                                 [r.index for r in rows])
        except Exception as exc:  # noqa: BLE001 - every running job gets the error; the loop goes on
            log.warning("decode step of %d rows failed: %s", len(rows), exc)
            self._fail({id(r.job): r.job for r in rows}.values(), exc)
            return
        finally:
            self.engine.forward_ns += time.perf_counter_ns() - t0
        self._steps += 1
        now = time.perf_counter_ns()
        done, finished = [], []
        for row, token in zip(rows, tokens):
            state = self._jobs.get(id(row.job))
            if state is None:  # its job failed or was cancelled
                done.append(row)
                continue
            result = state.results[row.index]
            result.token_ids.append(token)
            state.first_token_ns = state.first_token_ns or now
            row.last = token
            reason = "eos" if token == self.eos else "length" if len(result.token_ids) >= row.limit else None
            if row.job.stream:
                row.job.events.put(("token", row.index, token, reason))
            if reason is not None:
                result.finish_reason = reason
                done.append(row)
                state.open_rows -= 1
                if state.open_rows == 0:
                    finished.append((row.job, state))
        for row in sorted(done, key=lambda r: -r.slot):  # highest slot first: moves never touch a retiring row
            self._retire(row)
        for job, state in finished:  # after retiring: whoever hears "done" sees the slots free
            self._finish(job, state, now)

    def _retire(self, row: _Row) -> None:
        moved = self.decoder.remove(row.slot)
        last = self._running.pop()
        if moved is not None:
            self._running[row.slot] = last
            last.slot = row.slot

    def _finish(self, job: Job, state: _JobState, now: int) -> None:
        self._jobs.pop(id(job), None)
        timings = dict(queue_ns=state.admitted_ns - job.arrival_ns, first_token_ns=state.first_token_ns - state.admitted_ns,
                       total_ns=now - job.arrival_ns, batch_size=state.batch_size)
        job.events.put(("done", state.results, timings))

    def _fail(self, jobs, exc: Exception) -> None:
        """Fail these jobs: their error is sent and all their rows leave."""
        failed = {id(j) for j in jobs}
        for job in jobs:
            if self._jobs.pop(id(job), None) is not None:
                job.events.put(("error", exc))
        for row in sorted([r for r in self._running if id(r.job) in failed], key=lambda r: -r.slot):
            self._retire(row)
        with self._cv:
            self._waiting = collections.deque(r for r in self._waiting if id(r.job) not in failed)
