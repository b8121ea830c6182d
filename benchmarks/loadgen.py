"""Load for the fault benchmarks (membership.py, crash.py, soak.py): prompts from the
standard library's docstrings, the single-process HF model's answers to them, and
closed-loop clients that call Generate back to back and keep every reply.

The gateways these scripts start run --max-batch-size 1, so that each prompt's
reference is HF on that prompt alone: HF's own outputs move slightly with padding and
batch shape (benchmarks/exactness.py), which is not what they measure.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import grpc
import torch

from moe_common.batching import generated_rows
from moe_common.corpus import stdlib_documents
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc


def add_arguments(p: argparse.ArgumentParser, clients: int) -> None:
    """The workload flags every fault benchmark shares."""
    p.add_argument("--clients", type=int, default=clients)
    p.add_argument("--prompts", type=int, default=16, help="distinct prompts, from the standard library's docstrings")
    p.add_argument("--prompt-chars", type=int, default=96)
    p.add_argument("--max-new-tokens", type=int, default=8)


def prompts_and_reference(source, a) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt token ids, HF's greedy tokens for each) for --prompts, --prompt-chars, --max-new-tokens."""
    from transformers import AutoTokenizer

    texts = [d[: a.prompt_chars] for d in stdlib_documents()[: a.prompts]]
    prompts = [list(x) for x in AutoTokenizer.from_pretrained(source.path)(texts)["input_ids"]]
    print(f"reference: HF on {len(prompts)} prompts, {a.max_new_tokens} new tokens each", flush=True)
    return prompts, reference_outputs(source, prompts, a.max_new_tokens)


def save_figure(fig, path: Path) -> None:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def reference_outputs(source, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Greedy tokens of the single-process HF model, one prompt at a time."""
    from transformers import SwitchTransformersForConditionalGeneration

    model = SwitchTransformersForConditionalGeneration.from_pretrained(source.path).eval()
    with torch.inference_mode():
        return [generated_rows(model.generate(input_ids=torch.tensor([ids]), max_new_tokens=max_new_tokens,
                                              do_sample=False), model.config.eos_token_id)[0] for ids in prompts]


class Load:
    """--clients threads calling Generate back to back until stop()."""

    def __init__(self, address: str, prompts: list[list[int]], max_new_tokens: int, clients: int):
        self.address = address
        self.prompts = prompts
        self.max_new_tokens = max_new_tokens
        self.results: list[tuple[float, float, int, list[int] | None, str]] = []  # start, end, prompt, tokens, error
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._client, args=(c,), daemon=True) for c in range(clients)]

    def start(self):
        for t in self._threads:
            t.start()

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join()

    def _client(self, client: int) -> None:
        with grpc.insecure_channel(self.address) as channel:
            stub = gateway_pb2_grpc.GatewayServiceStub(channel)
            n = client
            while not self._stop.is_set():
                index = n % len(self.prompts)
                n += len(self._threads)
                t0 = time.monotonic()
                try:
                    reply = stub.Generate(gateway_pb2.GenerateRequest(
                        token_ids=[gateway_pb2.TokenIds(ids=self.prompts[index])],
                        parameters=gateway_pb2.GenerationParameters(max_new_tokens=self.max_new_tokens)), timeout=120)
                    result = (t0, time.monotonic(), index, list(reply.generations[0].token_ids), "")
                except grpc.RpcError as err:
                    result = (t0, time.monotonic(), index, None, f"{err.code().name}: {err.details()}")
                with self._lock:
                    self.results.append(result)


def status(address: str) -> gateway_pb2.GetStatusResponse:
    with grpc.insecure_channel(address) as channel:
        return gateway_pb2_grpc.GatewayServiceStub(channel).GetStatus(gateway_pb2.GetStatusRequest(), timeout=10)
