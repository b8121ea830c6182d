"""Routing traces, the SRU forecaster, the history baselines and the predictor service."""

import json
import time
import subprocess
import sys

import grpc
import numpy as np
import pytest
import torch

from gateway.launcher import spawn_predictor, start_stack, wait_ready
from moe_common.serving import pick_free_port
from moe_common.traces import DECODER, ENCODER, Pass, TraceInfo, TraceWriter, load_manifest, read_passes
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from moe_protos.moe.predictor.v1 import predictor_pb2 as pb
from moe_protos.moe.predictor.v1 import predictor_pb2_grpc
from predictor_service import forecaster
from predictor_service.evaluate import evaluate
from predictor_service.history import History, hot_recall, load_l1, top_k
from tests.conftest import channel, gateway, stop


def make_info(num_experts=8, enc=(0,), dec=(), vocab=32, model_id="synthetic", capacity=64):
    return TraceInfo(model_id=model_id, model_source="test", vocab_size=vocab, num_experts=num_experts,
                     expert_capacity=capacity, encoder_layers=list(enc), decoder_layers=list(dec),
                     layer_names=[f"layer{i}" for i in range(len(enc) + len(dec))])


def make_pass(batch_id, kind, step, tokens, experts, dropped=None):
    tokens = np.asarray(tokens, dtype=np.int32)
    experts = np.asarray(experts, dtype=np.int16)
    return Pass(batch_id, kind, step, tokens, np.ones_like(tokens, dtype=bool), experts,
                np.zeros_like(experts, dtype=bool) if dropped is None else np.asarray(dropped))


# ---- traces ----

def test_trace_round_trip_across_shards(tmp_path):
    info = make_info(enc=(0, 1), dec=(2,))
    rng = np.random.default_rng(0)
    passes = []
    for b in range(3):
        passes.append(make_pass(b, ENCODER, 0, rng.integers(0, 32, (2, 5)), rng.integers(0, 8, (2, 5, 2)),
                                rng.random((2, 5, 2)) < 0.2))
        for step in range(2):
            passes.append(make_pass(b, DECODER, step, rng.integers(0, 32, (2, 1)), rng.integers(0, 8, (2, 1, 1))))
    writer = TraceWriter(tmp_path, info, passes_per_shard=4)
    for p in passes[:6]:  # batches 0 and 1
        writer.add(p)
    writer.close()
    writer = TraceWriter(tmp_path, info, passes_per_shard=4)  # a second run appends after the shards on disk
    assert writer.batch_offset == 2  # its batch 0 is stored as batch 2, apart from the first run's
    for p in passes[6:]:
        writer.add(Pass(0, p.kind, p.step, p.tokens, p.mask, p.experts, p.dropped))
    writer.close()
    assert sorted(x.name for x in tmp_path.glob("shard-*.npz")) == [f"shard-00000{i}.npz" for i in range(3)]
    assert load_manifest(tmp_path) == info
    back = list(read_passes(tmp_path))
    assert len(back) == len(passes)
    for a, b in zip(passes, back):
        assert (a.batch_id, a.kind, a.step) == (b.batch_id, b.kind, b.step)
        for field in ("tokens", "mask", "experts", "dropped"):
            assert np.array_equal(getattr(a, field), getattr(b, field)), field
    with pytest.raises(ValueError, match="holds traces of model"):
        TraceWriter(tmp_path, make_info(model_id="another"))


def test_loads_exclude_dropped_tokens():
    p = make_pass(0, ENCODER, 0, [[1, 2, 3]], [[[0], [0], [2]]], dropped=[[[False], [True], [False]]])
    assert p.loads(4).tolist() == [[1, 0, 1, 0]]


# ---- history baselines and metrics, against hand-computed values ----

def test_metrics_exact():
    assert load_l1(np.array([1, 0, 0, 0]), np.array([0, 2, 0, 0])) == 2.0
    assert load_l1(np.array([3, 1]), np.array([1, 1])) == pytest.approx(0.5)
    assert top_k(np.array([1, 3, 3, 0]), 2).tolist() == [1, 2]
    assert hot_recall(np.array([5, 0, 0, 0, 0, 0, 0, 0, 1]), np.array([0, 0, 0, 0, 0, 0, 0, 0, 9])) == 0.0
    # 16 experts, k = 2, one token: only expert 5 is hot, whatever the forecast ranks second.
    assert hot_recall(np.eye(16)[5] + np.eye(16)[9] * 0.5, np.eye(16)[5]) == 1.0
    assert hot_recall(np.ones(16), np.zeros(16)) is None


def test_baselines_on_a_hand_made_trace():
    # One encoder layer of 8 experts (hot k = 1); three passes of 4 tokens:
    # all to expert 0, all to expert 1, then half and half.
    info = make_info(num_experts=8)
    passes = [make_pass(i, ENCODER, 0, [[1, 2, 3, 4]], [[[e] for e in experts]])
              for i, experts in enumerate([[0, 0, 0, 0], [1, 1, 1, 1], [0, 0, 1, 1]])]
    report = evaluate(info, passes, window=16, alpha=0.3)["methods"]
    # Forecasts: pass 0 uniform for all (L1 = 7/8 + 7 * 1/8 = 1.75, top-1 = expert 0).
    # last:   pass 1 [1,0..] vs [0,1..] -> 2;   pass 2 [0,1..] vs [.5,.5..] -> 1
    # window: pass 1 [1,0..] -> 2;               pass 2 [.5,.5..] -> 0
    # ema .3: pass 1 [1,0..] -> 2;               pass 2 [.7,.3..] -> .4
    assert report["last"]["load_l1"] == pytest.approx((1.75 + 2 + 1) / 3)
    assert report["window"]["load_l1"] == pytest.approx((1.75 + 2 + 0) / 3)
    assert report["ema"]["load_l1"] == pytest.approx((1.75 + 2 + 0.4) / 3)
    # hot recall, k = 1: truly hot are {0}, {1}, then {0, 1} (a tie); forecasts' top-1
    # (ties to the lower index): last 0, 0, 1; window 0, 0, 0; ema 0, 0, 0.
    assert report["last"]["hot_recall"] == pytest.approx(2 / 3)
    assert report["window"]["hot_recall"] == pytest.approx(2 / 3)
    assert report["ema"]["hot_recall"] == pytest.approx(2 / 3)
    assert report["window"]["encoder"]["layer_passes"] == 3 and report["window"]["decoder"]["load_l1"] is None


def test_history_window_forgets():
    h = History(num_layers=1, num_experts=2, window=2)
    for load in ([4, 0], [0, 4], [0, 4]):
        h.update(0, np.array(load))
    assert h.forecast("window", 0).tolist() == [0.0, 1.0]
    assert h.forecast("last", 0).tolist() == [0.0, 1.0]


# ---- the SRU forecaster ----

def test_sru_learns_a_synthetic_routing_rule(tmp_path):
    # expert = f(token id), different per layer; the decoder layer routes by the previous token.
    info = make_info(num_experts=4, enc=(0, 1), dec=(2,), vocab=16)
    rng = np.random.default_rng(0)
    passes = []
    for b in range(48):
        tokens = rng.integers(0, 16, (8, 12))
        passes.append(make_pass(b, ENCODER, 0, tokens, np.stack([tokens % 4, (tokens // 4) % 4], -1)))
        dec = rng.integers(0, 16, (8, 6))
        for step in range(6):
            prev = dec[:, step - 1] if step else np.zeros(8, dtype=int)
            passes.append(make_pass(b, DECODER, step, dec[:, step:step + 1], (prev % 4)[:, None, None]))
    model, report = forecaster.train(info, passes, 16, seed=0, epochs=40, patience=5, lr=1e-2, hidden=32,
                                     embed_dim=16, progress=False)
    result = evaluate(info, passes[-14:], model)
    agreement = result["methods"]["sru"]["top1_agreement"]
    assert min(agreement.values()) > 0.95, agreement
    assert result["methods"]["sru"]["encoder"]["load_l1"] < result["methods"]["last"]["encoder"]["load_l1"]

    path = tmp_path / "f.pt"
    forecaster.save(path, model, info, report)
    again, info2, _ = forecaster.load(path, expect_model_id="synthetic")
    assert info2 == info
    tokens = torch.from_numpy(passes[0].tokens).long()
    assert torch.equal(again.forecast(ENCODER, tokens), model.forecast(ENCODER, tokens))
    assert model.forecast(ENCODER, tokens).sum().item() == pytest.approx(2 * tokens.numel(), rel=1e-5)
    with pytest.raises(ValueError, match="trained for model synthetic"):
        forecaster.load(path, expect_model_id="0123456789abcdef")


# ---- collection, training and evaluation through the CLI ----

@pytest.fixture(scope="module")
def tiny_checkpoint(tiny, tmp_path_factory):
    """Traces of the tiny model on Python's docstrings, and an SRU trained briefly on them."""
    from moe_common.corpus import stdlib_documents

    d = tmp_path_factory.mktemp("predictor")
    (d / "text.txt").write_text("\n\n".join(stdlib_documents()[:120]) + "\n")  # one paragraph per document
    cli = [sys.executable, "-m", "predictor_service"]
    run = dict(capture_output=True, text=True, timeout=600)
    for args in (["collect", "--model", str(tiny.path), "--corpus", str(d / "text.txt"), "--out", str(d / "train"),
                  "--max-docs", "100", "--new-tokens", "4"],
                 ["collect", "--model", str(tiny.path), "--corpus", str(d / "text.txt"), "--out", str(d / "held"),
                  "--skip-docs", "100", "--new-tokens", "4"],
                 ["train", "--traces", str(d / "train"), "--out", str(d / "f.pt"), "--epochs", "2"]):
        done = subprocess.run([*cli, *args], **run)
        assert done.returncode == 0, done.stderr[-2000:]
    assert "epoch 1/2" in done.stderr  # the progress bar
    return d


def test_cli_collect_train_eval(tiny_checkpoint, tiny):
    d = tiny_checkpoint
    assert load_manifest(d / "train").model_id == tiny.model_id
    done = subprocess.run([sys.executable, "-m", "predictor_service", "eval", "--traces", str(d / "held"),
                           "--checkpoint", str(d / "f.pt"), "--json"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert set(report["methods"]) == {"sru", "last", "window", "ema"}
    for m in report["methods"].values():
        assert {"load_l1", "hot_recall", "forecast_ms_p50", "forecast_ms_p99"} <= set(m)
        assert 0 <= m["load_l1"] <= 2 and 0 <= m["hot_recall"] <= 1
    assert len(report["methods"]["sru"]["top1_agreement"]) == 4


def test_cli_eval_text_puts_encoder_figures_first(tiny_checkpoint):
    d = tiny_checkpoint
    run = [sys.executable, "-m", "predictor_service", "eval", "--traces", str(d / "held"), "--checkpoint", str(d / "f.pt")]
    report = json.loads(subprocess.run([*run, "--json"], capture_output=True, text=True, timeout=300).stdout)
    lines = subprocess.run(run, capture_output=True, text=True, timeout=300).stdout.splitlines()
    assert lines[1].split() == ["method", "enc", "l1", "enc", "hot", "dec", "l1", "dec", "hot", "all", "l1", "p50", "ms",
                                "p99", "ms"]
    for line in lines[2:]:
        name, enc_l1, enc_hot, *_ = line.split()
        m = report["methods"][name]["encoder"]
        assert (float(enc_l1), float(enc_hot)) == (round(m["load_l1"], 3), round(m["hot_recall"], 3))


def test_gateway_records_the_same_traces_as_the_model(tiny, three_expert_servers, tmp_path):
    from predictor_service.collect import collect

    prompts = ["Routing traces record every token.", "Short", "A third prompt, somewhat longer than the others."]
    with gateway(tiny, three_expert_servers[:2], ["--record-traces", str(tmp_path / "gw")]) as address, channel(address) as ch:
        gateway_pb2_grpc.GatewayServiceStub(ch).Generate(gateway_pb2.GenerateRequest(
            prompts=prompts, parameters=gateway_pb2.GenerationParameters(max_new_tokens=3)))
    collect(str(tiny.path), prompts, tmp_path / "hf", batch_size=3, new_tokens=3, progress=False)
    got, want = list(read_passes(tmp_path / "gw")), list(read_passes(tmp_path / "hf"))
    assert [p.kind for p in got] == [ENCODER] + [DECODER] * 3
    for a, b in zip(got, want):
        assert np.array_equal(a.tokens, b.tokens) and np.array_equal(a.experts, b.experts)
        assert np.array_equal(a.dropped, b.dropped)


# ---- the service ----

def test_service_forecasts_and_rejects_bad_input(tiny, tiny_checkpoint):
    port = pick_free_port()
    proc = spawn_predictor(tiny.path, "127.0.0.1", port, tiny_checkpoint / "f.pt")
    try:
        wait_ready(proc, f"127.0.0.1:{port}", 300)
        with channel(f"127.0.0.1:{port}") as ch:
            stub = predictor_pb2_grpc.PredictorServiceStub(ch)
            status = stub.GetStatus(pb.GetStatusRequest())
            assert status.method == "sru" and status.has_checkpoint and status.model_id == tiny.model_id
            reply = stub.Forecast(pb.ForecastRequest(model_id=tiny.model_id, kind=pb.PASS_KIND_ENCODER, batch_size=2,
                                                     seq_len=3, token_ids=[5, 6, 7, 8, 9, 1]))
            assert [f.layer for f in reply.layers] == [0, 1]
            assert all(len(f.load) == 8 and len(f.hot_experts) == 1 for f in reply.layers)
            assert sum(reply.layers[0].load) == pytest.approx(6, rel=1e-4)  # capacity 8 is not binding here
            dec = stub.Forecast(pb.ForecastRequest(kind=pb.PASS_KIND_DECODER, batch_size=2, seq_len=2, token_ids=[0, 5, 0, 6]))
            assert [f.layer for f in dec.layers] == [2, 3] and sum(dec.layers[0].load) == pytest.approx(2, rel=1e-4)
            stub.ReportLoads(pb.ReportLoadsRequest(layers=[pb.LayerLoad(layer=0, load=[6, 0, 0, 0, 0, 0, 0, 0])]))
            assert stub.GetStatus(pb.GetStatusRequest()).live_load_l1 > 0

            def rejected(code, words, fn, request):
                with pytest.raises(grpc.RpcError) as err:
                    fn(request)
                assert err.value.code() == code and words in err.value.details(), err.value.details()

            bad = grpc.StatusCode.INVALID_ARGUMENT
            rejected(bad, "!= 5 token ids", stub.Forecast, pb.ForecastRequest(kind=1, batch_size=2, seq_len=3, token_ids=[1] * 5))
            rejected(bad, "token ids must be in [0, 384)", stub.Forecast, pb.ForecastRequest(kind=1, batch_size=1, seq_len=1, token_ids=[999]))
            rejected(bad, "kind must be", stub.Forecast, pb.ForecastRequest(batch_size=1, seq_len=1, token_ids=[1]))
            rejected(bad, "sparse layer 9 does not exist", stub.ReportLoads,
                     pb.ReportLoadsRequest(layers=[pb.LayerLoad(layer=9, load=[0] * 8)]))
            rejected(grpc.StatusCode.FAILED_PRECONDITION, "request is for model", stub.Forecast,
                     pb.ForecastRequest(model_id="0123456789abcdef", kind=1, batch_size=1, seq_len=1, token_ids=[1]))
            assert stub.GetStatus(pb.GetStatusRequest()).forecasts == 2
    finally:
        stop(proc)


def test_history_service_without_checkpoint(tiny):
    port = pick_free_port()
    proc = spawn_predictor(tiny.path, "127.0.0.1", port)
    try:
        wait_ready(proc, f"127.0.0.1:{port}", 120)
        with channel(f"127.0.0.1:{port}") as ch:
            stub = predictor_pb2_grpc.PredictorServiceStub(ch)
            status = stub.GetStatus(pb.GetStatusRequest())
            assert status.method == "window" and not status.has_checkpoint and "no forecaster checkpoint" in status.note
            request = pb.ForecastRequest(kind=pb.PASS_KIND_ENCODER, batch_size=1, seq_len=4, token_ids=[5, 6, 7, 1])
            assert list(stub.Forecast(request).layers[0].load) == [0.5] * 8  # uniform before any history
            stub.ReportLoads(pb.ReportLoadsRequest(layers=[pb.LayerLoad(layer=0, load=[3, 1, 0, 0, 0, 0, 0, 0])]))
            assert list(stub.Forecast(request).layers[0].load) == [3, 1, 0, 0, 0, 0, 0, 0]
    finally:
        stop(proc)


def test_gateway_survives_the_predictor_dying(tiny):
    with start_stack(str(tiny.path), 1) as stack, channel(stack.gateway_address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        request = gateway_pb2.GenerateRequest(prompts=["forecast me"], parameters=gateway_pb2.GenerationParameters(max_new_tokens=4))
        before = stub.Generate(request)
        predictor = stack.processes[1]
        predictor.kill()
        predictor.wait()
        after = stub.Generate(request)
        assert list(after.generations[0].token_ids) == list(before.generations[0].token_ids)
        status = stub.GetStatus(gateway_pb2.GetStatusRequest())
        assert status.predictor.forecasts_failed + status.predictor.forecasts_late > 0


class _UnrulyPredictor(predictor_pb2_grpc.PredictorServiceServicer):
    """A predictor service that misbehaves on purpose: `mode` "slow" answers after the
    gateway's deadline, "malformed" answers at once with loads that cannot be right
    (wrong length, NaN, negative)."""

    def __init__(self):
        self.mode = "slow"

    def Forecast(self, request, context):
        if self.mode == "slow":
            # Until the caller gave up (its deadline, or it cancelled at the pass's end): a
            # handler that slept on would hold a worker and delay the next test phase's calls.
            deadline = time.monotonic() + 0.5
            while context.is_active() and time.monotonic() < deadline:
                time.sleep(0.01)
            return pb.ForecastResponse()
        layers = [pb.LayerForecast(layer=0, load=[1.0, 2.0]),
                  pb.LayerForecast(layer=1, load=[float("nan")] * 8),
                  pb.LayerForecast(layer=2, load=[-1.0] * 8)]
        return pb.ForecastResponse(layers=layers, method="window")

    def ReportLoads(self, request, context):
        return pb.ReportLoadsResponse()

    def GetStatus(self, request, context):
        return pb.GetStatusResponse(method="window")


def test_predictive_replication_rides_out_a_slow_malformed_and_dead_predictor(tiny, reference):
    """Under predictive replication no batch waits for a forecast: a slow predictor's
    forecasts come too late and are counted (late, or failed at their deadline), a
    malformed forecast never reaches the planner, a dead one is an error counted in
    GetStatus. No request fails, every output is exact."""
    import concurrent.futures

    from tests.conftest import expert_servers, reference_ids

    prompts = ["forecast me", "a second prompt, longer than the first one"]
    expected = reference_ids(reference, prompts, 6)
    unruly = _UnrulyPredictor()
    server = grpc.server(concurrent.futures.ThreadPoolExecutor(16))
    predictor_pb2_grpc.add_PredictorServiceServicer_to_server(unruly, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    args = ["--replication", "predictive", "--predictor", f"127.0.0.1:{port}", "--predictor-timeout-ms", "100"]
    try:
        with expert_servers(tiny, 2, ["--replica-memory", "1MB"]) as (addresses, _), \
                gateway(tiny, addresses, args) as address, channel(address) as ch:
            stub = gateway_pb2_grpc.GatewayServiceStub(ch)

            def serve_and_count():
                reply = stub.Generate(gateway_pb2.GenerateRequest(
                    prompts=prompts, parameters=gateway_pb2.GenerationParameters(max_new_tokens=6)), timeout=60)
                assert [list(g.token_ids) for g in reply.generations] == expected
                p = stub.GetStatus(gateway_pb2.GetStatusRequest()).predictor
                return p.forecasts_ok, p.forecasts_late, p.forecasts_failed

            # Slow: each pass ends before its forecast; which count it lands in (late, or
            # failed when its 100 ms deadline passed first) depends on the pass's length.
            ok, late, failed = serve_and_count()
            assert ok == 0 and late + failed >= 2
            unruly.mode = "malformed"
            for _ in range(3):  # a reply that comes after its pass ended counts as late instead
                ok2, late2, failed2 = serve_and_count()
                assert ok2 == 0, "a malformed forecast must never count as ok"
                if failed2 > failed:
                    break
            assert failed2 > failed, "a malformed forecast must count as failed"
            server.stop(0)  # dead
            ok3, late3, failed3 = serve_and_count()
            assert ok3 == 0 and failed3 > failed2
            status = stub.GetStatus(gateway_pb2.GetStatusRequest())
            assert status.healthy and status.replication.mode == "predictive"
    finally:
        server.stop(0)
