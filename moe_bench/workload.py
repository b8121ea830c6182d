"""The benchmark's workload: requests of a fixed shape from held-out text, driven by
concurrent closed-loop clients against the gateway or the single-process model, with
per-request timings split into prefill (to the first token) and decode."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Workload:
    batch_size: int = 8  # prompts per request (= the gateway's --max-batch-size: one request, one batch)
    prompt_tokens: int = 128  # every prompt has exactly this many tokens, so nothing is padded
    new_tokens: int = 8  # greedy tokens generated per prompt (fewer when a row emits EOS)
    clients: int = 2  # concurrent closed-loop clients
    requests: int = 12  # measured requests
    warmup: int = 2  # requests before measuring (planner history, caches)


@dataclass
class Record:
    request: int  # index into the request list
    latency_s: float  # client-side, from sending to the reply
    prefill_s: float  # from the batch starting to its first token
    decode_s: float  # from the first token to the last
    input_tokens: int
    generated_tokens: int
    outputs: list[list[int]]


def make_requests(chunks: list[list[int]], w: Workload) -> list[list[list[int]]]:
    """(warmup + requests) requests of batch_size prompts, from chunks of exactly prompt_tokens tokens."""
    full = [c for c in chunks if len(c) == w.prompt_tokens]
    need = (w.warmup + w.requests) * w.batch_size
    if len(full) < need:
        raise ValueError(f"the benchmark text gives {len(full)} prompts of {w.prompt_tokens} tokens; "
                         f"{need} are needed (fewer --requests, a shorter --prompt-tokens, or more text)")
    return [full[i * w.batch_size:(i + 1) * w.batch_size] for i in range(w.warmup + w.requests)]


def drive(send, requests: list[tuple[int, list[list[int]]]], clients: int) -> tuple[list[Record], float]:
    """Send (index, prompts) requests from `clients` threads, each taking the next unsent one
    when its previous reply is in. send(prompts) -> (prefill_s, decode_s, outputs).
    Returns the records, in completion order, and the wall time. Raises the first error."""
    queue = list(requests)
    lock = threading.Lock()
    records: list[Record] = []
    errors: list[BaseException] = []

    def client():
        while True:
            with lock:
                if not queue or errors:
                    return
                index, prompts = queue.pop(0)
            t0 = time.perf_counter()
            try:
                prefill_s, decode_s, outputs = send(prompts)
            except BaseException as exc:  # noqa: BLE001 - reported to the caller
                with lock:
                    errors.append(exc)
                return
            record = Record(index, time.perf_counter() - t0, prefill_s, decode_s, sum(len(p) for p in prompts),
                            sum(len(o) for o in outputs), outputs)
            with lock:
                records.append(record)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    return records, wall


def summarize(records: list[Record], wall_s: float) -> dict:
    """tokens_per_s (prefill, decode, total), p50_ms, p99_ms, and the token counts."""
    inputs = sum(r.input_tokens for r in records)
    generated = sum(r.generated_tokens for r in records)
    prefill = sum(r.prefill_s for r in records)
    decode = sum(r.decode_s for r in records)
    latencies = np.array([r.latency_s for r in records]) * 1e3
    return dict(
        tokens_per_s=dict(prefill=inputs / prefill if prefill else 0.0, decode=generated / decode if decode else 0.0,
                          total=(inputs + generated) / wall_s),
        p50_ms=float(np.percentile(latencies, 50)), p99_ms=float(np.percentile(latencies, 99)),
        requests=len(records), input_tokens=inputs, generated_tokens=generated, wall_s=wall_s,
    )


class _FirstToken:
    """A generate() streamer that notes when the first generated token arrives."""

    def __init__(self):
        self.puts = 0
        self.first = None

    def put(self, value):
        self.puts += 1
        if self.puts == 2:  # the first put is the decoder start token
            self.first = time.perf_counter()

    def end(self):
        pass


class Monolithic:
    """The single-process HF model serving one batch at a time, as the gateway's batcher
    does, with all of this machine's cores."""

    def __init__(self, path, device: str = "cpu"):
        from transformers import SwitchTransformersForConditionalGeneration

        self.device = torch.device(device)
        self.model = SwitchTransformersForConditionalGeneration.from_pretrained(path).to(self.device).eval()
        self.lock = threading.Lock()

    def send(self, prompts: list[list[int]], new_tokens: int):
        from moe_common.batching import generated_rows, pad_right

        input_ids, mask = (t.to(self.device) for t in pad_right(prompts, self.model.config.pad_token_id))
        streamer = _FirstToken()
        with self.lock, torch.inference_mode():
            t0 = time.perf_counter()
            out = self.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                      do_sample=False, streamer=streamer)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            t1 = time.perf_counter()
        first = streamer.first or t1
        return first - t0, t1 - first, generated_rows(out.cpu(), self.model.config.eos_token_id)
