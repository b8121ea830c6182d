"""Metrics and request tracing.

Unit tests check the figures the hooks compute against hand-computed values, and the
log formats. The rest runs one real stack (tiny preset, two expert servers with
replica memory, the predictor, reactive replication) with --metrics-port on free
ports and JSON logs, and checks: every metric the issue lists exists with its type
and labels, and moves; request ids come back to clients and appear in the logs of the
gateway, the expert servers and the predictor with the same batch id; the Grafana
dashboard names only metrics that exist; and a real Prometheus server (the Debian
package, which .ci/run installs) scrapes the stack and answers the queries an
operator would ask. Small stacks of their own check the series that need a server to
join, die or hang: join, suspect and evict counts and states, and a request counted
waiting behind a batch held by a frozen expert server, under both schedulers. Waits
are on conditions, never on fixed sleeps.
"""

from __future__ import annotations

import json
import logging
import math
import re
import shutil
import signal
import subprocess
import time
import urllib.parse
import urllib.request
from collections import deque
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway import metrics as gateway_metrics
from gateway.engine import RowResult
from gateway.launcher import start_stack
from moe_common import tracing
from moe_common.metrics import exposition
from moe_common.serving import pick_free_port, pick_free_port_run
from moe_protos.inference import grpc_predict_v2_pb2 as oip
from moe_protos.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from moe_protos.moe.predictor.v1 import predictor_pb2, predictor_pb2_grpc
from tests.conftest import DEDICATED, admin_address, channel, expert_servers, gateway, stop

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana" / "moe-dashboard.json"
HOST = "127.0.0.1"

# The list: name -> (type, labels). Counters by their sample name (..._total).
GATEWAY = {
    "moe_requests_total": ("counter", {"api", "status"}),
    "moe_request_duration_seconds": ("histogram", set()),
    "moe_queue_duration_seconds": ("histogram", set()),
    "moe_time_to_first_token_seconds": ("histogram", set()),
    "moe_time_per_output_token_seconds": ("histogram", set()),
    "moe_prompt_tokens_total": ("counter", set()),
    "moe_generation_tokens_total": ("counter", set()),
    "moe_num_requests_running": ("gauge", set()),
    "moe_num_requests_waiting": ("gauge", set()),
    "moe_batch_size": ("histogram", set()),
    "moe_expert_tokens_total": ("counter", {"layer", "expert"}),
    "moe_server_tokens_total": ("counter", {"server"}),
    "moe_layer_dispatch_seconds": ("histogram", {"layer"}),
    "moe_expert_rpc_seconds": ("histogram", {"server"}),
    "moe_balancedness": ("gauge", set()),
    "moe_replicas": ("gauge", {"state"}),
    "moe_prefetch_hits_total": ("counter", set()),
    "moe_prefetch_misses_total": ("counter", set()),
    "moe_replica_bytes_moved_total": ("counter", set()),
    "moe_forecast_seconds": ("histogram", set()),
    "moe_forecast_error": ("gauge", set()),
    "moe_forecast_failures_total": ("counter", {"reason"}),
    "moe_membership_changes_total": ("counter", {"kind"}),
    "moe_expert_servers": ("gauge", {"state"}),
}
EXPERT_SERVER = {
    "moe_expert_compute_seconds": ("histogram", set()),
    "moe_expert_server_tokens_total": ("counter", {"layer", "expert"}),
    "moe_expert_weight_bytes": ("gauge", {"kind"}),
    "moe_replica_memory_limit_bytes": ("gauge", set()),
    "moe_replica_load_seconds": ("histogram", set()),
}
PREDICTOR = {
    "moe_predictor_forecast_seconds": ("histogram", set()),
    "moe_predictor_requests_total": ("counter", {"method", "status"}),
}
PROCESS = {"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds"}


# ---------------------------------------------------------------------------
# Units: the figures the hooks compute
# ---------------------------------------------------------------------------


def test_windowed_balancedness_covers_only_the_window():
    history = deque()
    # First scrape: since start, 30 mean over 60 max.
    assert gateway_metrics.windowed_balancedness(history, 0.0, 30.0, 60.0, window_s=60) == 0.5
    # 10 s later: +40 mean over +40 max (perfectly even) -> (40) / (40) over the window from t=0.
    assert gateway_metrics.windowed_balancedness(history, 10.0, 70.0, 100.0, window_s=60) == 1.0
    # 100 s later the t=0 snapshot is out: only the dispatches since t=10 count.
    assert gateway_metrics.windowed_balancedness(history, 100.0, 80.0, 120.0, window_s=60) == 10.0 / 20.0
    # Nothing dispatched since: even by definition.
    assert gateway_metrics.windowed_balancedness(history, 200.0, 80.0, 120.0, window_s=60) == 1.0


def sample(registry, name: str, labels: dict | None = None) -> float:
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_request_finished_records_tokens_and_latencies():
    m = gateway_metrics.GatewayMetrics()
    # Two prompts (3 and 2 tokens); rows generated 4 and 2 tokens. 10 ms queued, first
    # token 30 ms after the batch started, reply 100 ms after arrival.
    timings = dict(queue_ns=10_000_000, first_token_ns=30_000_000, total_ns=100_000_000, batch_size=2)
    m.request_finished([[1, 2, 3], [4, 5]], [RowResult([7, 7, 7, 1], "eos"), RowResult([8, 1], "eos")], timings)
    r = m.registry
    assert sample(r, "moe_prompt_tokens_total") == 5
    assert sample(r, "moe_generation_tokens_total") == 6
    assert sample(r, "moe_queue_duration_seconds_sum") == pytest.approx(0.010)
    assert sample(r, "moe_time_to_first_token_seconds_sum") == pytest.approx(0.040)
    # (100 - 40) ms over the 3 tokens after the first of the longest row.
    assert sample(r, "moe_time_per_output_token_seconds_sum") == pytest.approx(0.020)
    # No token at all: no time to first token.
    m.request_finished([[1]], [RowResult([], "length")], dict(queue_ns=0, first_token_ns=0, total_ns=1, batch_size=1))
    assert sample(r, "moe_time_to_first_token_seconds_count") == 1


def test_layer_done_counts_tokens_per_logical_expert():
    import torch

    m = gateway_metrics.GatewayMetrics()
    m.layer_done(1, torch.tensor([0, 3, 1]), 2_000_000)
    m.layer_done(1, torch.tensor([1, 0, 0, 5]), 1_000_000)  # a wider layer grows the table
    m.layer_done(0, torch.tensor([2, 0, 0, 0]), 1_000_000)
    assert m.expert_tokens().tolist() == [[2, 0, 0, 0], [1, 3, 1, 5]]
    text = exposition(m.registry).decode()
    assert 'moe_expert_tokens_total{layer="1",expert="3"} 5\n' in text
    parsed = {(s.labels["layer"], s.labels["expert"]): s.value for f in text_string_to_metric_families(text)
              if f.name == "moe_expert_tokens" for s in f.samples}
    assert parsed == {(str(l), str(e)): n for l, row in enumerate(m.expert_tokens().tolist()) for e, n in enumerate(row)}
    assert sample(m.registry, "moe_layer_dispatch_seconds_count", {"layer": "1"}) == 2
    assert sample(m.registry, "moe_layer_dispatch_seconds_sum", {"layer": "1"}) == pytest.approx(0.003)


def test_forecast_error_is_the_l1_of_normalized_loads():
    m = gateway_metrics.GatewayMetrics()
    forecast = {4: np.array([1.0, 1.0, 0.0, 0.0]), 5: np.array([0.0, 0.0, 0.0, 2.0])}
    loads = np.array([[2.0, 0.0, 0.0, 2.0], [0.0, 0.0, 0.0, 7.0]])  # layers 4 and 5
    m.forecast_checked(forecast, [4, 5], loads)
    # Layer 4: |.5-.5| + |.5-0| + 0 + |0-.5| = 1.0; layer 5: 0. Mean over layers: 0.5.
    assert sample(m.registry, "moe_forecast_error") == pytest.approx(0.5)
    m.forecast_checked({}, [4, 5], loads)  # no forecast (late): not counted
    assert sample(m.registry, "moe_forecast_error") == pytest.approx(0.5)


def record(message: str, request_id: str = "", batch_id: str = "", exc: bool = False) -> logging.LogRecord:
    token = tracing.set_current(request_id, batch_id)
    try:
        r = logging.LogRecord("moe.test", logging.INFO, __file__, 1, message, (), None)
        if exc:
            try:
                raise ValueError("boom")
            except ValueError:
                import sys

                r.exc_info = sys.exc_info()
        tracing.TraceFilter().filter(r)
        return r
    finally:
        tracing.reset_current(token)


def test_json_log_lines_carry_the_request_ids():
    line = tracing.JsonFormatter().format(record("took %d ms" % 5, "req-1,req-2", "17", exc=True))
    assert "\n" not in line  # one object per line, even with a traceback
    out = json.loads(line)
    assert out["message"] == "took 5 ms" and out["level"] == "INFO" and out["logger"] == "moe.test"
    assert out["request_id"] == "req-1,req-2" and out["batch_id"] == "17"
    assert "ValueError: boom" in out["exception"]
    assert "request_id" not in json.loads(tracing.JsonFormatter().format(record("no call")))
    text = tracing.TextFormatter().format(record("hello", "req-1", "3"))
    assert text.endswith("hello [request_id=req-1 batch_id=3]")
    assert tracing.TextFormatter().format(record("hello")).endswith("moe.test: hello")


def test_metrics_port_flags_are_validated():
    from expert_server.config import ExpertServerConfig
    from gateway.config import GatewayConfig
    from gateway.launcher import parse_args as serve_args

    with pytest.raises(ValueError, match="--metrics-port"):
        GatewayConfig(model="tiny", expert_servers=["127.0.0.1:1"], metrics_port=70000)
    with pytest.raises(ValueError, match="--metrics-port"):
        ExpertServerConfig(model="tiny", metrics_port=-1)
    assert GatewayConfig(model="tiny", expert_servers=["127.0.0.1:1"], metrics_port=9400).metrics_port == 9400
    # moe-serve: BASE..BASE+1+servers must be ports.
    assert serve_args(["--model", "tiny", "--expert-servers", "3", "--metrics-port", "9400"]).metrics_port == 9400
    with pytest.raises(SystemExit):
        serve_args(["--model", "tiny", "--expert-servers", "3", "--metrics-port", "65533"])


# ---------------------------------------------------------------------------
# One real stack with metrics on
# ---------------------------------------------------------------------------


def scrape(port: int) -> dict:
    """/metrics of a service -> {family name: family}, counters under their ..._total name."""
    text = urllib.request.urlopen(f"http://{HOST}:{port}/metrics", timeout=10).read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        name = family.name + "_total" if family.type == "counter" else family.name
        out[name] = family
    return out


def value(families: dict, name: str, **labels) -> float:
    """Sum of the samples of `name` (a counter's _total, a gauge, or a histogram's _count) matching labels."""
    family = families[name]
    wanted = {"counter": name, "gauge": name, "histogram": name + "_count"}[family.type]
    return sum(s.value for s in family.samples
               if s.name == wanted and all(s.labels.get(k) == v for k, v in labels.items()))


@pytest.fixture(scope="module")
def stack(tiny, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("logs") / "stack.log"
    base = pick_free_port_run(4)
    with log_path.open("w") as log_file:
        s = start_stack(
            str(tiny.path), 2, metrics_port=base, log_file=log_file,
            gateway_args=["--replication", "reactive", "--log-format", "json", "--max-wait-ms", "20", *DEDICATED],
            expert_args=["--replica-memory", "1MB", "--log-level", "DEBUG", "--log-format", "json"],
            predictor_args=["--log-level", "DEBUG", "--log-format", "json"], timeout_s=300)
    with s:
        channel = grpc.insecure_channel(s.gateway_address)
        s.log_path = log_path
        s.gateway = gateway_pb2_grpc.GatewayServiceStub(channel)
        s.oip = oip_grpc.GRPCInferenceServiceStub(channel)
        yield s
        channel.close()


def generate(stack, prompts, max_new_tokens=6, request_id=None):
    metadata = [(tracing.REQUEST_ID_KEY, request_id)] if request_id else None
    return stack.gateway.Generate.with_call(gateway_pb2.GenerateRequest(
        prompts=prompts, parameters=gateway_pb2.GenerationParameters(max_new_tokens=max_new_tokens)),
        metadata=metadata, timeout=120)


def log_lines(stack) -> list[dict]:
    out = []
    for line in stack.log_path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line of a process not in JSON (progress bars)
    return out


def wait_for(what: str, check, timeout_s: float = 60.0, every_s: float = 0.2):
    """Poll check() until it returns a truthy value; that value."""
    deadline = time.monotonic() + timeout_s
    while True:
        got = check()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(every_s)


def test_request_ids_come_back_and_follow_the_request_across_processes(stack):
    _, call = generate(stack, ["trace this request", "and this one"], request_id="trace-me-123")
    assert dict(call.trailing_metadata())[tracing.REQUEST_ID_KEY] == "trace-me-123"
    _, call = generate(stack, ["no id given"])
    made = dict(call.trailing_metadata())[tracing.REQUEST_ID_KEY]
    assert re.fullmatch(r"[0-9a-f]{32}", made)
    # Streaming: the id comes back in the trailing metadata too.
    responses = stack.gateway.GenerateStream(gateway_pb2.GenerateRequest(prompts=["stream"]),
                                             metadata=[(tracing.REQUEST_ID_KEY, "stream-1")], timeout=120)
    list(responses)
    assert dict(responses.trailing_metadata())[tracing.REQUEST_ID_KEY] == "stream-1"
    # Open Inference Protocol: the request's `id` field, echoed or made.
    request = oip.ModelInferRequest(model_name="switch", id="oip-42")
    request.inputs.add(name="text_input", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"hi")
    assert stack.oip.ModelInfer(request, timeout=120).id == "oip-42"
    request.id = ""
    assert re.fullmatch(r"[0-9a-f]{32}", stack.oip.ModelInfer(request, timeout=120).id)
    # A client id that cannot go into logs and metadata is refused, and the gateway serves on.
    with pytest.raises(grpc.RpcError) as err:
        generate(stack, ["x"], request_id="bad id, with spaces")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    def traced():
        lines = [x for x in log_lines(stack) if "trace-me-123" in x.get("request_id", "").split(",")]
        gateway = [x for x in lines if x["logger"] == "gateway.tracing"]
        calls = [x for x in lines if x["logger"] == "moe_common.tracing"]
        if not gateway:
            return None
        batch = gateway[0]["batch_id"]
        expert = [x for x in calls if x["message"].startswith("RunExperts") and x.get("batch_id") == batch]
        predictor = [x for x in calls if x["message"].startswith("Forecast") and x.get("batch_id") == batch]
        return (gateway, expert, predictor) if expert and predictor else None

    gateway, expert, predictor = wait_for("the request id in the logs of all three services", traced, 30)
    assert "trace-me-123: batch" in gateway[0]["message"]


def test_every_listed_metric_exists_with_its_type_and_labels(stack):
    generate(stack, ["one request so that every labelled family has a sample"])
    ports = stack.metrics_ports
    wanted = [(ports[stack.gateway_address], GATEWAY), (ports[stack.predictor_address], PREDICTOR),
              *[(ports[a], EXPERT_SERVER) for a in stack.expert_addresses]]
    for port, expected in wanted:
        families = scrape(port)
        for name, (kind, labels) in expected.items():
            assert name in families, f"{name} missing on :{port}"
            family = families[name]
            assert family.type == kind, f"{name} is a {family.type}, not a {kind}"
            if family.samples:
                got = set(family.samples[0].labels) - {"le"}
                assert got == labels, f"{name} has labels {got}, not {labels}"
        assert PROCESS <= set(families), f"process metrics missing on :{port}"
        # Only a process that initialised CUDA has GPU memory (tests/test_gpu.py checks that one).
        assert "moe_gpu_memory_bytes" not in families, f"GPU memory on the CPU-only service on :{port}"


def test_metrics_move_with_traffic(stack):
    ports = stack.metrics_ports
    before = scrape(ports[stack.gateway_address])
    for i in range(3):
        generate(stack, [f"prompt {i} " * (i + 1), "another prompt"], max_new_tokens=8)
    # A request the gateway refuses counts under its status code.
    with pytest.raises(grpc.RpcError):
        generate(stack, ["too many new tokens"], max_new_tokens=100_000)
    after = scrape(ports[stack.gateway_address])
    for name in ("moe_generation_tokens_total", "moe_prompt_tokens_total", "moe_request_duration_seconds",
                 "moe_queue_duration_seconds", "moe_time_to_first_token_seconds",
                 "moe_time_per_output_token_seconds", "moe_batch_size", "moe_expert_tokens_total",
                 "moe_server_tokens_total", "moe_layer_dispatch_seconds", "moe_expert_rpc_seconds",
                 "moe_forecast_seconds"):
        assert value(after, name) > value(before, name), name
    assert value(after, "moe_requests_total", api="generate", status="OK") >= 3
    assert value(after, "moe_requests_total", api="generate", status="INVALID_ARGUMENT") >= 1
    assert value(after, "moe_expert_servers", state="serving") == 2
    assert 0 < value(after, "moe_balancedness") <= 1
    assert 0 < value(after, "moe_forecast_error") <= 2
    # Reactive replication with replica memory: replicas are planned and loaded.
    replicated = wait_for("replicas planned and ready", lambda: (
        generate(stack, ["keep the planner busy"]) and
        (f := scrape(ports[stack.gateway_address])) and value(f, "moe_replicas", state="ready") > 0 and f))
    assert value(replicated, "moe_replicas", state="planned") > 0
    assert value(replicated, "moe_replica_bytes_moved_total") > 0
    assert value(replicated, "moe_prefetch_hits_total") + value(replicated, "moe_prefetch_misses_total") > 0
    servers = [scrape(ports[a]) for a in stack.expert_addresses]
    assert sum(value(f, "moe_expert_weight_bytes", kind="replica") for f in servers) > 0
    assert sum(value(f, "moe_replica_load_seconds") for f in servers) > 0
    assert all(value(f, "moe_replica_memory_limit_bytes") == 1_000_000 for f in servers)
    assert all(value(f, "moe_expert_compute_seconds") > 0 for f in servers)
    predictor = scrape(ports[stack.predictor_address])
    assert value(predictor, "moe_predictor_forecast_seconds") > 0
    assert value(predictor, "moe_predictor_requests_total", method="Forecast", status="OK") > 0
    with grpc.insecure_channel(stack.predictor_address) as channel:
        with pytest.raises(grpc.RpcError):
            predictor_pb2_grpc.PredictorServiceStub(channel).Forecast(
                predictor_pb2.ForecastRequest(kind=predictor_pb2.PASS_KIND_ENCODER, batch_size=2, seq_len=2,
                                              token_ids=[1]), timeout=10)
    predictor = scrape(ports[stack.predictor_address])
    assert value(predictor, "moe_predictor_requests_total", method="Forecast", status="INVALID_ARGUMENT") == 1


def test_dashboard_names_only_existing_metrics(stack):
    dashboard = json.loads(DASHBOARD.read_text())
    panels = dashboard["panels"]
    exprs = [t["expr"] for p in panels for t in p.get("targets", [])]
    assert exprs
    known = set()
    for port in stack.metrics_ports.values():
        for name, family in scrape(port).items():
            known |= {s.name for s in family.samples} | {name}
    for expr in exprs:
        for name in re.findall(r"\b((?:moe|process)_[a-z0-9_]+)", expr):
            assert name in known, f"dashboard expression {expr!r} names {name}, which no service exports"
    titles = " | ".join(p["title"].lower() for p in panels)
    for topic in ("request rate", "latency", "time to first token", "tokens/s", "queue", "balancedness",
                  "per-expert load", "per-server load", "replicas", "prefetch hit rate", "forecast error"):
        assert topic in titles, f"no dashboard panel on {topic}"
    assert any(p["type"] == "heatmap" for p in panels)


# ---------------------------------------------------------------------------
# A real Prometheus server
# ---------------------------------------------------------------------------


def query(port: int, expr: str) -> list[dict]:
    url = f"http://{HOST}:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    reply = json.loads(urllib.request.urlopen(url, timeout=10).read())
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


@pytest.fixture
def prometheus(stack, tmp_path):
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("the prometheus binary is not installed (.ci/run installs the Debian package)")
    targets = [f"{HOST}:{p}" for p in stack.metrics_ports.values()]
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "moe", "static_configs": [{"targets": targets}]}],
    }))
    port = pick_free_port(HOST)
    with (tmp_path / "prometheus.log").open("w") as log_file:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address={HOST}:{port}"], stdout=log_file, stderr=subprocess.STDOUT)
    try:
        def ready():
            if proc.poll() is not None:
                raise AssertionError(f"prometheus exited:\n{(tmp_path / 'prometheus.log').read_text()[-3000:]}")
            try:
                return urllib.request.urlopen(f"http://{HOST}:{port}/-/ready", timeout=2).status == 200
            except OSError:
                return False

        wait_for("prometheus ready", ready, 60)
        yield port
    finally:
        stop(proc)


def test_prometheus_scrapes_the_stack(stack, prometheus):
    n = len(stack.metrics_ports)
    wait_for("every target up", lambda: len([r for r in query(prometheus, "up == 1")]) == n, 60)
    # Requests while Prometheus scrapes: the rate is over samples taken between them.
    rate = wait_for("rate(moe_generation_tokens_total[1m]) > 0", lambda: (
        generate(stack, ["scraped while serving"], max_new_tokens=4)
        and query(prometheus, "rate(moe_generation_tokens_total[1m]) > 0")), 60)
    assert float(rate[0]["value"][1]) > 0
    p90 = wait_for("a request duration quantile", lambda: query(
        prometheus, "histogram_quantile(0.9, sum by (le) (rate(moe_request_duration_seconds_bucket[1m])))"), 30)
    seconds = float(p90[0]["value"][1])
    assert math.isfinite(seconds) and 0 < seconds < 120
    # Traffic stops; Prometheus' latest sample must equal what the gateway says it routed,
    # and what the expert servers say they computed.
    routed = stack.gateway.GetStatus(gateway_pb2.GetStatusRequest(), timeout=30).expert_path.tokens
    assert routed > 0

    def totals():
        a = query(prometheus, "sum(moe_expert_tokens_total)")
        b = query(prometheus, "sum(moe_expert_server_tokens_total)")
        return a and b and (float(a[0]["value"][1]), float(b[0]["value"][1]))

    wait_for(f"sum(moe_expert_tokens_total) == {routed}", lambda: (t := totals()) and t[0] == routed, 30)
    wait_for(f"sum(moe_expert_server_tokens_total) == {routed}", lambda: (t := totals()) and t[1] == routed, 30)


def test_membership_changes_are_counted(stack):
    """Last of the stack tests: it takes an expert server out of the stack."""
    before = scrape(stack.metrics_ports[stack.gateway_address])
    with grpc.insecure_channel(stack.admin_address) as channel:  # membership is on the admin port
        gateway_pb2_grpc.MembershipServiceStub(channel).RemoveExpertServer(
            gateway_pb2.RemoveExpertServerRequest(address=stack.expert_addresses[-1]), timeout=120)
    after = scrape(stack.metrics_ports[stack.gateway_address])
    assert value(after, "moe_membership_changes_total", kind="leave") == \
        value(before, "moe_membership_changes_total", kind="leave") + 1
    assert value(after, "moe_expert_servers", state="serving") == 1


def test_forecast_failures_are_counted_when_the_predictor_is_down(stack):
    """After the membership test: stops the predictor (the gateway serves on without forecasts)."""
    predictor = stack.processes[len(stack.expert_addresses)]
    predictor.terminate()
    predictor.wait(timeout=30)
    port = stack.metrics_ports[stack.gateway_address]
    before = value(scrape(port), "moe_forecast_failures_total")
    generate(stack, ["forecasts fail, the request does not"])
    after = scrape(port)
    # "error" when the refused call ends before its pass does, "late" otherwise.
    assert value(after, "moe_forecast_failures_total") > before
    assert value(after, "moe_requests_total", api="generate", status="OK") > 0


# ---------------------------------------------------------------------------
# Membership and queue series, each on a small stack of its own
# ---------------------------------------------------------------------------

PROMPTS = ["the quick brown fox jumps over the lazy dog", "expert servers join, fail and leave"]


def generate_on(stub, prompts=PROMPTS, max_new_tokens=4) -> list[list[int]]:
    reply = stub.Generate(gateway_pb2.GenerateRequest(
        prompts=prompts, parameters=gateway_pb2.GenerationParameters(max_new_tokens=max_new_tokens)), timeout=120)
    return [list(g.token_ids) for g in reply.generations]


def test_join_suspect_and_evict_are_counted(tiny):
    """A server joins through the admin port (join); another is killed: the next layer
    call to it fails and it is suspect, and the health watch evicts it once it has been
    unreachable for --evict-after-s (evict). The suspect is seen before the eviction can
    come: a request after the kill takes about a second, the eviction at least
    EVICT_AFTER_S, and the test checks that it waited that long."""
    evict_after_s = 20.0
    port = pick_free_port(HOST)
    args = ["--metrics-port", str(port), "--evict-after-s", str(evict_after_s), "--membership-interval-s", "0.2"]
    with expert_servers(tiny, 3) as (addresses, procs), gateway(tiny, addresses[:2], args) as gw, \
            channel(gw) as ch, channel(admin_address(gw)) as admin:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        want = generate_on(stub)
        before = scrape(port)
        assert value(before, "moe_expert_servers", state="serving") == 2
        assert value(before, "moe_expert_servers", state="suspect") == 0

        gateway_pb2_grpc.MembershipServiceStub(admin).AddExpertServer(
            gateway_pb2.AddExpertServerRequest(address=addresses[2]), timeout=120)
        joined = scrape(port)
        assert value(joined, "moe_membership_changes_total", kind="join") == \
            value(before, "moe_membership_changes_total", kind="join") + 1
        assert value(joined, "moe_expert_servers", state="serving") == 3
        assert generate_on(stub) == want

        procs[0].kill()
        procs[0].wait()
        killed = time.monotonic()

        def suspected():  # a request whose tokens reach the dead server's experts makes it suspect
            assert generate_on(stub) == want, "a dead server must cost no request"
            families = scrape(port)
            return value(families, "moe_expert_servers", state="suspect") == 1 and families

        suspect = wait_for("the killed server suspect", suspected, timeout_s=evict_after_s / 2)
        assert value(suspect, "moe_expert_servers", state="serving") == 2
        assert value(suspect, "moe_membership_changes_total", kind="evict") == \
            value(before, "moe_membership_changes_total", kind="evict")

        evicted = wait_for("the killed server evicted", lambda: (
            (families := scrape(port)) and value(families, "moe_membership_changes_total", kind="evict") ==
            value(before, "moe_membership_changes_total", kind="evict") + 1 and families),
            timeout_s=evict_after_s + 60, every_s=0.5)
        assert time.monotonic() - killed >= evict_after_s, "evicted before --evict-after-s had passed"
        assert value(evicted, "moe_expert_servers", state="serving") == 2
        assert value(evicted, "moe_expert_servers", state="suspect") == 0  # it left with its suspicion
        assert value(evicted, "moe_membership_changes_total", kind="leave") == \
            value(before, "moe_membership_changes_total", kind="leave")
        assert generate_on(stub) == want


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_a_request_behind_a_running_batch_is_counted_waiting(tiny, scheduler):
    """One prompt per batch (--max-batch-size 1) and the only expert server frozen
    (SIGSTOP) while the first request runs: its layer call cannot return, so it stays
    running and a second request must wait behind it until the server is thawed. The
    gauges must say 1 running and 1 waiting, whatever the timing: the frozen server holds
    the batch (its call's deadline, --expert-timeout-s, is far beyond the test's waits).
    Thawed, both requests finish with the tokens of an unfrozen run and nothing waits."""
    port = pick_free_port(HOST)
    args = ["--metrics-port", str(port), "--scheduler", scheduler, "--max-batch-size", "1", "--max-wait-ms", "0",
            "--expert-timeout-s", "600", "--evict-after-s", "600"]
    with expert_servers(tiny, 1) as (addresses, procs), gateway(tiny, addresses, args) as gw, channel(gw) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        want = generate_on(stub, PROMPTS[:1])

        def gauges() -> tuple[float, float]:
            families = scrape(port)
            return value(families, "moe_num_requests_running"), value(families, "moe_num_requests_waiting")

        assert gauges() == (0, 0)
        pool = futures.ThreadPoolExecutor(2)
        procs[0].send_signal(signal.SIGSTOP)
        try:
            first = pool.submit(generate_on, stub, PROMPTS[:1])
            wait_for("the first request running", lambda: gauges() == (1, 0), timeout_s=60)
            second = pool.submit(generate_on, stub, PROMPTS[:1])
            wait_for("the second request waiting", lambda: gauges() == (1, 1), timeout_s=60)
            assert not first.done() and not second.done()
        finally:
            procs[0].send_signal(signal.SIGCONT)
            pool.shutdown(wait=True)
        assert first.result() == want and second.result() == want
        wait_for("nothing running or waiting", lambda: gauges() == (0, 0), timeout_s=30)
