"""moe-serve (through deploy/local/run.sh and its YAML file) starts real processes, adds and
removes expert servers on SIGUSR1/SIGUSR2, and leaves no process behind."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from moe_common.serving import pick_free_port
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import channel

ROOT = Path(__file__).resolve().parent.parent


def test_local_launcher_serves_and_stops_every_child(tiny):
    port = pick_free_port()
    proc = subprocess.Popen(
        [str(ROOT / "deploy" / "local" / "run.sh"), "--model", str(tiny.path), "--expert-servers", "2", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHON": sys.executable},
    )
    try:
        # The launcher prints the address only after every process answered SERVING.
        line = proc.stdout.readline()
        assert line.strip() == f"gateway listening on 127.0.0.1:{port}", line
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 4  # 2 expert servers, the predictor, the gateway
        assert generate(port)
        status = get_status(port)
        assert status.predictor.address and status.predictor.forecasts_failed == 0
        assert status.predictor.forecasts_ok + status.predictor.forecasts_late > 0
        assert status.replication.mode == "window"  # from deploy/local/stack.yaml

        # SIGUSR1 adds an expert server, which joins; SIGUSR2 removes the newest, which drains.
        proc.send_signal(signal.SIGUSR1)
        wait_for_servers(port, 3)
        assert generate(port)
        proc.send_signal(signal.SIGUSR2)
        wait_for_servers(port, 2)
        deadline = time.monotonic() + 60
        while len(psutil.Process(proc.pid).children(recursive=True)) != 4:
            assert time.monotonic() < deadline, "the removed expert server did not exit"
            time.sleep(0.1)
        assert generate(port) and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def generate(port: int) -> list[int]:
    with channel(f"127.0.0.1:{port}") as ch:
        reply = gateway_pb2_grpc.GatewayServiceStub(ch).Generate(gateway_pb2.GenerateRequest(
            prompts=["launch"], parameters=gateway_pb2.GenerationParameters(max_new_tokens=3)))
    return list(reply.generations[0].token_ids)


def get_status(port: int) -> gateway_pb2.GetStatusResponse:
    with channel(f"127.0.0.1:{port}") as ch:
        return gateway_pb2_grpc.GatewayServiceStub(ch).GetStatus(gateway_pb2.GetStatusRequest())


def wait_for_servers(port: int, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(get_status(port).servers) != count:
        assert time.monotonic() < deadline, f"the gateway did not reach {count} expert servers"
        time.sleep(0.1)


def test_config_file_gives_defaults_and_flags_win(tmp_path):
    from gateway.launcher import parse_args

    config = tmp_path / "stack.yaml"
    config.write_text("model: tiny\nexpert-servers: 3\nreplica_memory: 1GB\npredictor-checkpoint: null\n")
    a = parse_args(["--config", str(config), "--expert-servers", "4"])
    assert (a.model, a.expert_servers, a.replica_memory, a.predictor_checkpoint) == ("tiny", 4, "1GB", None)
    shipped = parse_args(["--config", str(ROOT / "deploy" / "local" / "stack.yaml")])
    assert shipped.model == "tiny" and shipped.replication == "window"
    config.write_text("model: tiny\nexpert-server: 3\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])
