"""The expert path on CUDA: equal to the CPU and to HF on the same device.

Marked `gpu` and skipped where torch sees no CUDA device, so the default run only
collects them. benchmarks/gpu_check.sh runs them (`pytest -m gpu`) on a GPU machine.

- ExpertStore on CUDA against the CPU store: the same experts within 1e-5 (GPU kernels
  round differently, so not bit for bit).
- Replicas load on the store's own CUDA copy stream: a load finishes while the default
  stream is still busy.
- On CUDA, the `exact` kernel equals HF's SwitchTransformersExperts on CUDA bit for bit
  (same ops and shapes on the same kind of device).
- `--group-executor threads` and `streams` (a call's groups on four CUDA streams) equal
  `sequential` on CUDA bit for bit.
- `--expert-kernel grouped` (bf16 GEMMs on CUDA) agrees with `exact` within a bf16
  tolerance.
- A stack of real processes with `--device cuda` expert servers (gateway on the CPU),
  window replication on: generated tokens equal the single-process HF model's.
- `moe_gpu_memory_bytes` (moe_common/metrics.py) moves by exactly the bytes a tensor
  takes and gives back, in the registry and over /metrics; a `--device cuda` expert
  server's figure holds at least its expert weights.
"""

from __future__ import annotations

import copy
import gc
import inspect
import time

import pytest
import torch

from expert_server.experts import ExpertStore
from moe_common.metrics import MetricsServer, new_registry
from moe_common.serving import pick_free_port
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import channel, expert_servers, gateway, generated_ids
from tests.test_equivalence import PROMPTS
from tests.test_metrics import HOST, scrape, value

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"),
]

# Tokens per expert of one layer call in these tests: uneven, one expert with a single token.
COUNTS = [5, 40, 1, 17, 3, 60, 9, 2]


def store(source, kernel: str = "exact", **kwargs) -> ExpertStore:
    """An ExpertStore running expert kernel `kernel` (moe-expert-server --expert-kernel)."""
    if "kernel" in inspect.signature(ExpertStore).parameters:
        return ExpertStore(source, kernel=kernel, **kwargs)
    if kernel != "exact":
        pytest.skip(f"this ExpertStore has no kernel option: no {kernel!r} kernel to test")
    return ExpertStore(source, **kwargs)  # a store without the option runs exact


def routed_batch(num_experts: int, d_model: int, seed: int) -> tuple[list[tuple[int, int]], torch.Tensor]:
    """(groups [(expert, tokens)], hidden [sum tokens, d_model]) of one layer call."""
    counts = COUNTS[:num_experts]
    g = torch.Generator().manual_seed(seed)
    return list(enumerate(counts)), torch.randn(sum(counts), d_model, generator=g)


def every_expert(s: ExpertStore) -> list[tuple[int, int]]:
    return [(layer, e) for layer in range(len(s.layers)) for e in range(s.num_experts)]


def test_cuda_store_equals_cpu_store(tiny):
    gpu, cpu = store(tiny, device="cuda"), store(tiny)
    try:
        gpu.assign(every_expert(gpu))
        cpu.assign(every_expert(cpu))
        for wi, wo in (gpu.weights_of(k) for k in every_expert(gpu)):
            assert wi.is_cuda and wo.is_cuda
        for layer in range(len(gpu.layers)):
            groups, hidden = routed_batch(gpu.num_experts, gpu.d_model, seed=layer)
            got, want = gpu.run(layer, groups, hidden), cpu.run(layer, groups, hidden)
            assert got.device.type == "cpu" and got.dtype == want.dtype == torch.float32
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    finally:
        gpu.close()
        cpu.close()


def test_replicas_load_on_the_copy_stream(tiny):
    gpu, cpu = store(tiny, device="cuda", replica_memory=4_000_000), store(tiny)
    try:
        gpu.assign([(0, e) for e in range(4)])
        refused, loaded = gpu.set_replicas([(1, 2), (1, 3), (0, 5)])
        assert not refused and loaded == 3 * gpu.expert_bytes
        assert gpu.replicas() == [(0, 5), (1, 2), (1, 3)]
        stream = gpu._copy_stream
        assert stream is not None and stream != torch.cuda.default_stream(gpu.device), \
            "replicas must be copied on a stream of their own"
        for key in gpu.replicas():
            # A copy moves the checkpoint's bits unchanged.
            for got, want in zip(gpu.weights_of(key), cpu.load_weights(key)):
                assert got.is_cuda and torch.equal(got.cpu(), want)
        # Replicas run like home experts.
        cpu.assign([(1, 2), (1, 3)])
        groups, hidden = [(2, 7), (3, 4)], torch.randn(11, gpu.d_model)
        torch.testing.assert_close(gpu.run(1, groups, hidden), cpu.run(1, groups, hidden), rtol=0, atol=1e-5)

        # Overlap: with the default stream busy, a load returns before the default stream is done.
        if not hasattr(torch.cuda, "_sleep"):
            pytest.skip("this torch has no torch.cuda._sleep to keep the default stream busy")
        gpu.load_weights((1, 6))  # warm the pinned-memory cache
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        torch.cuda._sleep(1_000_000_000)  # about 0.5 s of GPU clock cycles on the default stream
        gpu.load_weights((1, 7))
        default_busy = not torch.cuda.default_stream(gpu.device).query()
        load_s = time.perf_counter() - t0
        torch.cuda.synchronize()
        assert default_busy, f"the replica load waited for the default stream ({load_s * 1e3:.0f} ms)"
    finally:
        gpu.close()
        cpu.close()


def hf_experts_on_cuda(model, s: ExpertStore, layer: int):
    """HF's SwitchTransformersExperts module of sparse layer `layer`, copied onto CUDA."""
    sparse = s.layers[layer]
    module = model.get_submodule(f"{sparse.name}.layer.{sparse.ff_sublayer}.mlp.experts")
    return copy.deepcopy(module).to("cuda").eval()


def test_exact_kernel_on_cuda_equals_hf_experts_on_cuda_bit_for_bit(tiny, reference):
    model, _ = reference
    gpu = store(tiny, "exact", device="cuda")
    try:
        gpu.assign(every_expert(gpu))
        for layer in range(len(gpu.layers)):
            experts = hf_experts_on_cuda(model, gpu, layer)
            groups, hidden = routed_batch(gpu.num_experts, gpu.d_model, seed=10 + layer)
            # HF's input: tokens in a shuffled order, each routed to one expert with weight 1.0,
            # so HF's output row is the expert's FFN unchanged (x * 1.0 and 0 + x are exact).
            expert_of = torch.cat([torch.full((n,), e) for e, n in groups])  # [N], grouped order
            perm = torch.randperm(len(expert_of), generator=torch.Generator().manual_seed(layer))
            selected = torch.nn.functional.one_hot(expert_of[perm], gpu.num_experts)[:, None, :]  # [N, 1, E]
            with torch.no_grad():
                hf = experts(hidden[perm].cuda(), selected.cuda(), torch.ones(len(perm), 1, device="cuda")).cpu()
            # HF takes each expert's tokens in ascending row order: group ours the same way.
            order = torch.sort(expert_of[perm], stable=True).indices
            got = gpu.run(layer, groups, hidden[perm][order])
            assert torch.equal(got, hf[order]), (got - hf[order]).abs().max().item()
    finally:
        gpu.close()


def test_exact_group_executors_on_cuda_are_bit_identical(tiny):
    """--group-executor threads and streams run the same ops as sequential, on CUDA too."""
    stores = {ex: store(tiny, "exact", device="cuda", group_executor=ex) for ex in ("sequential", "threads", "streams")}
    try:
        for s in stores.values():
            s.assign(every_expert(s))
        for layer in range(len(stores["sequential"].layers)):
            groups, hidden = routed_batch(stores["sequential"].num_experts, stores["sequential"].d_model, seed=30 + layer)
            want = stores["sequential"].run(layer, groups, hidden)
            for ex in ("threads", "streams"):
                got = stores[ex].run(layer, groups, hidden)
                assert torch.equal(got, want), (ex, (got - want).abs().max().item())
    finally:
        for s in stores.values():
            s.close()


def test_grouped_kernel_agrees_with_exact_on_cuda(tiny):
    exact = store(tiny, "exact", device="cuda")
    grouped = store(tiny, "grouped", device="cuda")  # fp32 store; on CUDA the kernel runs its GEMMs in bf16
    try:
        for s in (exact, grouped):
            s.assign(every_expert(s))
        for layer in range(len(exact.layers)):
            groups, hidden = routed_batch(exact.num_experts, exact.d_model, seed=20 + layer)
            want = exact.run(layer, groups, hidden)
            got = grouped.run(layer, groups, hidden).float()
            # bf16 keeps 8 bits of mantissa (eps 2**-8); the tiny experts in bf16 differ from
            # fp32 by about 1.1 eps of the output's scale (measured on the CPU): allow 8 eps.
            torch.testing.assert_close(got, want, rtol=0, atol=2**-5 * want.abs().max().item())
    finally:
        exact.close()
        grouped.close()


def test_stack_with_cuda_expert_servers_equals_hf(tiny, reference):
    """2 expert servers on the GPU, gateway on the CPU, window replication: every row's
    generated tokens equal HF's on the CPU, and the replicas planned get loaded on the GPU."""
    model, tokenizer = reference
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    with torch.no_grad():
        want = generated_ids(model, model.generate(**enc, max_new_tokens=16, do_sample=False))
    args = ["--device", "cuda", "--replica-memory", "4MB"]
    gateway_args = ["--replication", "window", "--replication-window", "2"]
    with expert_servers(tiny, 2, args) as (servers, _), gateway(tiny, servers, gateway_args) as address, \
            channel(address) as ch:
        stub = gateway_pb2_grpc.GatewayServiceStub(ch)
        for _ in range(5):  # window plans after every 2 batches: later requests run with replicas
            reply = stub.Generate(gateway_pb2.GenerateRequest(
                prompts=PROMPTS, parameters=gateway_pb2.GenerationParameters(max_new_tokens=16)))
            assert [list(g.token_ids) for g in reply.generations] == want
        status = stub.GetStatus(gateway_pb2.GetStatusRequest())
        assert all(s.device.startswith("cuda") for s in status.servers), [s.device for s in status.servers]
        assert all(s.tokens > 0 for s in status.servers), "every server must take part"
        rep = status.replication
        assert rep.mode == "window" and rep.plans >= 1 and rep.replicas_planned > 0 and rep.failures == 0
        deadline = time.monotonic() + 60  # the last plan's replicas may still be loading
        while stub.GetStatus(gateway_pb2.GetStatusRequest()).replication.replicas_ready == 0:
            assert time.monotonic() < deadline, "no planned replica became ready on the GPU servers"
            time.sleep(0.1)


def gpu_memory(families: dict, device: str, kind: str) -> float:
    """moe_gpu_memory_bytes{device, kind} of a scrape; AssertionError if it is missing."""
    assert "moe_gpu_memory_bytes" in families, "no moe_gpu_memory_bytes on a process that uses CUDA"
    samples = [s.value for s in families["moe_gpu_memory_bytes"].samples
               if s.labels == {"device": device, "kind": kind}]
    assert len(samples) == 1, f"want one sample for device={device} kind={kind}: {families['moe_gpu_memory_bytes']}"
    return samples[0]


def test_gpu_memory_metric_follows_the_allocator():
    registry = new_registry()
    torch.cuda.init()
    device = f"cuda:{torch.cuda.current_device()}"

    def allocated() -> float:
        got = registry.get_sample_value("moe_gpu_memory_bytes", {"device": device, "kind": "allocated"})
        assert got is not None, f"no moe_gpu_memory_bytes{{device={device!r}}} after CUDA was initialised"
        return got

    gc.collect()  # tensors of earlier tests freed now, not while this one counts
    torch.cuda.synchronize()
    before = allocated()
    size = 64 << 20  # a multiple of the allocator's block sizes: counted exactly
    x = torch.empty(size, dtype=torch.uint8, device=device)
    assert allocated() - before == size
    reserved = registry.get_sample_value("moe_gpu_memory_bytes", {"device": device, "kind": "reserved"})
    assert reserved >= allocated() >= size
    # The same figures over HTTP, collected on the metrics server's own thread.
    server = MetricsServer(registry, HOST, pick_free_port(HOST))
    try:
        assert gpu_memory(scrape(server.port), device, "allocated") == before + size
        del x
        assert gpu_memory(scrape(server.port), device, "allocated") == before
    finally:
        server.stop()


def test_cuda_expert_server_reports_its_weights_in_gpu_memory(tiny):
    """One `--device cuda` expert server holding every expert from the start: its
    moe_gpu_memory_bytes covers its expert weights (float32 on the GPU)."""
    port = pick_free_port(HOST)
    with expert_servers(tiny, 1, ["--device", "cuda", "--experts", "all", "--metrics-port", str(port)]):
        families = scrape(port)
        weights = value(families, "moe_expert_weight_bytes", kind="home")
        assert weights > 0
        allocated = gpu_memory(families, "cuda:0", "allocated")
        assert allocated >= weights, f"{allocated} bytes allocated on the GPU, {weights} bytes of expert weights"
        assert gpu_memory(families, "cuda:0", "reserved") >= allocated
