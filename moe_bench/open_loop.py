"""moe-bench's open-loop workload: requests arrive at Poisson times whatever the server
is doing, each asks for a number of new tokens drawn uniformly from a range, and the same
arrivals are served by a gateway with each --scheduler in turn (static, continuous), in
one run on the same expert servers.

    moe-bench --model base-e32-l4 --expert-servers 2 --arrival-rate 0.5 --new-tokens-range 4,64 \\
        --open-loop-requests 40 --json benchmarks/results/continuous.json

Per scheduler it reports generated tokens/s, end-to-end latency p50/p99, time to first
token (TTFT) p50/p99 and time per output token (TPOT: from the first token to the last,
over the tokens after the first), all measured by the client on streamed replies; the
tokens per decode-step layer call the expert servers saw (GetStatus expert_path); and
whether every output equals the single-process HF model run on that request alone. Its
baseline is the first scheduler's figures, measured in the same run: the ratios are
against it. The unloaded latency (requests one at a time, static) is measured too, so
one can tell whether the rate loads the server (the issue's target: static p99 about 5x
its unloaded latency).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("moe-bench")
HOST = "127.0.0.1"


@dataclass(frozen=True)
class Arrival:
    at_s: float  # seconds after the run starts
    prompt: list[int]
    new_tokens: int


def arrival_schedule(prompts: list[list[int]], count: int, rate: float, new_tokens: tuple[int, int],
                     seed: int = 0) -> list[Arrival]:
    """`count` arrivals of a Poisson process of `rate` requests/s (exponential gaps, the
    first at 0), new tokens uniform in [a, b], prompts in order (cycled). Seeded: the same
    arguments give the same schedule."""
    if rate <= 0 or count < 1:
        raise ValueError("need --arrival-rate > 0 and at least one request")
    a, b = new_tokens
    if not 1 <= a <= b:
        raise ValueError(f"--new-tokens-range must be A,B with 1 <= A <= B, got {a},{b}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=count)
    gaps[0] = 0.0
    times = np.cumsum(gaps)
    news = rng.integers(a, b + 1, size=count)
    return [Arrival(float(t), prompts[i % len(prompts)], int(n)) for i, (t, n) in enumerate(zip(times, news))]


@dataclass
class OpenRecord:
    sent_s: float  # when the request was sent, from the run's start
    first_s: float  # its first token
    done_s: float  # its last
    tokens: list[int] = field(default_factory=list)

    @property
    def latency_s(self) -> float:
        return self.done_s - self.sent_s

    @property
    def ttft_s(self) -> float:
        return self.first_s - self.sent_s

    @property
    def tpot_s(self) -> float | None:
        return (self.done_s - self.first_s) / (len(self.tokens) - 1) if len(self.tokens) > 1 else None


def summarize(records: list[OpenRecord]) -> dict:
    """Throughput over the run (first send to last reply) and the latency percentiles, in ms."""
    ms = lambda xs, q: float(np.percentile(np.array(xs) * 1e3, q)) if xs else 0.0  # noqa: E731
    wall = max(r.done_s for r in records) - min(r.sent_s for r in records)
    generated = sum(len(r.tokens) for r in records)
    lat, ttft = [r.latency_s for r in records], [r.ttft_s for r in records]
    tpot = [r.tpot_s for r in records if r.tpot_s is not None]
    return dict(requests=len(records), generated_tokens=generated, wall_s=wall,
                tokens_per_s=generated / wall if wall > 0 else 0.0,
                p50_ms=ms(lat, 50), p99_ms=ms(lat, 99), ttft_p50_ms=ms(ttft, 50), ttft_p99_ms=ms(ttft, 99),
                tpot_p50_ms=ms(tpot, 50), tpot_mean_ms=float(np.mean(tpot) * 1e3) if tpot else 0.0)


def _stream(stub, prompt: list[int], new_tokens: int, t0: float) -> OpenRecord:
    from moe_protos.moe.gateway.v1 import gateway_pb2

    request = gateway_pb2.GenerateRequest(token_ids=[gateway_pb2.TokenIds(ids=prompt)],
                                          parameters=gateway_pb2.GenerationParameters(max_new_tokens=new_tokens))
    record = OpenRecord(sent_s=time.perf_counter() - t0, first_s=0.0, done_s=0.0)
    for reply in stub.GenerateStream(request, timeout=3600):
        if reply.HasField("timings"):
            break
        now = time.perf_counter() - t0  # every other reply is a token: new_tokens >= 1
        if not record.tokens:
            record.first_s = now
        record.tokens.append(reply.token_id)
        record.done_s = now
    return record


def drive_open_loop(stub, arrivals: list[Arrival]) -> list[OpenRecord]:
    """Send every arrival at its time, each on its own thread (the open loop: nobody waits
    for a reply before sending), and return the records in arrival order."""
    records: list[OpenRecord | None] = [None] * len(arrivals)
    errors: list[BaseException] = []

    def one(i: int) -> None:
        try:
            records[i] = _stream(stub, arrivals[i].prompt, arrivals[i].new_tokens, t0)
        except BaseException as exc:  # noqa: BLE001 - reported to the caller
            errors.append(exc)

    threads = []
    t0 = time.perf_counter()
    for i, arrival in enumerate(arrivals):
        delay = arrival.at_s - (time.perf_counter() - t0)
        if delay > 0:
            time.sleep(delay)  # the schedule's own clock, not a wait for the server
        threads.append(threading.Thread(target=one, args=(i,), daemon=True))
        threads[-1].start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return records


def _decode_calls(stub) -> tuple[int, int]:
    from moe_protos.moe.gateway.v1 import gateway_pb2

    path = stub.GetStatus(gateway_pb2.GetStatusRequest()).expert_path
    return path.decode_layer_calls, path.decode_tokens


def run(a, source, docs: list[str]) -> dict:
    """The open-loop comparison of the schedulers (module docstring); returns its figures."""
    import grpc
    from transformers import AutoConfig, AutoTokenizer

    from gateway.launcher import spawn_expert_server, spawn_gateway, wait_ready
    from moe_common.checkpoint import sparse_layers
    from moe_common.serving import message_options, pick_free_port
    from moe_protos.moe.gateway.v1 import gateway_pb2_grpc
    from predictor_service.collect import chunk_documents

    schedulers = [s for s in a.schedulers.split(",") if s]
    lo, hi = (int(x) for x in a.new_tokens_range.split(","))
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    decoder_layers = sum(layer.stack == "decoder" for layer in sparse_layers(AutoConfig.from_pretrained(source.path)))
    prompts = [c for c in chunk_documents(tokenizer, docs, a.prompt_tokens) if len(c) == a.prompt_tokens]
    if not prompts:
        raise ValueError(f"the benchmark text gives no prompt of {a.prompt_tokens} tokens")
    arrivals = arrival_schedule(prompts, a.open_loop_requests, a.arrival_rate, (lo, hi), a.seed)
    count = int(a.expert_servers.split(",")[0])
    threads = max(1, (os.cpu_count() or 1) // count)
    procs, addresses = [], []
    result = dict(workload=dict(arrival_rate=a.arrival_rate, new_tokens_range=[lo, hi], requests=len(arrivals),
                                prompt_tokens=a.prompt_tokens, seed=a.seed, max_batch_size=a.batch_size,
                                expert_servers=count, model=a.model),
                  schedulers={})
    try:
        for _ in range(count):
            port = pick_free_port()
            procs.append(spawn_expert_server(source.path, HOST, port, ["--threads", str(threads), "--log-level", "WARNING"]))
            addresses.append(f"{HOST}:{port}")
        for proc, address in zip(procs, addresses):
            wait_ready(proc, address)
        outputs = {}
        for scheduler in schedulers:
            port = pick_free_port()
            gw = spawn_gateway(source.path, HOST, port, addresses, [
                *scheduler_flags(scheduler), "--max-batch-size", str(a.batch_size), "--max-wait-ms", "5",
                "--max-new-tokens-limit", str(max(hi, 512)), "--log-level", "WARNING"])
            try:
                wait_ready(gw, f"{HOST}:{port}")
                with grpc.insecure_channel(f"{HOST}:{port}", options=message_options()) as ch:
                    stub = gateway_pb2_grpc.GatewayServiceStub(ch)
                    _stream(stub, prompts[0], lo, time.perf_counter())  # warm-up
                    figures = {}
                    if scheduler == schedulers[0]:  # unloaded: one request at a time, mean output length
                        alone = [_stream(stub, prompts[i % len(prompts)], (lo + hi) // 2, time.perf_counter())
                                 for i in range(a.unloaded_requests)]
                        figures["unloaded_p50_ms"] = float(np.median([r.latency_s for r in alone]) * 1e3)
                    calls0, tokens0 = _decode_calls(stub)
                    log.info("open loop: %d requests at %.2f/s, scheduler %s", len(arrivals), a.arrival_rate, scheduler)
                    records = drive_open_loop(stub, arrivals)
                    calls1, tokens1 = _decode_calls(stub)
                    figures.update(summarize(records))
                    # Routed: what expert servers got per decode-step layer call (static batches keep
                    # finished rows in it); useful: the tokens of rows still generating.
                    calls = max(1, calls1 - calls0)
                    figures["decode_tokens_per_layer_call"] = (tokens1 - tokens0) / calls
                    figures["useful_decode_tokens_per_layer_call"] = figures["generated_tokens"] * decoder_layers / calls
                    outputs[scheduler] = [r.tokens for r in records]
                    result["schedulers"][scheduler] = figures
            finally:
                gw.terminate()
                gw.wait(timeout=60)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=60)
    base = result["schedulers"][schedulers[0]]
    if "unloaded_p50_ms" in base:
        result["unloaded_p50_ms"] = base["unloaded_p50_ms"]
        result["static_p99_over_unloaded"] = base["p99_ms"] / base["unloaded_p50_ms"]
    for name, f in result["schedulers"].items():
        f["tokens_per_s_ratio"] = f["tokens_per_s"] / base["tokens_per_s"] if base["tokens_per_s"] else 0.0
        f["ttft_p99_ratio"] = f["ttft_p99_ms"] / base["ttft_p99_ms"] if base["ttft_p99_ms"] else 0.0
    if not a.no_reference:
        want = reference_outputs(source, arrivals)
        for name, outs in outputs.items():
            result["schedulers"][name]["identical_to_reference"] = sum(o == w for o, w in zip(outs, want))
    return result


def scheduler_flags(name: str) -> list[str]:
    """The gateway flags of a --schedulers entry: static, continuous, or continuous/N
    (continuous with --admission-wait-steps N)."""
    scheduler, _, wait = name.partition("/")
    return ["--scheduler", scheduler, *(["--admission-wait-steps", wait] if wait else [])]


def reference_outputs(source, arrivals: list[Arrival]) -> list[list[int]]:
    """What the single-process HF model generates greedily for each request alone."""
    import torch
    from transformers import SwitchTransformersForConditionalGeneration

    from moe_common.batching import generated_rows

    model = SwitchTransformersForConditionalGeneration.from_pretrained(source.path).eval()
    out = []
    with torch.inference_mode():
        for arrival in arrivals:
            ids = model.generate(input_ids=torch.tensor([arrival.prompt]), max_new_tokens=arrival.new_tokens,
                                 do_sample=False)
            out.append(generated_rows(ids, model.config.eos_token_id)[0])
    return out


def markdown(result: dict) -> str:
    """The static-against-continuous table."""
    w = result["workload"]
    lines = [f"Open loop: {w['requests']} requests, Poisson {w['arrival_rate']}/s, {w['prompt_tokens']}-token prompts, "
             f"new tokens uniform {w['new_tokens_range'][0]}..{w['new_tokens_range'][1]}, model {w['model']}, "
             f"{w['expert_servers']} expert servers, max batch {w['max_batch_size']}"]
    if "unloaded_p50_ms" in result:
        lines.append(f"unloaded latency (one at a time, first scheduler) {result['unloaded_p50_ms']:.0f} ms; "
                     f"its p99 under load is {result['static_p99_over_unloaded']:.1f}x that")
    lines += ["", "| scheduler | tokens/s | x | p50 ms | p99 ms | TTFT p50 ms | TTFT p99 ms | x | TPOT p50 ms "
                  "| tokens per decode layer call (routed / useful) | identical to HF alone |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, f in result["schedulers"].items():
        same = f.get("identical_to_reference")
        same = "-" if same is None else f"{same}/{f['requests']}"
        lines.append(f"| {name} | {f['tokens_per_s']:.1f} | {f['tokens_per_s_ratio']:.2f} | {f['p50_ms']:.0f} | "
                     f"{f['p99_ms']:.0f} | {f['ttft_p50_ms']:.0f} | {f['ttft_p99_ms']:.0f} | {f['ttft_p99_ratio']:.2f} | "
                     f"{f['tpot_p50_ms']:.1f} | {f['decode_tokens_per_layer_call']:.2f} / "
                     f"{f['useful_decode_tokens_per_layer_call']:.2f} | "
                     f"{same} |")
    return "\n".join(lines)
