"""moe-bench: one command for every performance figure of the README.

    moe-bench --model base-e64-l4 --expert-servers 2,4 --json bench.json --plots docs/bench --readme README.md

In one run, on real processes started and stopped here:
  1. the single-process HF model (`monolithic`) serves the workload, one batch at a time;
  2. for each expert-server count (the first one makes the main table; the others are
     for validating the simulator) and each replication mode, a gateway over those
     servers serves the same requests: tokens/s (prefill, decode, total), latency
     p50/p99, balancedness, each server's busy share, where the time goes, weights
     moved, prefetch hits, and whether every output equals the single-process model's;
  3. one expert server in mode off (the disaggregation overhead), in the same ABBA rounds
     as 1 and 2 (moe_bench/rounds.py), so its ratio is against a baseline measured around it;
  4. expert compute efficiency: the expert path's FLOP/s on a routed batch against one
     dense matmul of the same FLOPs;
  5. the simulator (moe_bench/simulator.py) replays the recorded routing: validated
     against every measured (servers, mode), then projected to --simulate-servers.
Without --predictor-checkpoint it first records routing on the corpus's first
--train-docs documents and trains the forecaster on them; the benchmark uses only the
documents after those, so the forecaster never sees the benchmark text.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import platform
import shlex
import statistics
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import numpy as np

from moe_bench import noise, report, simulator
from moe_bench import rounds as rounds_lib
from moe_bench.workload import Monolithic, Workload, drive, make_requests, summarize
from moe_common import model_source
from moe_common.cli_help import HelpFormatter
from moe_common.corpus import add_corpus_arguments

log = logging.getLogger("moe-bench")
MODES = ("off", "reactive", "window", "predictive")
HOST = "127.0.0.1"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-bench", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", default="base-e32-l4", help="checkpoint directory, hub id or preset")
    p.add_argument("--expert-servers", default="2",
                   help="expert servers: N, or N,M,... (the first makes the main table; all validate the simulator)")
    p.add_argument("--corpus", type=Path, default=None,
                   help="text file: paragraphs are documents, see --corpus-format (default: the standard library's "
                        "docstrings)")
    add_corpus_arguments(p)
    p.add_argument("--modes", default=",".join(MODES), help="replication modes to run, comma-separated")
    p.add_argument("--json", type=Path, default=None, help="write every figure as JSON here")
    p.add_argument("--plots", type=Path, default=None, help="write PNG plots into this directory")
    p.add_argument("--markdown", type=Path, default=None, help="write the Markdown report here")
    p.add_argument("--readme", type=Path, default=None, help="replace the README's moe-bench section with the report")
    p.add_argument("--from-json", type=Path, default=None,
                   help="measure nothing: make the report, plots and README section from an earlier --json file")
    g = p.add_argument_group("workload")
    g.add_argument("--batch-size", type=int, default=8, help="prompts per request (one request = one batch)")
    g.add_argument("--prompt-tokens", type=int, default=128, help="tokens per prompt (documents are cut to it)")
    g.add_argument("--new-tokens", type=int, default=8, help="tokens generated per prompt")
    g.add_argument("--clients", type=int, default=2, help="concurrent closed-loop clients")
    g.add_argument("--requests", type=int, default=12, help="measured requests per configuration")
    g.add_argument("--warmup", type=int, default=2, help="requests before measuring, in every round")
    g.add_argument("--rounds", type=int, default=2,
                   help="split the measured requests into rounds run in ABBA order (drift hits all alike)")
    g = p.add_argument_group("replication and forecasts")
    g.add_argument("--predictor-checkpoint", type=Path, default=None,
                   help="trained forecaster; without it one is trained on the first --train-docs documents")
    g.add_argument("--train-docs", type=int, default=200, help="documents for training the forecaster (and not benchmarked)")
    g.add_argument("--replica-memory", default="160MB", help="replica memory per expert server")
    g.add_argument("--replica-sharing", default="auto", choices=["auto", "off"],
                   help="gateway --replica-sharing: auto plans for servers sharing this machine's cores; off plans as "
                        "if each had its own (balances more, moves weights that may not pay here)")
    g.add_argument("--policy", default="whole", choices=["whole", "split", "auto"],
                   help="dispatch policy (gateway --replica-policy): whole is bit-identical; split and auto balance more")
    g.add_argument("--window", type=int, default=4, help="batches per plan in window mode")
    g = p.add_argument_group("serving path (reported with the results)")
    g.add_argument("--device", default="cpu",
                   help="cpu, cuda or cuda:N: the single-process model, the gateway and the expert servers all run there")
    g.add_argument("--expert-kernel", default="exact", choices=["exact", "grouped"],
                   help="expert servers' FFN kernel (grouped is faster and not bit-exact)")
    g.add_argument("--wire-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="hidden states between gateway and expert servers (only float32 is exact)")
    g.add_argument("--transport", default="auto", choices=["auto", "shm", "grpc"],
                   help="gRPC bytes or same-host shared memory for hidden states (gateway --transport)")
    g.add_argument("--scheduler", default="continuous", choices=["continuous", "static"],
                   help="gateway --scheduler of the closed-loop runs (the open loop compares --schedulers)")
    g = p.add_argument_group("simulator")
    g.add_argument("--simulate-servers", default="8,16,64", help="server counts to project (empty: none)")
    g.add_argument("--gpu-costs", type=Path, default=None,
                   help="JSON of expert costs measured on a GPU (benchmarks/gpu_costs.py) for the projection")
    g.add_argument("--gateway-costs", type=Path, default=None,
                   help="JSON of the single-process model's GPU timings (benchmarks/hf_anchors.py): with --gpu-costs, "
                        "also project end-to-end on that GPU (moe_bench/projection.py)")
    g.add_argument("--layer-overhead-ms", type=float, default=0.0,
                   help="transport time per sparse-layer call in the GPU projection (0: an ideal data plane)")
    g.add_argument("--simulate-only", action="store_true",
                   help="serve nothing: record the routing with the single-process model and print the GPU projection "
                        "(needs --gpu-costs and --gateway-costs)")
    g.add_argument("--no-one-server", action="store_true", help="skip the one-expert-server run")
    g = p.add_argument_group("open loop (moe_bench/open_loop.py): with --arrival-rate, compare the gateway's "
                             "schedulers instead of the closed-loop run; --batch-size is the gateway's --max-batch-size")
    g.add_argument("--arrival-rate", type=float, default=None, help="requests per second, Poisson arrivals")
    g.add_argument("--new-tokens-range", default="4,64", help="A,B: new tokens per request, uniform in A..B")
    g.add_argument("--open-loop-requests", type=int, default=40, help="requests sent in the open loop")
    g.add_argument("--schedulers", default="static,continuous",
                   help="gateway --scheduler values (continuous/N: with --admission-wait-steps N); the first is the baseline")
    g.add_argument("--unloaded-requests", type=int, default=3, help="requests sent one at a time for the unloaded latency")
    g.add_argument("--seed", type=int, default=0, help="seed of the arrival times and lengths")
    g.add_argument("--no-reference", action="store_true", help="skip checking outputs against HF alone")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR,
                   help="where presets are built and hub checkpoints are kept")
    p.add_argument("--work-dir", type=Path, default=None, help="traces and the trained forecaster (default: a temp dir)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR")
    return p


def machine() -> dict:
    import psutil
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    cores = os.cpu_count() or 1
    mem = psutil.virtual_memory().total / 2**30
    return dict(cores=cores, memory_gib=round(mem, 1), gpu=gpu, python=platform.python_version(), torch=torch.__version__,
                description=f"{platform.machine()} Linux, {cores} cores, {mem:.0f} GiB, {gpu}, torch {torch.__version__}")


def documents(a) -> list[str]:
    from moe_common.corpus import read_documents, stdlib_documents

    if a.corpus is None:
        return stdlib_documents()
    return read_documents(a.corpus, a.corpus_format, a.corpus_doc_chars)


def _servers(n: int) -> str:
    return f"{n} expert server{'s' if n != 1 else ''}"


def train_forecaster(a, source, docs: list[str], work: Path) -> Path:
    """Record routing on the training documents and train the forecaster on it."""
    from moe_common.traces import load_manifest, read_passes
    from predictor_service import forecaster
    from predictor_service.collect import collect

    traces = work / "train-traces"
    t0 = time.monotonic()
    log.info("no --predictor-checkpoint: recording routing on documents 0..%d and training the forecaster", len(docs) - 1)
    collect(source.spec, docs, traces, batch_size=a.batch_size, max_length=a.prompt_tokens, new_tokens=a.new_tokens,
            cache_dir=a.cache_dir)
    from moe_common.checkpoint import Checkpoint

    init = Checkpoint(source.path).read(["shared.weight"])["shared.weight"]  # as `moe-predictor train --model` does
    info = load_manifest(traces)
    model, rep = forecaster.train(info, list(read_passes(traces)), info.vocab_size, init_embeddings=init)
    path = work / "forecaster.pt"
    forecaster.save(path, model, info, rep)
    log.info("forecaster ready in %.0f s: routing recorded on %d documents, then %.0f s of training",
             time.monotonic() - t0, len(docs), rep["train_seconds"])
    return path


# ---------------------------------------------------------------------------
# one gateway configuration
# ---------------------------------------------------------------------------

def _status(stub):
    from moe_protos.moe.gateway.v1 import gateway_pb2

    return stub.GetStatus(gateway_pb2.GetStatusRequest(), timeout=30)


def _sampler(stub, stop: threading.Event, every_s: float = 0.5) -> tuple[list, threading.Thread]:
    """Poll per-server token counts until stop: ([(t, tokens per server so far)], the polling thread)."""
    samples: list = []

    def run():
        t0 = time.perf_counter()
        while True:
            try:
                st = _status(stub)
                samples.append((time.perf_counter() - t0, [s.tokens for s in st.servers]))
            except Exception:  # noqa: BLE001 - a missed sample only thins the plot
                pass
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return samples, thread


def _reference(mono: Monolithic, indexed, mono_runs, w: Workload):
    """(request index, outputs) of the single-process model for every request: from its
    timed rounds, and the warm-up requests served once more."""
    seen = {r.request: r.outputs for recs, _ in mono_runs for r in recs}
    for index, prompts in indexed:
        if index not in seen:
            seen[index] = mono.send(prompts, w.new_tokens)[2]
    return seen.items()


def serve_round(a, source, addresses: list[str], mode: str, predictor: str, warm, measured, w: Workload) -> dict:
    """Serve warm-up then measured (index, prompts) requests through a fresh gateway in
    `mode`; returns the raw figures of the measured part (mode_figures combines rounds)."""
    import grpc

    from gateway.launcher import spawn_gateway, wait_ready
    from moe_common.serving import pick_free_port
    from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    port = pick_free_port()
    args = ["--replication", mode, "--replica-policy", a.policy, "--replication-window", str(a.window),
            "--max-batch-size", str(w.batch_size), "--max-wait-ms", "0", "--predictor-timeout-ms", "500",
            "--log-level", "WARNING", "--device", a.device, "--wire-dtype", a.wire_dtype, "--transport", a.transport,
            "--replica-sharing", a.replica_sharing, "--scheduler", a.scheduler]
    if predictor:
        args += ["--predictor", predictor]
    proc = spawn_gateway(source.path, HOST, port, addresses, args)
    try:
        wait_ready(proc, f"{HOST}:{port}")
        with grpc.insecure_channel(f"{HOST}:{port}") as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)

            def send(prompts):
                reply = stub.Generate(gateway_pb2.GenerateRequest(
                    token_ids=[gateway_pb2.TokenIds(ids=p) for p in prompts],
                    parameters=gateway_pb2.GenerationParameters(max_new_tokens=w.new_tokens)), timeout=900)
                t = reply.timings
                return (t.first_token_ns / 1e9, (t.total_ns - t.queue_ns - t.first_token_ns) / 1e9,
                        [list(g.token_ids) for g in reply.generations])

            drive(send, warm, w.clients)
            before = _status(stub)
            stop = threading.Event()
            samples, sampler = _sampler(stub, stop)
            records, wall = drive(send, measured, w.clients)
            stop.set()
            sampler.join()
            after = _status(stub)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    p0, p1 = before.expert_path, after.expert_path
    fields = ("forward_ns", "rpc_wall_ns", "compute_max_ns", "compute_mean_ns", "layer_calls", "rpcs",
              "load_mean_sum", "load_max_sum")
    return dict(
        records=records, wall=wall, **{f: getattr(p1, f) - getattr(p0, f) for f in fields},
        compute=[s1.compute_ns - s0.compute_ns for s0, s1 in zip(before.servers, after.servers)],
        bytes_moved=after.replication.bytes_moved - before.replication.bytes_moved,
        prefetch_hit_rate=after.replication.prefetch_hit_rate, replicas_ready=after.replication.replicas_ready,
        prefetch_hit_rate_by_layer=list(after.replication.prefetch_hit_rate_by_layer),
        lookahead_plans=after.replication.lookahead_plans - before.replication.lookahead_plans,
        request_path_ms=after.replication.request_path_ms - before.replication.request_path_ms,
        rates=[(t1, [(b - a_) / (t1 - t0) for a_, b in zip(c0, c1)])
               for (t0, c0), (t1, c1) in zip(samples, samples[1:]) if t1 > t0],
    )


def mode_figures(rounds: list[dict], reference: dict) -> dict:
    """One table row from the rounds of one (servers, mode): sums over rounds."""
    records = [r for rnd in rounds for r in rnd["records"]]
    wall = sum(rnd["wall"] for rnd in rounds)

    def total(field):
        return sum(rnd[field] for rnd in rounds)

    forward = total("forward_ns") / 1e9 or 1e-9
    rpc_wall, cmax, cmean = total("rpc_wall_ns") / 1e9, total("compute_max_ns") / 1e9, total("compute_mean_ns") / 1e9
    compute = [sum(c) / 1e9 for c in zip(*(rnd["compute"] for rnd in rounds))]
    out = summarize(records, wall)
    out.update(
        balancedness=total("load_mean_sum") / total("load_max_sum") if total("load_max_sum") else 1.0,
        busy_share=[c / wall for c in compute],
        time_split=dict(gateway_compute=(forward - rpc_wall) / forward, expert_compute=cmean / forward,
                        waiting_on_slowest_server=(cmax - cmean) / forward,
                        transport_and_serialization=(rpc_wall - cmax) / forward),
        seconds=dict(forward=forward, rpc_wall=rpc_wall, compute_max=cmax, compute_mean=cmean),
        layer_calls=total("layer_calls"), rpcs=total("rpcs"), rounds=len(rounds),
        weights_moved_bytes=total("bytes_moved"),
        prefetch_hit_rate=float(np.mean([rnd["prefetch_hit_rate"] for rnd in rounds])),
        prefetch_hit_rate_by_layer=[float(x) for x in np.mean([rnd["prefetch_hit_rate_by_layer"] for rnd in rounds], axis=0)]
        if rounds[0].get("prefetch_hit_rate_by_layer") else [],
        lookahead_plans=total("lookahead_plans"),
        replication_request_path_ms_per_request=total("request_path_ms") / max(1, len(records)),
        replicas_ready=rounds[-1]["replicas_ready"],
        identical_to_reference=all(r.outputs == reference[r.request] for r in records),
        # Rows (prompts) whose generated tokens equal the single-process model's: the
        # agreement figure of modes that round differently (grouped kernel, bf16 wire).
        rows_identical=sum(a == b for r in records for a, b in zip(r.outputs, reference[r.request])),
        rows=sum(len(r.outputs) for r in records),
        load_over_time=rounds[0]["rates"],
    )
    return out


def run_monolithic(mono: Monolithic, warm, measured, w: Workload):
    """One round of the single-process model: (records of the measured part, their wall time)."""
    def send(prompts):
        return mono.send(prompts, w.new_tokens)

    drive(send, warm, w.clients)
    return drive(send, measured, w.clients)


def record_trace(mono: Monolithic, source, indexed, w: Workload, trace_dir: Path):
    """Replay every request once, untimed, recording the routing into trace_dir (-> TraceInfo).
    A trace left in trace_dir by an earlier run (the same --work-dir) is replaced: TraceWriter
    appends, and the simulator must replay this run's requests only."""
    import shutil

    from moe_common.traces import RoutingRecorder, TraceInfo, TraceWriter

    shutil.rmtree(trace_dir, ignore_errors=True)
    info = TraceInfo.from_config(mono.model.config, source)
    writer = TraceWriter(trace_dir, info)
    recorder = RoutingRecorder(mono.model, info, on_pass=writer.add)
    try:
        for _, prompts in indexed:  # one batch per request, in order: batch ids follow request indices
            mono.send(prompts, w.new_tokens)
    finally:
        recorder.remove()
        writer.close()
    return info


def logit_agreement(a, source, addresses: list[str], mono: Monolithic, prompts: list[list[int]],
                    new_tokens: int) -> dict:
    """Max abs difference between the stack's logits and the single-process model's on one
    teacher-forced forward pass of `prompts` (the decoder fed the reference's own tokens)."""
    import torch

    from gateway.config import GatewayConfig
    from gateway.engine import Engine
    from moe_common.batching import pad_right

    input_ids, mask = (t.to(mono.device) for t in pad_right(prompts, mono.model.config.pad_token_id))
    with torch.inference_mode():
        decoder_ids = mono.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=new_tokens,
                                          do_sample=False)
        want = mono.model(input_ids=input_ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits.cpu()
    engine = Engine(GatewayConfig(model=str(source.path), expert_servers=addresses, device=a.device,
                                  wire_dtype=a.wire_dtype, transport=a.transport))
    try:
        engine.connect()
        got = engine.forward_logits(input_ids.cpu(), mask.cpu(), decoder_ids.cpu())
    finally:
        engine.close()
    diff = (got - want).abs()
    return dict(max_abs_logit_diff=float(diff.max()), logits_equal=bool(torch.equal(got, want)),
                argmax_agreement=float((got.argmax(-1) == want.argmax(-1)).float().mean()))


class ExpertServers:
    """N expert server processes with the machine's cores split between them."""

    def __init__(self, source, count: int, replica_memory: str, args: list[str] = ()):
        from gateway.launcher import spawn_expert_server, wait_ready
        from moe_common.serving import pick_free_port

        self.threads = max(1, (os.cpu_count() or 1) // count)
        self.procs, self.addresses = [], []
        try:
            for _ in range(count):
                port = pick_free_port()
                self.procs.append(spawn_expert_server(source.path, HOST, port, [
                    "--replica-memory", replica_memory, "--threads", str(self.threads), "--log-level", "WARNING",
                    *args]))
                self.addresses.append(f"{HOST}:{port}")
            for proc, address in zip(self.procs, self.addresses):
                wait_ready(proc, address)
        except BaseException:
            self.stop()
            raise

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=60)


# ---------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------

def run(a) -> dict:
    from expert_server.config import parse_bytes
    from gateway.launcher import spawn_predictor, wait_ready
    from moe_common.serving import pick_free_port
    from moe_common.traces import read_passes
    from predictor_service import forecaster as forecaster_lib
    from predictor_service.collect import chunk_documents
    from transformers import AutoTokenizer

    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        raise SystemExit(f"unknown modes {bad}; choose from {MODES}")
    counts = [int(n) for n in a.expert_servers.split(",") if n]
    w = Workload(a.batch_size, a.prompt_tokens, a.new_tokens, a.clients, a.requests, a.warmup)
    source = model_source.resolve(a.model, a.cache_dir)
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="moe-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    docs = documents(a)
    if len(docs) <= a.train_docs:
        raise SystemExit(f"the corpus has {len(docs)} documents; --train-docs {a.train_docs} leaves none to benchmark")
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    requests = make_requests(chunk_documents(tokenizer, docs[a.train_docs:], w.prompt_tokens), w)
    checkpoint = a.predictor_checkpoint or train_forecaster(a, source, docs[:a.train_docs], work)
    forecaster, _, forecaster_report = forecaster_lib.load(checkpoint, source.model_id)

    # Rounds in ABBA order (moe_bench/rounds.py: the single-process model first and last,
    # every server count's modes and the one-server run forward, then backward), each
    # serving an interleaved share of the measured requests, so that the machine's drift
    # over the run hits every configuration alike.
    indexed = list(enumerate(requests))
    warm, measured_requests = indexed[:w.warmup], indexed[w.warmup:]
    rounds = max(1, min(a.rounds, len(measured_requests)))
    share = [measured_requests[r::rounds] for r in range(rounds)]

    mono = Monolithic(source.path, a.device)
    trace_dir = work / "bench-trace"
    info = record_trace(mono, source, indexed, w, trace_dir)  # untimed; also warms the single-process model up
    if a.simulate_only:
        return gpu_projection(a, source, info, trace_dir, forecaster, w, command_result=True)

    steps = rounds_lib.abba_order(rounds_lib.configurations(counts, modes, not a.no_one_server), rounds)
    log.info("%d configurations (the single-process model included) in %d round(s) of %d + %d requests each",
             len(steps) // rounds, rounds, w.warmup, len(share[0]))
    predictor_port = pick_free_port()
    predictor = spawn_predictor(source.path, HOST, predictor_port, checkpoint, ["--log-level", "WARNING"])
    mono_runs: list = []
    raw: dict[int, dict[str, list]] = {}
    result_logits: dict = {}
    threads_of: dict[int, int] = {}
    try:
        wait_ready(predictor, f"{HOST}:{predictor_port}")
        for n, segment in rounds_lib.server_segments(steps):
            if n == 0:
                for _, r in segment:
                    t0 = time.monotonic()
                    mono_runs.append(run_monolithic(mono, warm, share[r], w))
                    log.info("single-process model, round %d/%d: %.0f tokens/s, took %.1f s", r + 1, rounds,
                             summarize(*mono_runs[-1])["tokens_per_s"]["total"], time.monotonic() - t0)
                continue
            t0 = time.monotonic()
            servers = ExpertServers(source, n, a.replica_memory, ["--device", a.device, "--expert-kernel", a.expert_kernel])
            threads_of[n] = servers.threads
            log.info("%s started, took %.1f s", _servers(n), time.monotonic() - t0)
            try:
                if n == counts[0] and not result_logits:
                    result_logits = logit_agreement(a, source, servers.addresses, mono, requests[0], w.new_tokens)
                    log.info("one forward pass against the single-process model: %s", result_logits)
                for mode, r in segment:
                    t0 = time.monotonic()
                    rnd = serve_round(a, source, servers.addresses, mode, f"{HOST}:{predictor_port}", warm, share[r], w)
                    raw.setdefault(n, {}).setdefault(mode, []).append(rnd)
                    log.info("%s, mode %s, round %d/%d: %.0f tokens/s, took %.1f s", _servers(n), mode, r + 1, rounds,
                             summarize(rnd["records"], rnd["wall"])["tokens_per_s"]["total"], time.monotonic() - t0)
            finally:
                servers.stop()
    finally:
        predictor.terminate()
        predictor.wait(timeout=60)
    reference = {i: o for i, o in _reference(mono, indexed, mono_runs, w)}
    del mono
    gc.collect()
    records = [rec for recs, _ in mono_runs for rec in recs]
    monolithic = summarize(records, sum(wall for _, wall in mono_runs))
    measured: dict[int, dict[str, dict]] = {}
    for n, rows in raw.items():
        for mode, rnds in rows.items():
            r = mode_figures(rnds, reference)
            r["vs_monolithic"] = r["tokens_per_s"]["total"] / monolithic["tokens_per_s"]["total"]
            measured.setdefault(n, {})[mode] = r
            log.info("%s, %s: %.0f tokens/s (%.2fx single-process), balancedness %.3f, identical %s", _servers(n), mode,
                     r["tokens_per_s"]["total"], r["vs_monolithic"], r["balancedness"], r["identical_to_reference"])

    # Rounds that disagree beyond the single-process model's own round-to-round spread.
    round_rates = {f"{n}/{mode}": [summarize(rnd["records"], rnd["wall"])["tokens_per_s"]["total"] for rnd in rnds]
                   for n, rows in raw.items() for mode, rnds in rows.items()}
    baseline_rates = [summarize(recs, wall)["tokens_per_s"]["total"] for recs, wall in mono_runs]
    flagged = noise.noisy(round_rates, baseline_rates)
    baseline_spread = noise.spread(baseline_rates)
    for name, sp in flagged.items():
        n, mode = name.split("/")
        log.warning("%s, mode %s: its rounds differ by %.0f%%, more than the single-process model's (%s, this run's "
                    "noise): its figures are uncertain by that much", _servers(int(n)), mode, 100 * sp,
                    f"{100 * baseline_spread:.0f}%" if baseline_spread is not None else "one round")

    result: dict = dict(
        command="moe-bench " + shlex.join(sys.argv[1:]), date=date.today().isoformat(), machine=machine(),
        model=source.spec, num_experts=info.num_experts, num_sparse_layers=info.num_layers,
        expert_servers=counts[0], replica_memory=a.replica_memory, policy=a.policy, rounds=rounds,
        replica_sharing=a.replica_sharing,
        workload=w.__dict__,
        serving=dict(device=a.device, expert_kernel=a.expert_kernel, wire_dtype=a.wire_dtype, transport=a.transport,
                     scheduler=a.scheduler, **result_logits),
        forecaster=f"{checkpoint.name} (validation loss {forecaster_report.get('best_val_loss', float('nan')):.3f})",
        monolithic=monolithic, modes=measured[counts[0]],
        noise=dict(baseline_spread=baseline_spread, round_rates=round_rates, flagged=flagged),
    )
    if 1 in measured and counts[0] != 1:
        result["one_server"] = measured[1]["off"]
    result["measured"] = {str(n): {m: {k: v for k, v in r.items() if k != "load_over_time"} for m, r in rows.items()}
                          for n, rows in measured.items()}

    # 4. Expert compute efficiency, on a routed batch from the trace.
    from expert_server.experts import ExpertStore
    from moe_bench.efficiency import measure

    passes = list(read_passes(trace_dir))
    batches = simulator.batches_of(passes)
    first = next(p for p in batches[w.warmup] if p.kind == 0)
    routed = [int(n) for n in first.loads(info.num_experts)[0] if n > 0]
    store = ExpertStore(source)
    result["efficiency"] = measure(store, routed, threads_of[counts[0]])
    load_times = []
    for e in range(3):
        t0 = time.perf_counter()
        store.load_weights((0, e))
        load_times.append(time.perf_counter() - t0)
    replica_load_s = statistics.median(load_times)
    slots = parse_bytes(a.replica_memory) // store.expert_bytes  # as each expert server counts its slots
    store.close()
    del store
    gc.collect()

    # 5. Simulator: calibrate on mode off at the first server count, validate, project.
    off = measured[counts[0]].get("off")
    if off is not None:
        simulate_results(a, result, info, batches, measured, counts, threads_of, slots, replica_load_s, forecaster,
                         modes, w)
    return result


def _figures(r: dict) -> dict:
    """A measured run's figures for simulator.calibrate."""
    s = r["seconds"]
    return dict(wall_s=r["wall_s"], rpc_wall_s=s["rpc_wall"], compute_max_s=s["compute_max"],
                compute_mean_s=s["compute_mean"], layer_calls=r["layer_calls"], rpcs=r["rpcs"])


def simulate_results(a, result, info, batches, measured, counts, threads_of, slots, replica_load_s, forecaster,
                     modes, w) -> None:
    """Calibrate on mode off at the first server count, validate on every measured run, project."""
    eff = result["efficiency"]
    cores = os.cpu_count() or 1
    n_cal = counts[0]
    off = measured[n_cal]["off"]
    one = measured.get(1, {}).get("off")

    def sim(n, mode, costs, policy=a.policy, parallel=None):
        # Closed-loop clients > 1 keep the next request queued behind the running one.
        return simulator.simulate(info, batches, n, mode, costs, slots=slots, policy=policy, window=a.window,
                                  parallel=parallel, forecaster=forecaster, measured_from=w.warmup,
                                  lookahead=w.clients > 1, plan_sharing=a.replica_sharing == "auto")

    raw = simulator.Costs(eff["group_s"], eff["token_s"], 0.0, 0.0, replica_load_s)
    unscaled = sim(n_cal, "off", raw, parallel=max(1, cores // threads_of[n_cal]))
    costs = simulator.calibrate(_figures(off), eff["group_s"], eff["token_s"], replica_load_s,
                                f"cpu, {eff['threads']} thread(s) per server, calibrated",
                                one=_figures(one) if one else None, simulated_compute_mean_s=unscaled["compute_mean_s"])
    result["calibration"] = dict(servers=n_cal, **costs.to_json())
    tokens = off["input_tokens"] + off["generated_tokens"]
    validation = []
    for n, rows in measured.items():
        for mode, r in rows.items():
            s = sim(n, mode, costs, parallel=max(1, cores // threads_of[n]))
            validation.append(dict(servers=n, mode=mode, measured=r["tokens_per_s"]["total"],
                                   simulated=tokens / s["seconds"], error=tokens / s["seconds"] / r["tokens_per_s"]["total"] - 1,
                                   measured_balancedness=r["balancedness"], simulated_balancedness=s["balancedness"]))
    result["validation"] = validation
    result["routing_skew"] = simulator.skew(info, batches[w.warmup:])
    proj = costs
    if a.gpu_costs:
        gpu = json.loads(a.gpu_costs.read_text())
        proj = simulator.Costs(gpu["group_s"], gpu["token_s"], costs.layer_overhead_s, costs.non_expert_s,
                               gpu.get("replica_load_s", costs.replica_load_s),
                               f"expert costs measured on {gpu.get('device', 'a GPU')} {gpu.get('date', '')}",
                               costs.rpc_overhead_s)
    result["simulation_costs"] = proj.to_json()
    result["simulated_policy"] = a.policy
    result["simulated"], result["simulated_split"] = {}, {}
    for n in [int(x) for x in a.simulate_servers.split(",") if x]:
        row = {}
        for mode in modes:
            s = sim(n, mode, proj)
            row[mode] = dict(tokens_per_s=tokens / s["seconds"], balancedness=s["balancedness"],
                             expert_layer_s=s["expert_layer_s"], encoder_layer_s=s["encoder_layer_s"],
                             prefetch_hit_rate=s["prefetch_hit_rate"], replicas_loaded=s["replicas_loaded"])
        result["simulated"][str(n)] = row
        layers = {}
        for name, mode, policy in (("off", "off", "whole"), ("whole", "predictive", "whole"),
                                   ("split", "predictive", "split")):
            s = sim(n, mode, proj, policy=policy)
            layers[name] = dict(all_s=s["expert_layer_s"], encoder_s=s["encoder_layer_s"], tokens_per_s=tokens / s["seconds"])
        result["simulated_split"][str(n)] = layers
    if a.gpu_costs and a.gateway_costs:
        result["projection"] = gpu_projection(a, None, info, None, forecaster, w, batches=batches, slots=slots)


def gpu_projection(a, source, info, trace_dir, forecaster, w, *, batches=None, slots=None,
                   command_result: bool = False) -> dict:
    """The simulator with the GPU's expert and gateway costs (moe_bench/projection.py) at
    --simulate-servers. command_result: the whole result of a --simulate-only run."""
    from expert_server.config import parse_bytes
    from moe_bench import projection
    from moe_common.traces import read_passes

    if not (a.gpu_costs and a.gateway_costs):
        raise SystemExit("--simulate-only needs --gpu-costs and --gateway-costs")
    expert = projection.expert_costs(a.gpu_costs)
    non_expert, anchor = projection.non_expert_per_batch(a.gateway_costs, w.batch_size, w.prompt_tokens, w.new_tokens)
    if batches is None:
        batches = simulator.batches_of(list(read_passes(trace_dir)))
    if slots is None:
        cfg = json.loads((source.path / "config.json").read_text())
        slots = parse_bytes(a.replica_memory) // (2 * cfg["d_model"] * cfg["d_ff"] * 4)  # fp32 wi + wo, as servers count
    p = projection.project(info, batches, forecaster, [int(x) for x in a.simulate_servers.split(",") if x], slots,
                           expert, non_expert, window=a.window, measured_from=w.warmup, lookahead=w.clients > 1,
                           layer_overhead_s=a.layer_overhead_ms / 1e3, progress=log.info)
    p["gateway_source"] = anchor
    p["routing_skew"] = simulator.skew(info, batches[w.warmup:])
    if not command_result:
        return p
    return dict(kind="projection", command="moe-bench " + shlex.join(sys.argv[1:]), date=date.today().isoformat(),
                machine=machine(), model=(source.spec if source else a.model), num_experts=info.num_experts,
                num_sparse_layers=info.num_layers, workload=w.__dict__, projection=p)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if a.arrival_rate is not None:
        return run_open_loop(a)
    result = json.loads(a.from_json.read_text()) if a.from_json else run(a)
    projection_only = result.get("kind") == "projection"  # --simulate-only
    text = projection_text(a, result) if projection_only else report_text(a, result)
    print(text, flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    if a.markdown:
        a.markdown.write_text(text)
    if projection_only:
        return 0
    if a.readme:
        report.update_readme(a.readme, text)
    # An exact serving path must reproduce the single-process model; one that rounds
    # differently (opt-in) reports its agreement instead of failing.
    sv = result.get("serving", {})
    exact_path = sv.get("expert_kernel", "exact") == "exact" and sv.get("wire_dtype", "float32") == "float32"
    ok = all(r["identical_to_reference"] for rows in result["measured"].values() for r in rows.values())
    return 0 if ok or not exact_path else 1


def report_text(a, result: dict) -> str:
    """The Markdown report of a measured run, with --plots written and linked."""
    plots = {}
    if a.plots:
        files = report.plot(result, a.plots)
        base = a.readme.parent.resolve() if a.readme else Path.cwd()
        plots = {name: os.path.relpath(path.resolve(), base) for name, path in files.items()}
    return report.markdown(result, plots)


def projection_text(a, result: dict) -> str:
    """The Markdown of a --simulate-only run, with --plots written and linked."""
    from moe_bench import projection

    p = result["projection"]
    text = "\n".join([f"GPU projection of {result['model']} ({result['num_experts']} experts x "
                      f"{result['num_sparse_layers']} sparse layers), routing skew {p['routing_skew']:.1f}x; "
                      f"{p['gateway_source']}.", ""] + projection.markdown(p)) + "\n"
    if a.plots:
        path = projection.plot(p, a.plots / "projection.png")
        text += f"\n![projection]({os.path.relpath(path.resolve(), (a.markdown or Path('x')).resolve().parent)})\n"
    return text


def run_open_loop(a) -> int:
    """The open-loop scheduler comparison (moe_bench/open_loop.py): print, and write --json."""
    from moe_bench import open_loop

    source = model_source.resolve(a.model, a.cache_dir)
    result = open_loop.run(a, source, documents(a))
    result["machine"] = machine()
    result["command"] = shlex.join(["moe-bench", *sys.argv[1:]])
    print(open_loop.markdown(result), flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(result, indent=1, default=_jsonable) + "\n")
    same = [f.get("identical_to_reference") for f in result["schedulers"].values()]
    return 0 if all(s is None or s == result["workload"]["requests"] for s in same) else 1


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"not JSON: {type(x)}")


if __name__ == "__main__":
    raise SystemExit(main())
