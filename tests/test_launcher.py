"""moe-serve (through deploy/local.sh) starts real processes and leaves none behind."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

from moe_common.serving import pick_free_port
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import channel

ROOT = Path(__file__).resolve().parent.parent


def test_local_launcher_serves_and_stops_every_child(tiny):
    port = pick_free_port()
    proc = subprocess.Popen(
        [str(ROOT / "deploy" / "local.sh"), "--model", str(tiny.path), "--expert-servers", "2", "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHON": sys.executable},
    )
    try:
        # The launcher prints the address only after every process answered SERVING.
        line = proc.stdout.readline()
        assert line.strip() == f"gateway listening on 127.0.0.1:{port}", line
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) == 4  # 2 expert servers, the predictor, the gateway
        with channel(f"127.0.0.1:{port}") as ch:
            reply = gateway_pb2_grpc.GatewayServiceStub(ch).Generate(gateway_pb2.GenerateRequest(
                prompts=["launch"], parameters=gateway_pb2.GenerationParameters(max_new_tokens=3)))
        assert len(reply.generations[0].token_ids) >= 1
        with channel(f"127.0.0.1:{port}") as ch:
            status = gateway_pb2_grpc.GatewayServiceStub(ch).GetStatus(gateway_pb2.GetStatusRequest())
        assert status.predictor.address and status.predictor.forecasts_failed == 0
        assert status.predictor.forecasts_ok + status.predictor.forecasts_late > 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
