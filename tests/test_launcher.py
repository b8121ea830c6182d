"""moe-serve (through deploy/local/run.sh and its YAML file) starts real processes, adds and
removes expert servers on SIGUSR1/SIGUSR2, and leaves no process behind."""

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from gateway.launcher import start_stack
from moe_common import shm
from moe_common.serving import pick_free_port
from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import channel, reference_ids

ROOT = Path(__file__).resolve().parent.parent


def test_local_launcher_serves_and_stops_every_child(tiny, reference):
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
        [expected] = reference_ids(reference, ["launch"], 3)
        assert generate(port) == expected
        status = get_status(port)
        assert status.predictor.address and status.predictor.forecasts_failed == 0
        assert status.predictor.forecasts_ok + status.predictor.forecasts_late > 0
        assert status.replication.mode == "off"  # deploy/local/stack.yaml: moe-serve's defaults, no checkpoint

        # SIGUSR1 adds an expert server, which joins; SIGUSR2 removes the newest, which drains.
        proc.send_signal(signal.SIGUSR1)
        wait_for_servers(port, 3)
        assert generate(port) == expected
        proc.send_signal(signal.SIGUSR2)
        wait_for_servers(port, 2)
        deadline = time.monotonic() + 60
        while len(psutil.Process(proc.pid).children(recursive=True)) != 4:
            assert time.monotonic() < deadline, "the removed expert server did not exit"
            time.sleep(0.1)
        assert generate(port) == expected and proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        gone, alive = psutil.wait_procs(children, timeout=10)
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")
def test_stopping_the_stack_stops_the_gateway_first_and_leaves_no_shared_memory(tiny, reference):
    [expected] = reference_ids(reference, ["launch"], 3)
    stack = start_stack(str(tiny.path), 1, predictor=False)
    try:
        gateway, expert = stack.gateway_process, stack.processes[0]
        assert generate(int(stack.gateway_address.rsplit(":", 1)[1])) == expected
        prefix = shm.process_prefix(gateway.pid)
        assert list(shm.SHM_DIR.glob(prefix + "*")), "the request did not go through shared memory"
        # A gateway that does not answer SIGTERM (frozen here) is killed after the timeout,
        # and cannot unlink its segments: the launcher does. Until the gateway is gone,
        # its expert servers keep serving (they would answer the requests it finishes).
        os.kill(gateway.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 30
        while proc_status(gateway.pid)["State"][0] != "T":  # stopped before it is asked to stop
            assert time.monotonic() < deadline, "SIGSTOP did not stop the gateway"
            time.sleep(0.02)
        stopping = threading.Thread(target=stack.stop, kwargs=dict(timeout_s=3))
        stopping.start()
        deadline = time.monotonic() + 30
        while not sigterm_pending(gateway.pid):  # the launcher asked the frozen gateway to stop
            assert time.monotonic() < deadline and gateway.returncode is None, \
                f"the gateway was not sent SIGTERM, or exited ({gateway.returncode})"
            time.sleep(0.02)
        # (Asked once: health checks count as a gateway's calls, which would delay its drain.)
        assert serving_status(stack.expert_addresses[0]) == "SERVING" and gateway.returncode is None
        while gateway.returncode is None and stopping.is_alive():
            assert expert.poll() is None
            time.sleep(0.05)
        stopping.join(timeout=30)
        assert gateway.returncode == -signal.SIGKILL
        assert expert.returncode == 0  # then stopped cleanly, with its own timeout
        assert not list(shm.SHM_DIR.glob(prefix + "*"))
    finally:
        stack.stop(timeout_s=2)


def proc_status(pid: int) -> dict[str, str]:
    """/proc/PID/status as {field: value}."""
    return dict(line.split(":\t", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())


def sigterm_pending(pid: int) -> bool:
    """SIGTERM sent to a stopped process and not yet delivered (ShdPnd, a hex mask)."""
    return bool(int(proc_status(pid)["ShdPnd"], 16) & (1 << (signal.SIGTERM - 1)))


def serving_status(address: str) -> str:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with channel(address) as ch:
        reply = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


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
    assert shipped.model == "tiny" and shipped.replication == "off"
    # One set of defaults: the shipped file sets nothing moe-serve does not default to.
    import yaml

    from gateway.launcher import build_parser
    defaults = build_parser()
    for key, value in yaml.safe_load((ROOT / "deploy" / "local" / "stack.yaml").read_text()).items():
        if key != "model":
            assert defaults.get_default(key.replace("-", "_")) == value, key
    config.write_text("model: tiny\nexpert-server: 3\n")
    with pytest.raises(SystemExit):
        parse_args(["--config", str(config)])


# ---- the supervisor: crashed children are restarted, the stack stops only when it must ----

def test_restart_delay_exact():
    from gateway.supervisor import RestartPolicy, restart_delay

    policy = RestartPolicy(backoff_s=1.0, max_backoff_s=5.0, limit=3, window_s=60.0)
    assert restart_delay([], 100.0, policy) == 1.0
    assert restart_delay([99.0], 100.0, policy) == 2.0
    assert restart_delay([90.0, 99.0], 100.0, policy) == 4.0
    assert restart_delay([30.0, 90.0, 99.0], 100.0, policy) == 4.0  # the restart at 30 s is out of the window
    assert restart_delay([50.0, 90.0, 99.0], 100.0, policy) is None  # 3 restarts within 60 s: give up
    assert restart_delay([1.0] * 10, 100.0, RestartPolicy(1.0, 5.0, 20, 600.0)) == 5.0  # capped
    assert restart_delay([], 0.0, RestartPolicy(limit=0)) is None
    with pytest.raises(ValueError):
        RestartPolicy(limit=-1)


def children_running(pid: int, module: str) -> list[psutil.Process]:
    """Live children of `pid` started as `python -m module` (exited, unreaped ones are skipped)."""
    found = []
    for c in psutil.Process(pid).children():
        try:
            if c.status() != psutil.STATUS_ZOMBIE and c.cmdline()[2:3] == [module]:
                found.append(c)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):
            pass
    return found


def _crashing(code: int) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", f"raise SystemExit({code})"])


def test_supervisor_restarts_with_backoff_and_stops_at_the_limit():
    """Real child processes that exit at once; the clock is the test's."""
    from gateway.launcher import Stack
    from gateway.supervisor import RestartPolicy, Supervisor

    now = [0.0]
    stack = Stack("127.0.0.1:1", ["127.0.0.1:2"])
    sup = Supervisor(stack, RestartPolicy(backoff_s=1.0, max_backoff_s=30.0, limit=2, window_s=600.0), clock=lambda: now[0])
    spawned = []

    def respawn():
        spawned.append(_crashing(9))
        return spawned[-1]

    expert = sup.watch("expert server", "127.0.0.1:2", _crashing(9), respawn)
    gateway_proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    sup.watch("gateway", "127.0.0.1:1", gateway_proc, None)
    try:
        expert.proc.wait()
        assert sup.poll() and expert.restart_at == 1.0 and not spawned  # backoff 1 s first
        now[0] = 1.0
        assert sup.poll() and len(spawned) == 1 and expert.proc is spawned[0] and stack.processes[0] is spawned[0]
        spawned[0].wait()
        now[0] = 2.0
        assert sup.poll() and expert.restart_at == 4.0  # second restart waits 2 s
        now[0] = 4.0
        assert sup.poll() and len(spawned) == 2
        spawned[1].wait()
        now[0] = 5.0
        assert not sup.poll()  # two restarts within the window: the third crash stops the stack
        assert sup.stop_reason == "the expert server 127.0.0.1:2 exited (code 9) after 2 restarts within 600 s (--restart-limit)"
    finally:
        gateway_proc.kill()
        gateway_proc.wait()
    sup2 = Supervisor(Stack("127.0.0.1:1", []), RestartPolicy(), clock=lambda: 0.0)
    sup2.watch("gateway", "127.0.0.1:1", gateway_proc, None)
    assert not sup2.poll() and sup2.stop_reason == "the gateway 127.0.0.1:1 exited (code -9)"


def test_moe_serve_restarts_a_killed_expert_server_and_stops_when_the_gateway_dies(tiny, reference):
    """SIGKILL of an expert server under moe-serve: it is restarted on its address and the
    service answers exactly as before; SIGKILL of the gateway stops the stack and says so."""
    from tests.conftest import generated_ids

    model, tokenizer = reference
    want = generated_ids(model, model.generate(**tokenizer(["launch"], return_tensors="pt"), max_new_tokens=3,
                                               do_sample=False))[0]
    port = pick_free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway.launcher", "--model", str(tiny.path), "--cache-dir", str(tiny.path.parents[1]),
         "--expert-servers", "3", "--port", str(port), "--no-predictor", "--restart-backoff-s", "0.2",
         "--log-level", "WARNING"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == f"gateway listening on 127.0.0.1:{port}", line + proc.stderr.read()[-3000:]
        assert generate(port) == want
        experts = children_running(proc.pid, "expert_server")
        assert len(experts) == 3
        victim = experts[1]
        victim_port = victim.cmdline()[victim.cmdline().index("--port") + 1]
        victim.kill()
        deadline = time.monotonic() + 120
        while True:  # a new process serves on the victim's port
            again = [c for c in children_running(proc.pid, "expert_server") if victim_port in c.cmdline()]
            if again and again[0].pid != victim.pid:
                break
            assert proc.poll() is None and time.monotonic() < deadline, "the killed expert server was not restarted"
            time.sleep(0.1)
        from moe_common.serving import wait_for_serving

        wait_for_serving(f"127.0.0.1:{victim_port}", 120)
        assert generate(port) == want  # it got its experts back
        assert len(get_status(port).servers) == 3 and get_status(port).healthy
        assert proc.poll() is None

        gateway_proc = children_running(proc.pid, "gateway")[0]
        everyone = psutil.Process(proc.pid).children()
        gateway_proc.kill()
        assert proc.wait(timeout=60) == 1
        assert f"the gateway 127.0.0.1:{port} exited (code -9); stopping the stack" in proc.stderr.read()
        gone, alive = psutil.wait_procs(everyone, timeout=20)
        assert not alive, f"left behind: {alive}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
