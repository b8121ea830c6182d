"""Continuous batching (gateway/scheduler.py, gateway/decode_cache.py).

Unit tests on the single-process HF model (no processes): the left-padding argument for
T5's relative position bias, the cache buffers' compaction and moves, and rows joining
and leaving mid-flight decoding exactly as HF's generate() of each request alone. One
integration test runs a real gateway with --scheduler continuous over expert servers.
"""

from __future__ import annotations

import threading
import time
import types

import pytest
import torch

from gateway.batcher import Job
from gateway.decode_cache import RowCaches
from gateway.engine import Sampling
from gateway.scheduler import ContinuousScheduler, RowDecoder, make_stream, pick_tokens
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import DEDICATED, channel, expert_servers, gateway

# Logits of a row decoded in a padded batch against the row alone. Softmax and the
# attention matmul reduce over the padded length, so they round differently; HF's own
# padded batches (the static path) differ from the rows alone by as much (about 2e-5 on
# logits of magnitude 30 with the tiny preset).
LOGIT_TOL = 1e-4

PROMPTS = [
    "Hello",
    "Mixture-of-experts models send every token to one expert.",
    "The gateway runs attention and the routers; expert servers run the expert FFNs. " * 2,
    "Switch!",
    "x",
    "Continuous batching refills the batch at every step.",
]
SAMPLINGS = [
    Sampling(),
    Sampling(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, seed=5),
    Sampling(),
    Sampling(do_sample=True, seed=3),
    Sampling(do_sample=True, temperature=1.3, top_p=0.8, seed=11),
    Sampling(),
]
LIMITS = [20, 15, 9, 18, 24, 6]


def hf_alone(model, prompt: list[int], limit: int, s: Sampling) -> tuple[list[int], torch.Tensor]:
    """HF generate() on this one prompt: (generated ids up to EOS, logits [steps, vocab])."""
    kwargs = dict(do_sample=False)
    if s.do_sample:
        kwargs = dict(do_sample=True, temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        torch.manual_seed(s.seed)
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor([prompt]), max_new_tokens=limit, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=model.config.pad_token_id,
                             eos_token_id=model.config.eos_token_id, **kwargs)
    ids = out.sequences[0, 1:].tolist()
    eos = model.config.eos_token_id
    ids = ids[: ids.index(eos) + 1] if eos in ids else ids
    return ids, torch.stack(out.logits)[: len(ids), 0]


@pytest.fixture(scope="module")
def prompt_ids(reference):
    _, tokenizer = reference
    return [tokenizer(p).input_ids for p in PROMPTS]


# ---- the reasoning beside decode_cache.py, checked ----


@pytest.mark.parametrize("past,pad", [(0, 3), (5, 0), (7, 9), (40, 100), (130, 5)])
def test_left_padding_keeps_the_relative_position_bias(reference, past, pad):
    """A row with `past` cached tokens, left-padded by `pad` columns: the bias HF computes
    for the padded window, cut to the row's own columns, is the bias of the row alone
    (distances are kept, including the log buckets beyond 16 and the clamp at 128)."""
    model, _ = reference
    attn = model.decoder.block[0].layer[0].SelfAttention
    alone = attn.compute_bias(1, past + 1, past_seen_tokens=past)  # [1, H, 1, past + 1]
    window = attn.compute_bias(1, pad + past + 1, past_seen_tokens=pad + past)
    assert torch.equal(window[..., pad:], alone)


def test_masked_padding_gets_zero_attention_weight(reference):
    """Padded columns carry the dtype's minimum: after softmax their weight is exactly 0,
    whatever bias or stale key they have, and the row's own weights equal the row alone's
    up to rounding."""
    torch.manual_seed(0)
    scores = torch.randn(1, 4, 1, 6) * 10
    pad = torch.randn(1, 4, 1, 5) * 1000  # any bias or stale key
    mask = torch.cat([torch.full((5,), torch.finfo(torch.float32).min), torch.zeros(6)])
    padded = torch.softmax(torch.cat([pad, scores], -1) + mask, -1)
    assert torch.equal(padded[..., :5], torch.zeros(1, 4, 1, 5))
    torch.testing.assert_close(padded[..., 5:], torch.softmax(scores, -1), rtol=0, atol=1e-7)


def test_row_caches_keep_each_rows_columns_through_moves_compaction_and_growth():
    """Keys written step by step stay each row's own sequence, left-padded to one end
    column, while rows leave (the last moves into the hole), the window shifts left and
    the buffers grow."""
    caches = RowCaches(num_layers=1, num_heads=1, d_kv=1, dtype=torch.float32, device=torch.device("cpu"),
                       rows=2, width=4, src_width=2)
    history: dict[str, list[float]] = {}
    names: list[str] = []  # by slot

    def add(name: str, src: int) -> None:
        slot = caches.add([torch.full((1, src, 1), float(len(history)))], [torch.zeros(1, src, 1)])
        assert slot == len(names)
        names.append(name)
        history[name] = []

    def step() -> None:
        cache, self_mask, enc_mask, src = caches.step_inputs()
        layer = cache.self_attention_cache.layers[0]
        assert layer.get_seq_length() == self_mask.shape[-1] - 1
        value = torch.tensor([float(len(history[n]) + 100 * (ord(n) - 96)) for n in names]).view(-1, 1, 1, 1)
        keys, _ = layer.update(value, value)
        caches.advance()
        for b, n in enumerate(names):
            history[n].append(value[b].item())
            own = self_mask[b, 0, 0] == 0  # the row's own columns: the right-most ones
            assert own.sum() == len(history[n]) and own[-len(history[n]):].all()
            assert keys[b, 0, own, 0].tolist() == history[n]
            assert src >= caches.src_len[b] and (enc_mask[b, 0, 0] == 0).sum() == caches.src_len[b]

    def remove(name: str) -> None:
        slot = names.index(name)
        moved = caches.remove(slot)
        last = names.pop()
        if moved is not None:
            names[slot] = last

    add("a", 2)
    step(); step(); step()
    add("b", 5)  # the encoder side grows
    step()
    remove("a")  # b moves into slot 0
    step(); step()  # column 4 > width 4: the window shifts to column 0
    assert caches.compactions >= 1
    add("c", 1); add("d", 3)  # rows grow
    for _ in range(6):
        step()
    remove("c")
    step()
    assert caches.grows >= 2 and names == ["b", "d"]
    remove("b"); remove("d")
    assert caches.rows == 0 and caches.end == 0


# ---- exactness: rows join and leave mid-flight ----


def test_rows_joining_and_leaving_mid_flight_equal_hf_alone(reference, prompt_ids):
    """Scripted arrivals on the model-side loop: rows join while others decode, leave at
    their EOS or limit (the last row moves into the hole), slots and buffers are reused;
    every row's tokens equal HF alone, greedy and seeded sampling, logits within LOGIT_TOL."""
    model, _ = reference
    decoder = RowDecoder(model, model.config.pad_token_id, rows=2)  # 2 slots: admission grows them
    arrivals = {0: [0], 2: [1], 5: [2, 3], 6: [4], 11: [5]}
    running: list[int] = []  # prompt index per slot
    tokens = {i: [] for i in range(len(PROMPTS))}
    logits = {i: [] for i in range(len(PROMPTS))}
    gens = {i: make_stream(s, torch.device("cpu")) for i, s in enumerate(SAMPLINGS)}
    last = {}
    eos = model.config.eos_token_id
    joined_mid_flight = 0
    for step in range(200):
        if step in arrivals:
            joined_mid_flight += bool(running)
            for i, slot in zip(arrivals[step], decoder.admit([prompt_ids[i] for i in arrivals[step]])):
                assert slot == len(running)
                running.append(i)
                last[i] = model.config.decoder_start_token_id
        if not running:
            if step > max(arrivals):
                break
            continue
        out = decoder.step([last[i] for i in running])
        picked = pick_tokens(out, [SAMPLINGS[i] for i in running], [gens[i] for i in running])
        leaving = []
        for b, i in enumerate(running):
            tokens[i].append(picked[b])
            logits[i].append(out[b])
            last[i] = picked[b]
            if picked[b] == eos or len(tokens[i]) >= LIMITS[i]:
                leaving.append(b)
        for b in sorted(leaving, reverse=True):
            moved = decoder.remove(b)
            tail = running.pop()
            if moved is not None:
                running[b] = tail
    assert joined_mid_flight >= 3 and not running
    for i, prompt in enumerate(prompt_ids):
        want, want_logits = hf_alone(model, prompt, LIMITS[i], SAMPLINGS[i])
        assert tokens[i] == want, (i, SAMPLINGS[i])
        diff = (torch.stack(logits[i]) - want_logits).abs().max().item()
        assert diff <= LOGIT_TOL, (i, diff)
    assert decoder.step_rows > decoder.steps  # steps did run more than one row


def test_scheduler_serves_concurrent_jobs_exactly(reference, prompt_ids):
    """ContinuousScheduler's own loop (threads, FIFO admission, streaming, retiring) on the
    single-process model: jobs submitted at staggered times, one with several prompts, one
    streamed, one cancelled while waiting and one while running (the tiny model makes no
    EOS within 300 tokens of these prompts); every finished row equals HF alone and every
    row leaves the caches."""
    model, _ = reference
    announced = []  # the prompts of each admission announced to the replica planner (Engine.upcoming)
    engine = types.SimpleNamespace(model=model, pad_token_id=model.config.pad_token_id,
                                   eos_token_id=model.config.eos_token_id, forward_ns=0, upcoming=announced.append)
    scheduler = ContinuousScheduler(engine, max_batch_size=3, max_batch_tokens=64)
    try:
        running = scheduler.submit(Job(prompts=[prompt_ids[2]], max_new_tokens=[300], sampling=Sampling(), stream=True))
        assert running.next_event()[0] == "token"
        scheduler.cancel(running)  # decoding: it leaves the running set at the next step
        jobs = []
        for i in range(len(PROMPTS)):
            jobs.append(scheduler.submit(Job(prompts=[prompt_ids[i]], max_new_tokens=[LIMITS[i]],
                                             sampling=SAMPLINGS[i], stream=i == 2)))
            time.sleep(0.01 * (i % 2))  # some arrive together, some while others decode
        doomed = scheduler.submit(Job(prompts=[prompt_ids[2]], max_new_tokens=[500], sampling=Sampling()))
        scheduler.cancel(doomed)  # still waiting: it leaves the queue
        multi = scheduler.submit(Job(prompts=[prompt_ids[0], prompt_ids[5]], max_new_tokens=[7, 0],
                                     sampling=Sampling()))
        streamed, results = [], []
        for job in jobs:
            if job.stream:
                while (event := job.next_event())[0] == "token":
                    streamed.append(event)
                assert event[0] == "done", event
                results.append((event[1], event[2]))
            else:
                results.append(job.wait())
        multi_results, _ = multi.wait()
        tokens = 1
        while (event := running.next_event())[0] == "token":
            tokens += 1
        assert event[0] == "error" and "cancelled" in str(event[1]) and tokens < 300
        assert scheduler.decoder.caches.rows == 0 and not scheduler._running
    finally:
        scheduler.stop()
    for i, (rows, timings) in enumerate(results):
        want, _ = hf_alone(model, prompt_ids[i], LIMITS[i], SAMPLINGS[i])
        assert rows[0].token_ids == want, i
        assert rows[0].finish_reason == ("eos" if want[-1] == model.config.eos_token_id else "length")
        assert 1 <= timings["batch_size"] <= 3 and timings["total_ns"] >= timings["queue_ns"] >= 0
    assert [e[2] for e in streamed if e[0] == "token"] == results[2][0][0].token_ids
    assert multi_results[0].token_ids == hf_alone(model, prompt_ids[0], 7, Sampling())[0]
    assert multi_results[1].token_ids == [] and multi_results[1].finish_reason == "length"
    assert max(t["batch_size"] for _, t in results) > 1, "some jobs must have shared steps"
    with pytest.raises(Exception, match="cancelled"):
        doomed.wait()
    # Jobs waited behind a full running set: what was to enter next was announced, in
    # arrival order, at most a batch of it, each change once.
    submitted = [prompt_ids[i] for i in range(len(PROMPTS))] + [prompt_ids[2], prompt_ids[0]]

    def in_arrival_order(rows):  # a subsequence of the submissions (cancelled ones leave the queue)
        it = iter(submitted)
        return all(any(row == s for s in it) for row in rows)

    assert announced and all(1 <= len(rows) <= 3 and in_arrival_order(rows) for rows in announced)
    assert all(a != b for a, b in zip(announced, announced[1:]))


# ---- the gateway, end to end ----


def test_gateway_continuous_scheduler_end_to_end(tiny, reference, prompt_ids):
    """A gateway with --scheduler continuous over 2 real expert servers: concurrent
    requests with mixed decoding parameters arrive while others decode; each equals HF
    alone; decode steps send more tokens per layer call than one request alone would."""
    model, tokenizer = reference
    wants = [hf_alone(model, p, n, s)[0] for p, n, s in zip(prompt_ids, LIMITS, SAMPLINGS)]
    with expert_servers(tiny, 2) as (addresses, _), \
            gateway(tiny, addresses, ["--scheduler", "continuous", "--max-batch-size", "4"]) as address, \
            channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        replies: dict[int, object] = {}
        errors = []

        def send(i: int) -> None:
            s = SAMPLINGS[i]
            params = gateway_pb2.GenerationParameters(max_new_tokens=LIMITS[i], do_sample=s.do_sample)
            if s.do_sample:
                params.temperature, params.top_k, params.top_p, params.seed = s.temperature, s.top_k, s.top_p, s.seed
            request = gateway_pb2.GenerateRequest(token_ids=[gateway_pb2.TokenIds(ids=prompt_ids[i])], parameters=params)
            try:
                if i == 3:  # streamed
                    replies[i] = [r for r in stub.GenerateStream(request, timeout=120)]
                else:
                    replies[i] = stub.Generate(request, timeout=120)
            except Exception as exc:  # noqa: BLE001 - reported by the assert below
                errors.append(exc)

        threads = []
        for i in range(len(PROMPTS)):
            threads.append(threading.Thread(target=send, args=(i,)))
            threads[-1].start()
            time.sleep(0.05)
        for t in threads:
            t.join()
        assert not errors, errors
        for i, want in enumerate(wants):
            if i == 3:
                got = [r.token_id for r in replies[i] if not r.HasField("timings")]
            else:
                got = list(replies[i].generations[0].token_ids)
            assert got == want, (i, SAMPLINGS[i])
        assert max(replies[i].timings.batch_size for i in replies if i != 3) > 1
        path = stub.GetStatus(gateway_pb2.GetStatusRequest()).expert_path
        # Every decode step of every row went through the decoder's sparse layers.
        sparse_decoder = sum(1 for n, _ in model.named_modules() if n.startswith("decoder.") and n.endswith(".mlp.router"))
        assert path.decode_tokens == sparse_decoder * sum(len(w) for w in wants)
        assert path.decode_tokens / path.decode_layer_calls > 1


# ---- moe-bench's open loop ----


def test_open_loop_schedule_is_seeded_poisson_with_uniform_lengths():
    from moe_bench.open_loop import arrival_schedule

    prompts = [[1, 2], [3], [4, 5, 6]]
    a = arrival_schedule(prompts, 4000, rate=5.0, new_tokens=(4, 64), seed=7)
    assert a == arrival_schedule(prompts, 4000, rate=5.0, new_tokens=(4, 64), seed=7)
    assert a != arrival_schedule(prompts, 4000, rate=5.0, new_tokens=(4, 64), seed=8)
    gaps = [y.at_s - x.at_s for x, y in zip(a, a[1:])]
    assert a[0].at_s == 0 and min(gaps) >= 0
    assert abs(sum(gaps) / len(gaps) - 1 / 5.0) < 0.01  # mean gap 1/rate (exponential: sd 0.2/sqrt(4000))
    lengths = [x.new_tokens for x in a]
    assert min(lengths) == 4 and max(lengths) == 64 and abs(sum(lengths) / len(lengths) - 34) < 1
    assert [x.prompt for x in a[:4]] == [[1, 2], [3], [4, 5, 6], [1, 2]]
    with pytest.raises(ValueError):
        arrival_schedule(prompts, 3, rate=1.0, new_tokens=(5, 4))


def test_open_loop_scheduler_entries_name_gateway_flags():
    from moe_bench.open_loop import scheduler_flags

    assert scheduler_flags("static") == ["--scheduler", "static"]
    assert scheduler_flags("continuous/0") == ["--scheduler", "continuous", "--admission-wait-steps", "0"]


def test_open_loop_summary_by_hand():
    from moe_bench.open_loop import OpenRecord, summarize

    records = [OpenRecord(sent_s=0.0, first_s=0.5, done_s=1.5, tokens=[1, 2, 3]),  # TPOT 0.5 s
               OpenRecord(sent_s=1.0, first_s=1.2, done_s=3.0, tokens=[4])]  # one token: no TPOT
    s = summarize(records)
    assert s["generated_tokens"] == 4 and s["wall_s"] == 3.0 and s["tokens_per_s"] == 4 / 3
    assert s["ttft_p50_ms"] == pytest.approx(350) and s["tpot_p50_ms"] == pytest.approx(500)
    assert s["p50_ms"] == pytest.approx(1750) and s["p99_ms"] == pytest.approx(1500 + 0.99 * 500)


def test_scheduler_flags_are_validated():
    from gateway.config import GatewayConfig
    from gateway.server import parse_args

    config = parse_args(["--model", "tiny", "--expert-servers", "127.0.0.1:1", "--scheduler", "static",
                         "--max-batch-tokens", "512"])
    assert config.scheduler == "static" and config.max_batch_tokens == 512
    assert parse_args(["--model", "tiny", "--expert-servers", "127.0.0.1:1"]).scheduler == "continuous"
    assert GatewayConfig(model="tiny", expert_servers=["127.0.0.1:1"]).scheduler == "continuous"
    with pytest.raises(ValueError, match="--scheduler"):
        GatewayConfig(model="tiny", expert_servers=["127.0.0.1:1"], scheduler="dynamic")
    with pytest.raises(ValueError, match="--max-batch-tokens"):
        GatewayConfig(model="tiny", expert_servers=["127.0.0.1:1"], max_batch_tokens=0)
    assert parse_args(["--model", "tiny", "--expert-servers", "127.0.0.1:1"]).admission_wait_steps == 16
    assert parse_args(["--model", "tiny", "--expert-servers", "127.0.0.1:1", "--admission-wait-steps", "0"]
                      ).admission_wait_steps == 0
    with pytest.raises(ValueError, match="--admission-wait-steps"):
        GatewayConfig(model="tiny", expert_servers=["127.0.0.1:1"], admission_wait_steps=-1)


# ---- admission policy and a request's shared random stream ----


@pytest.mark.parametrize("running,free,waiting,ready,bound,want", [
    (0, 8, 0, 0, 4, False),  # nobody waits
    (0, 8, 1, 0, 4, True),  # nothing decodes: an encoder pass interrupts nobody
    (3, 5, 1, 0, 4, False),  # one arrival, slots to spare: wait for company...
    (3, 5, 3, 3, 4, False),
    (3, 5, 1, 4, 4, True),  # ...but not beyond the bound
    (3, 5, 4, 0, 4, True),  # half a batch fits now: run its pass
    (7, 1, 9, 0, 4, False),  # one slot free, many waiting: wait for more slots to free...
    (6, 2, 9, 3, 4, False),
    (5, 3, 9, 4, 4, True),  # ...up to the bound
    (4, 4, 9, 0, 4, True),
    (8, 0, 3, 99, 4, False),  # no free slot: it waits for a row to retire
    (9, -1, 1, 99, 4, False),  # a wide request runs over max_batch_size
    (3, 5, 1, 0, 0, True),  # bound 0: admit at every step
])
def test_admission_due_by_hand(running, free, waiting, ready, bound, want):
    from gateway.scheduler import admission_due

    assert admission_due(running, free, waiting, ready, bound, max_batch_size=8) is want


def hf_request(model, prompts: list[list[int]], limits: list[int], s: Sampling) -> list[list[int]]:
    """HF generate() on the request as one batch (right-padded, as the static path runs a
    seeded request), each row cut at its limit and EOS."""
    from moe_common.batching import pad_right

    ids, mask = pad_right(prompts, model.config.pad_token_id)
    torch.manual_seed(s.seed)
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max(limits), do_sample=True,
                             temperature=s.temperature, top_k=s.top_k, top_p=s.top_p,
                             pad_token_id=model.config.pad_token_id, eos_token_id=model.config.eos_token_id)
    eos, rows = model.config.eos_token_id, []
    for row, limit in zip(out[:, 1:].tolist(), limits):
        row = row[:limit]
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def test_seeded_multi_prompt_requests_equal_hf_on_the_request(reference, prompt_ids):
    """A seeded request with several prompts is one HF batch sharing one random stream (the
    static path runs it so). Under the continuous scheduler its rows enter together and
    draw from one stream of the request's width, finished rows' places included, while
    other requests join and leave: each row equals HF's generate() of that request. One
    request is wider than max_batch_size and enters alone; arrivals wait at most 2 steps."""
    model, _ = reference
    engine = types.SimpleNamespace(model=model, pad_token_id=model.config.pad_token_id,
                                   eos_token_id=model.config.eos_token_id, forward_ns=0, upcoming=lambda rows: None)
    scheduler = ContinuousScheduler(engine, max_batch_size=4, max_batch_tokens=64, admission_wait_steps=2)
    s1 = Sampling(do_sample=True, temperature=0.8, top_k=30, top_p=0.95, seed=17)
    s2 = Sampling(do_sample=True, seed=4)
    multi = ([prompt_ids[1], prompt_ids[3], prompt_ids[4], prompt_ids[2]], [12, 5, 0, 9], s1)
    wide = ([prompt_ids[i] for i in range(6)], [3, 8, 6, 1, 7, 4], s2)  # 6 rows > max_batch_size 4
    try:
        first = scheduler.submit(Job(prompts=[prompt_ids[5]], max_new_tokens=[10], sampling=Sampling(), stream=True))
        assert first.next_event()[0] == "token"  # decoding: the next requests join mid-flight
        jobs = [scheduler.submit(Job(prompts=p, max_new_tokens=n, sampling=s)) for p, n, s in (multi, wide)]
        alone = scheduler.submit(Job(prompts=[prompt_ids[0]], max_new_tokens=[11], sampling=SAMPLINGS[1]))
        got = [[r.token_ids for r in job.wait()[0]] for job in jobs]
        alone_rows, alone_timings = alone.wait()
        first.wait()
        assert scheduler.decoder.caches.rows == 0
    finally:
        scheduler.stop()
    for (prompts, limits, s), rows in zip((multi, wide), got):
        assert rows == hf_request(model, prompts, limits, s)
    assert got[0][2] == []  # its limit was 0
    assert alone_rows[0].token_ids == hf_alone(model, prompt_ids[0], 11, SAMPLINGS[1])[0]


def test_continuous_scheduler_under_window_replication_stays_exact(tiny, reference, prompt_ids):
    """--scheduler continuous with --replication window: each admission's encoder pass is a
    batch for the replica manager, which plans from the passes it observed (decode steps
    included); replicas serve tokens of rows joining and leaving mid-flight, and every
    output still equals HF alone (whole-expert replicas are bit-identical)."""
    model, _ = reference
    wants = [hf_alone(model, p, n, s)[0] for p, n, s in zip(prompt_ids, LIMITS, SAMPLINGS)]
    args = ["--scheduler", "continuous", "--max-batch-size", "4", "--replication", "window",
            "--replication-window", "2", "--admission-wait-steps", "1", *DEDICATED]
    with expert_servers(tiny, 2, ["--replica-memory", "4MB"]) as (addresses, _), \
            gateway(tiny, addresses, args) as address, channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)

        def request(i: int) -> gateway_pb2.GenerateRequest:
            s = SAMPLINGS[i]
            params = gateway_pb2.GenerationParameters(max_new_tokens=LIMITS[i], do_sample=s.do_sample)
            if s.do_sample:
                params.temperature, params.top_k, params.top_p, params.seed = s.temperature, s.top_k, s.top_p, s.seed
            return gateway_pb2.GenerateRequest(token_ids=[gateway_pb2.TokenIds(ids=prompt_ids[i])], parameters=params)

        for i in range(3):  # one at a time: admissions the window plans from
            assert list(stub.Generate(request(i), timeout=120).generations[0].token_ids) == wants[i]
        deadline = time.monotonic() + 60
        while stub.GetStatus(gateway_pb2.GetStatusRequest()).replication.replicas_ready == 0:
            assert time.monotonic() < deadline, "no replica became ready"
            time.sleep(0.05)
        before = stub.GetStatus(gateway_pb2.GetStatusRequest()).replication.replica_tokens
        replies: dict[int, object] = {}
        threads = [threading.Thread(target=lambda i=i: replies.__setitem__(i, stub.Generate(request(i), timeout=120)))
                   for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
            time.sleep(0.03)
        for t in threads:
            t.join()
        for i, want in enumerate(wants):
            assert list(replies[i].generations[0].token_ids) == want, (i, SAMPLINGS[i])
        assert max(r.timings.batch_size for r in replies.values()) > 1
        rep = stub.GetStatus(gateway_pb2.GetStatusRequest()).replication
        assert rep.mode == "window" and rep.failures == 0 and rep.plans >= 1 and rep.batches >= 4
        assert rep.replica_tokens > before  # replicas computed tokens of the continuous steps
