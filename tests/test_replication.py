"""Replicas on real expert servers: outputs stay those of the single-process model
whatever the plan; faults are reported and avoided; the modes run end to end."""

import random
import time

import grpc
import pytest
import torch

from gateway.config import GatewayConfig
from gateway.engine import Engine, Sampling
from moe_protos.moe.expert.v1 import expert_pb2, expert_pb2_grpc
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from gateway.launcher import spawn_predictor, wait_ready
from moe_common.serving import pick_free_port
from gateway.replication import Sharing
from moe_common.hardware import compute_domain, usable_cpus
from tests.conftest import DEDICATED, channel, expert_servers, gateway, generated_ids, reference_ids, stop
from tests.test_equivalence import PROMPTS

REPLICA_MEMORY = "4MB"  # 64 tiny experts of 64 KiB: room for every expert everywhere


@pytest.fixture(scope="module")
def servers(tiny):
    with expert_servers(tiny, 3, ["--replica-memory", REPLICA_MEMORY]) as (addresses, _):
        yield addresses


def apply_plan(engine: Engine, replicas: set) -> None:
    """Send a plan through the gateway's replica manager and wait until every replica is ready."""
    engine.replicas._apply(engine.clients.view, replicas)
    deadline = time.monotonic() + 60
    want = [{(layer, e) for layer, e, s in replicas if s == server} for server in range(len(engine.clients.addresses))]
    while engine.clients.view.ready != want:
        assert time.monotonic() < deadline, "replicas did not become ready"
        time.sleep(0.05)


def every_replica(engine: Engine) -> set:
    return {(layer, e, s) for layer, row in enumerate(engine.clients.home) for e, home in enumerate(row)
            for s in range(len(engine.clients.addresses)) if s != home}


@pytest.mark.parametrize("policy", ["whole", "split"])
def test_outputs_do_not_depend_on_the_plan(tiny, reference, servers, policy):
    model, tokenizer = reference
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        expected = model.generate(**enc, max_new_tokens=12, do_sample=False)
        want = model(**enc, decoder_input_ids=expected[:, :8]).logits
    engine = Engine(GatewayConfig(model=str(tiny.path), expert_servers=servers, replication="reactive",
                                  replica_sharing="off",
                                  replica_policy=policy))
    try:
        engine.connect()
        rng = random.Random(0)
        plans = [every_replica(engine)] + [set(rng.sample(sorted(every_replica(engine)), 12)) for _ in range(3)]
        for plan in plans:
            apply_plan(engine, plan)
            before = engine.clients.stats.replica_tokens
            got = engine.forward_logits(enc["input_ids"], enc["attention_mask"], expected[:, :8])
            assert engine.clients.stats.replica_tokens > before, "the replicas were not used"
            if policy == "whole":
                assert torch.equal(got, want)  # each expert still runs its whole token set at once
            else:
                assert (got - want).abs().max().item() < 1e-4  # other matmul shapes round differently
            rows = engine.generate_batch(engine.prompt_ids(PROMPTS, []), [12] * len(PROMPTS), Sampling())
            for ids, r in zip(generated_ids(model, expected), rows):
                assert r.token_ids == ids
    finally:
        engine.close()


def test_bad_replica_requests_are_reported_and_the_server_keeps_serving(tiny, servers):
    with channel(servers[0]) as ch:
        stub = expert_pb2_grpc.ExpertServiceStub(ch)
        info = stub.GetInfo(expert_pb2.GetInfoRequest())
        assert info.replica_slots == 4_000_000 // (2 * 64 * 128 * 4)
        stub.AssignExperts(expert_pb2.AssignExpertsRequest(experts=[expert_pb2.ExpertRef(layer=0, expert=0)]))
        ref = expert_pb2.ExpertRef
        reply = stub.SetReplicas(expert_pb2.SetReplicasRequest(replicas=[
            ref(layer=0, expert=1), ref(layer=0, expert=99), ref(layer=7, expert=0), ref(layer=0, expert=0)]))
        reasons = {(f.expert.layer, f.expert.expert): f.reason for f in reply.failed}
        assert "does not exist" in reasons[(0, 99)] and "does not exist" in reasons[(7, 0)]
        assert "home expert" in reasons[(0, 0)]
        assert [(r.layer, r.expert) for r in reply.ready] == [(0, 1)] and reply.bytes_loaded == 2 * 64 * 128 * 4
        # Duplicates count once.
        many = [ref(layer=layer, expert=e) for layer in range(4) for e in range(1, 8)] * 3
        reply = stub.SetReplicas(expert_pb2.SetReplicasRequest(replicas=many))
        assert len(reply.ready) == 28 and not reply.failed
        few = expert_pb2.SetReplicasRequest(replicas=[ref(layer=0, expert=3)])
        assert [(r.layer, r.expert) for r in stub.SetReplicas(few).ready] == [(0, 3)]  # evicts the rest
        assert stub.GetInfo(expert_pb2.GetInfoRequest()).replicas == [ref(layer=0, expert=3)]
        with pytest.raises(grpc.RpcError) as err:
            stub.SetReplicas(expert_pb2.SetReplicasRequest(model_id="0123456789abcdef"))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_replicas_over_budget_are_refused(tiny):
    # Room for 2 tiny experts (64 KiB each): the third is refused, the first two load.
    with expert_servers(tiny, 1, ["--replica-memory", "140KB"]) as (addresses, _), channel(addresses[0]) as ch:
        stub = expert_pb2_grpc.ExpertServiceStub(ch)
        assert stub.GetInfo(expert_pb2.GetInfoRequest()).replica_slots == 2
        refs = [expert_pb2.ExpertRef(layer=1, expert=e) for e in range(3)]
        reply = stub.SetReplicas(expert_pb2.SetReplicasRequest(replicas=refs))
        assert [(r.layer, r.expert) for r in reply.ready] == [(1, 0), (1, 1)]
        assert [(f.expert.layer, f.expert.expert) for f in reply.failed] == [(1, 2)]
        assert "over the replica memory budget" in reply.failed[0].reason


def test_servers_say_which_hardware_they_share_and_the_planner_is_told(tiny, reference):
    """Expert servers report their compute domain and share in GetInfo; the gateway's
    planner gets a Sharing when they oversubscribe it (two servers that each use every
    core of this host), and still serves HF's outputs."""
    cpus = usable_cpus()
    with expert_servers(tiny, 2, ["--threads", str(cpus), "--replica-memory", REPLICA_MEMORY]) as (full, _), \
            expert_servers(tiny, 1, ["--threads", "1"]) as (one, _):
        infos = []
        for address in full + one:
            with channel(address) as ch:
                infos.append(expert_pb2_grpc.ExpertServiceStub(ch).GetInfo(expert_pb2.GetInfoRequest()))
        assert infos[0].compute_domain == infos[1].compute_domain == infos[2].compute_domain == compute_domain("cpu")
        assert [i.compute_share for i in infos] == pytest.approx([1.0, 1.0, 1 / cpus])
        engine = Engine(GatewayConfig(model=str(tiny.path), expert_servers=full, replication="reactive"))
        try:
            engine.connect()
            assert engine.sharing(full) == Sharing([0, 0], [1.0, 1.0])
            assert engine.sharing(full[:1]) is None  # one server alone oversubscribes nothing
            ids = engine.prompt_ids(PROMPTS, [])
            for _ in range(3):  # plans under the sharing bound; outputs stay HF's
                rows = engine.generate_batch(ids, [6] * len(PROMPTS), Sampling())
                assert [r.token_ids for r in rows] == reference_ids(reference, PROMPTS, 6)
            deadline = time.monotonic() + 30
            while engine.replicas.plans < 2:  # the planner ran (on its worker) for the later batches
                assert time.monotonic() < deadline, "no plan was made"
                time.sleep(0.05)
            # Each server alone keeps the whole host busy: balancing them cannot finish a layer sooner.
            assert engine.clients.view.planned == set()
        finally:
            engine.close()
        # --replica-sharing off: the planner is told nothing, as if each server had cores of its own.
        engine = Engine(GatewayConfig(model=str(tiny.path), expert_servers=full, replication="reactive",
                                      replica_sharing="off"))
        try:
            engine.connect()
            assert engine.replicas.sharing is None
        finally:
            engine.close()


@pytest.fixture(scope="module")
def predictor(tiny):
    port = pick_free_port()
    proc = spawn_predictor(tiny.path, "127.0.0.1", port)  # history method: enough to drive the path
    try:
        wait_ready(proc, f"127.0.0.1:{port}", 120)
        yield f"127.0.0.1:{port}"
    finally:
        stop(proc)


@pytest.mark.parametrize("mode", ["reactive", "window", "predictive"])
def test_modes_end_to_end(tiny, reference, servers, predictor, mode):
    model, tokenizer = reference
    args = [*DEDICATED, "--replication", mode, "--replication-window", "2", "--max-batch-size", "4",
            "--predictor", predictor, "--predictor-timeout-ms", "2000"]
    with gateway(tiny, servers[:2], args) as address, channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for _ in range(5):
            reply = stub.Generate(gateway_pb2.GenerateRequest(
                prompts=PROMPTS[:4], parameters=gateway_pb2.GenerationParameters(max_new_tokens=6)))
            enc = tokenizer(PROMPTS[:4], return_tensors="pt", padding=True)
            with torch.no_grad():
                want = generated_ids(model, model.generate(**enc, max_new_tokens=6, do_sample=False))
            for ids, g in zip(want, reply.generations):
                assert list(g.token_ids) == ids
        rep = stub.GetStatus(gateway_pb2.GetStatusRequest()).replication
        assert rep.mode == mode and rep.batches == 5 and rep.plans >= 2
        assert rep.replicas_planned > 0 and rep.failures == 0
        # The servers (a module fixture) may hold the previous test's replicas: a new gateway
        # adopts those it plans too, without loading them again.
        assert rep.bytes_moved > 0 or rep.replicas_ready > 0
        assert 0 < rep.balancedness <= 1 and len(rep.tokens_per_server) == 2
        if mode == "predictive":
            assert stub.GetStatus(gateway_pb2.GetStatusRequest()).predictor.forecasts_ok > 0


def test_replica_is_streamed_from_its_home_server_when_the_checkpoint_lacks_it(tiny, reference, tmp_path):
    """Server 1 runs from a checkpoint copy holding only its own experts: its replicas of
    server 0's experts can only come from server 0, by FetchExpert."""
    import shutil

    from safetensors.torch import load_file, save_file

    from moe_common.checkpoint import is_expert_key
    from moe_common.model_source import resolve

    partial = tmp_path / "partial"
    shutil.copytree(tiny.path, partial)
    engine_home = [[(e + layer) % 2 for e in range(8)] for layer in range(4)]
    tensors = load_file(partial / "model.safetensors")
    keep = {}
    for name, t in tensors.items():
        if is_expert_key(name):
            layer_name = name.split(".mlp.")[0]  # e.g. encoder.block.1.layer.1
            stack, block = layer_name.split(".")[0], int(layer_name.split(".")[2])
            layer = (0 if stack == "encoder" else 2) + (block - 1) // 2
            expert = int(name.split("expert_")[1].split(".")[0])
            if engine_home[layer][expert] != 1:
                continue  # server 1 cannot read server 0's experts
        keep[name] = t
    save_file(keep, partial / "model.safetensors", metadata={"format": "pt"})
    assert resolve(str(partial)).model_id == tiny.model_id

    model, tokenizer = reference
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = model(**enc, decoder_input_ids=torch.zeros((len(PROMPTS), 3), dtype=torch.long)).logits
    with expert_servers(tiny, 1, ["--replica-memory", REPLICA_MEMORY]) as (first, _), \
            expert_servers(resolve(str(partial)), 1, ["--replica-memory", REPLICA_MEMORY]) as (second, _):
        engine = Engine(GatewayConfig(model=str(tiny.path), expert_servers=first + second, replication="reactive",
                                      replica_sharing="off"))
        try:
            engine.connect()
            assert engine.clients.home == engine_home
            plan = {(layer, e, 1) for layer in range(4) for e in range(8) if engine_home[layer][e] == 0}
            apply_plan(engine, plan)
            assert engine.replicas.bytes_moved == len(plan) * 2 * 64 * 128 * 4 and engine.replicas.failures == 0
            got = engine.forward_logits(enc["input_ids"], enc["attention_mask"], torch.zeros((len(PROMPTS), 3), dtype=torch.long))
            assert torch.equal(got, want)
            assert engine.clients.stats.replica_tokens > 0
        finally:
            engine.close()


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_predictive_plans_the_queued_batch_while_the_previous_one_runs(tiny, reference, servers, predictor, scheduler):
    """Requests queued behind a running batch (static) or a full running set (continuous)
    are forecast and planned before their batch or admission starts (lookahead plans); no
    batch waits for the predictor or the planner."""
    from concurrent.futures import ThreadPoolExecutor

    model, tokenizer = reference
    args = [*DEDICATED, "--replication", "predictive", "--max-batch-size", "4", "--max-wait-ms", "0",
            "--predictor", predictor, "--predictor-timeout-ms", "2000", "--scheduler", scheduler]
    enc = tokenizer(PROMPTS[:4], return_tensors="pt", padding=True)
    with torch.no_grad():
        want = generated_ids(model, model.generate(**enc, max_new_tokens=6, do_sample=False))
    with gateway(tiny, servers[:2], args) as address, channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        request = gateway_pb2.GenerateRequest(prompts=PROMPTS[:4],
                                              parameters=gateway_pb2.GenerationParameters(max_new_tokens=6))
        with ThreadPoolExecutor(6) as pool:  # 6 batches of 4: five wait behind a running one
            replies = list(pool.map(lambda _: stub.Generate(request, timeout=120), range(6)))
        for reply in replies:
            assert [list(g.token_ids) for g in reply.generations] == want
        rep = stub.GetStatus(gateway_pb2.GetStatusRequest()).replication
        # Continuous: each admission is a batch; 24 rows in at most 4 at a time.
        assert rep.batches == 6 if scheduler == "static" else rep.batches >= 6
        assert rep.lookahead_plans >= 1 and rep.failures == 0
        assert len(rep.prefetch_hit_rate_by_layer) == 4
        assert all(0.0 <= r <= 1.0 for r in rep.prefetch_hit_rate_by_layer)
        # Bookkeeping only: no forecast wait, no planning (about 10 us a batch).
        assert rep.request_path_ms / rep.batches < 5
