"""Shared fixtures: the tiny preset in a private cache, and real expert-server and
gateway processes on free loopback ports, each waited on through its health service
and stopped by the fixture that started it."""

from __future__ import annotations

import contextlib
import subprocess

import grpc
import pytest

from gateway.launcher import spawn_expert_server, spawn_gateway, wait_ready
from moe_common import model_source
from moe_common.batching import generated_rows
from moe_common.serving import message_options, pick_free_port

HOST = "127.0.0.1"


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> model_source.ModelSource:
    return model_source.resolve("tiny", tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def reference(tiny):
    """The single-process HF model the distributed one must equal."""
    from transformers import AutoTokenizer, SwitchTransformersForConditionalGeneration

    model = SwitchTransformersForConditionalGeneration.from_pretrained(tiny.path).eval()
    return model, AutoTokenizer.from_pretrained(tiny.path)


def generated_ids(model, output) -> list[list[int]]:
    """HF generate() output [B, 1 + T] -> the ids the gateway reports per row."""
    return generated_rows(output, model.config.eos_token_id)


def reference_ids(reference, prompts: list[str], max_new_tokens: int) -> list[list[int]]:
    """The tokens the single-process model generates greedily for `prompts`, per row."""
    import torch

    model, tokenizer = reference
    enc = tokenizer(prompts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return generated_ids(model, model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def expert_servers(source, count: int, args=None):
    """Start `count` expert servers; yield their addresses."""
    procs, addresses = [], []
    try:
        for _ in range(count):
            port = pick_free_port(HOST)
            procs.append(spawn_expert_server(source.path, HOST, port, args))
            addresses.append(f"{HOST}:{port}")
        for proc, address in zip(procs, addresses):
            wait_ready(proc, address, 120)
        yield addresses, procs
    finally:
        for proc in procs:  # all at once: each may drain for a moment
            if proc.poll() is None:
                proc.terminate()
        for proc in procs:
            stop(proc)


def restart_expert_server(source, address: str, log_dir, args=None, tries: int = 3) -> subprocess.Popen:
    """Start an expert server again on the address of one that died, and wait until it
    serves. Binding a just-freed loopback port can fail when an outgoing connection took
    it as its ephemeral port meanwhile: then, or when the start failed otherwise, try again
    (the log of the last try says why it stopped)."""
    host, port = address.rsplit(":", 1)
    for attempt in range(tries):
        log_path = log_dir / f"restart-{port}-{attempt}.log"
        with log_path.open("w") as log_file:
            proc = spawn_expert_server(source.path, host, int(port), args, log_file=log_file)
        try:
            wait_ready(proc, address, 120)
            return proc
        except RuntimeError:
            proc.wait()
            # Also tried again: a start that died in gRPC's poller ("epoll_wait error: Bad
            # file descriptor", seen once on the loaded 2-core machine); these tests are
            # about the gateway, not about one server's start.
            if attempt == tries - 1:
                raise AssertionError(f"the restarted expert server on {address} stopped:\n{log_path.read_text()[-3000:]}")
    raise AssertionError("unreachable")


# Tests of replication mechanics run all their expert servers on this machine's few cores,
# where the planner rightly finds that balancing them cannot pay and plans nothing
# (gateway.replication.Sharing): they plan as if each server had cores of its own.
DEDICATED = ["--replica-sharing", "off"]

ADMIN: dict[str, str] = {}  # gateway address -> its admin address (--admin-port), for gateway()


def admin_address(gw: str) -> str:
    """The admin (MembershipService) address of a gateway started by gateway()."""
    return ADMIN[gw]


@contextlib.contextmanager
def gateway(source, addresses, args=None):
    """Start a gateway over `addresses`; yield its client address (admin_address() gives the other)."""
    port, admin_port = pick_free_port(HOST), pick_free_port(HOST)
    proc = spawn_gateway(source.path, HOST, port, addresses, ["--admin-port", str(admin_port), *(args or [])])
    ADMIN[f"{HOST}:{port}"] = f"{HOST}:{admin_port}"
    try:
        wait_ready(proc, f"{HOST}:{port}", 120)
        yield f"{HOST}:{port}"
    finally:
        stop(proc)


@pytest.fixture(scope="session")
def three_expert_servers(tiny):
    with expert_servers(tiny, 3) as (addresses, _):
        yield addresses


def channel(address: str) -> grpc.Channel:
    return grpc.insecure_channel(address, options=message_options())
