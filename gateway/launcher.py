"""moe-serve: start a whole stack on this machine as separate OS processes.

    moe-serve --model tiny --expert-servers 2 --port 50051
    moe-serve --config deploy/local/stack.yaml          # the same flags as a YAML file

While it runs, `kill -USR1 <pid>` adds an expert server (it joins the gateway with
--register-with at the gateway's admin address, printed at start) and `kill -USR2 <pid>` removes the newest one (it drains: the
gateway moves its experts away before it exits); requests keep being served.

Starts N expert servers and the gateway on loopback, waits until each answers
SERVING on its health service, prints the gateway address, and on Ctrl-C or
SIGTERM stops every child. Children also get SIGTERM if the launcher itself dies
(Linux parent-death signal), so no process is left behind. A crashed expert server
or predictor is restarted on its own address (gateway/supervisor.py); the stack
stops, saying why, only when the gateway exits or a child crashes past
--restart-limit.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from gateway.supervisor import RestartPolicy, Supervisor
from moe_common import model_source, serving, shm, tls
from moe_common.cli_help import HelpFormatter
from moe_common.tls import PLAINTEXT, TlsConfig

log = logging.getLogger("moe-serve")


@dataclass
class Stack:
    """The processes of one running stack."""

    gateway_address: str
    expert_addresses: list[str]
    predictor_address: str = ""
    processes: list[subprocess.Popen] = field(default_factory=list)
    admin_address: str = ""  # the gateway's control plane (MembershipService): --register-with goes here
    metrics_ports: dict[str, int] = field(default_factory=dict)  # service address -> its /metrics port (--metrics-port)

    gateway_process: subprocess.Popen | None = None  # also in processes; stopped first

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the gateway first, so that the requests it is finishing still reach live
        expert servers, then every other process; SIGKILL whatever outlives timeout_s
        (the gateway and the rest get timeout_s each)."""
        first = [self.gateway_process] if self.gateway_process is not None else []
        for group in (first, [p for p in self.processes if p is not self.gateway_process]):
            deadline = time.monotonic() + timeout_s
            for p in group:
                if p.poll() is None:
                    p.terminate()
            for p in group:
                try:
                    p.wait(timeout=max(0.1, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        # A gateway that had to be killed could not unlink its shared-memory segments.
        removed = shm.remove_orphans()
        if removed:
            log.info("removed %d shared-memory segment(s) of stopped processes", len(removed))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


# Expert servers get these unless the caller's environment says otherwise. Servers
# launched together share the host's cores, and OpenMP threads that spin after each
# parallel region (libgomp's default) steal them from the process that has work.
# Not for the gateway: its many small decode-step ops would pay a thread wake-up each
# (one unloaded tiny request went from 36 to 73 ms with a passive gateway).
EXPERT_ENV_DEFAULTS = {"OMP_WAIT_POLICY": "PASSIVE"}


def _spawn(args: list[str], log_file, env_defaults: dict[str, str] | None = None) -> subprocess.Popen:
    """Start `python -m args...`; its output goes to log_file, or else to our own stdout/stderr."""
    # The child arranges to die with us (serving.die_with_parent); no preexec_fn, so
    # subprocess can use vfork, which runs no fork handlers (gRPC's can deadlock a fork).
    return subprocess.Popen(
        [sys.executable, "-m", *args],
        stdout=log_file,
        stderr=subprocess.STDOUT if log_file is not None else None,
        env={**(env_defaults or {}), **os.environ, serving.PARENT_PID_ENV: str(os.getpid())},
    )


def spawn_expert_server(model_path: Path, host: str, port: int, args: list[str] | None = None, log_file=None) -> subprocess.Popen:
    """Start one expert server process (it serves once its health says SERVING)."""
    return _spawn(["expert_server", "--model", str(model_path), "--host", host, "--port", str(port), *(args or [])], log_file,
                  EXPERT_ENV_DEFAULTS)


@contextmanager
def expert_servers(model_path: Path, count: int, args: list[str] | None = None, host: str = "127.0.0.1",
                   timeout_s: float = 600.0):
    """Start `count` expert servers on free ports of `host` and wait until each is SERVING;
    yields their addresses, and stops them when the block ends (for benchmarks that run
    the gateway's Engine in their own process)."""
    procs, addresses = [], []
    try:
        for _ in range(count):
            port = serving.pick_free_port(host)
            procs.append(spawn_expert_server(model_path, host, port, args))
            addresses.append(f"{host}:{port}")
        for proc, address in zip(procs, addresses):
            wait_ready(proc, address, timeout_s)
        yield addresses
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def spawn_gateway(model_path: Path, host: str, port: int, expert_addresses: list[str], args: list[str] | None = None,
                  log_file=None) -> subprocess.Popen:
    """Start the gateway process for the given expert servers."""
    return _spawn(["gateway", "--model", str(model_path), "--host", host, "--port", str(port),
                   "--expert-servers", ",".join(expert_addresses), *(args or [])], log_file)


def spawn_predictor(model_path: Path, host: str, port: int, checkpoint: Path | None = None,
                    args: list[str] | None = None, log_file=None, serve_args: list[str] | None = None) -> subprocess.Popen:
    """Start the predictor service: the trained SRU with a checkpoint, a history method without.
    args go before the `serve` subcommand (e.g. --log-level), serve_args after it."""
    extra = ["--checkpoint", str(checkpoint)] if checkpoint else []
    return _spawn(["predictor_service", *(args or []), "serve", "--model", str(model_path), "--host", host,
                   "--port", str(port), *extra, *(serve_args or [])], log_file)


def metrics_args(port: int) -> list[str]:
    return ["--metrics-port", str(port)] if port else []


def wait_ready(proc: subprocess.Popen, address: str, timeout_s: float = 600.0, tls: TlsConfig = PLAINTEXT) -> None:
    serving.wait_for_serving(address, timeout_s, is_alive=lambda: proc.poll() is None, tls=tls)


def start_stack(model: str, num_expert_servers: int, port: int = 0, host: str = "127.0.0.1",
                cache_dir: Path = model_source.DEFAULT_CACHE_DIR, gateway_args: list[str] | None = None,
                expert_args: list[str] | None = None, log_file=None, timeout_s: float = 600.0,
                predictor: bool = True, predictor_checkpoint: Path | None = None,
                tls: TlsConfig = PLAINTEXT, admin_port: int = 0, internal_host: str | None = None,
                metrics_port: int = 0, predictor_args: list[str] | None = None,
                predictor_serve_args: list[str] | None = None) -> Stack:
    """Start expert servers, the predictor (unless predictor=False) and a gateway, and wait
    until all are SERVING. port 0 (and admin_port 0) = any free one. The gateway's admin
    port binds loopback (it changes the deployment; clients never need it); expert servers
    and the predictor bind internal_host (default: host). metrics_port BASE > 0: /metrics
    of the gateway on BASE, the predictor on BASE+1 and expert server i on BASE+2+i."""
    if num_expert_servers < 1:
        raise ValueError("--expert-servers must be >= 1")
    # Resolve (and build, for presets) once here, so the children do not race to build it.
    source = model_source.resolve(model, cache_dir)
    inner = internal_host or host
    expert_ports = [serving.pick_free_port(inner) for _ in range(num_expert_servers)]
    port = port or serving.pick_free_port(host)
    admin_port = admin_port or serving.pick_free_port("127.0.0.1")
    stack = Stack(f"{host}:{port}", [f"{inner}:{p}" for p in expert_ports], admin_address=f"127.0.0.1:{admin_port}")
    if metrics_port:
        stack.metrics_ports[stack.gateway_address] = metrics_port
        stack.metrics_ports.update({a: metrics_port + 2 + i for i, a in enumerate(stack.expert_addresses)})
    try:
        for p, address in zip(expert_ports, stack.expert_addresses):
            stack.processes.append(spawn_expert_server(source.path, inner, p, [
                *(expert_args or []), *tls.args(), *metrics_args(stack.metrics_ports.get(address, 0))], log_file))
        gateway_args = ["--admin-port", str(admin_port), *(gateway_args or []), *tls.args(), *metrics_args(metrics_port)]
        if predictor:
            predictor_port = serving.pick_free_port(inner)
            stack.predictor_address = f"{inner}:{predictor_port}"
            if metrics_port:
                stack.metrics_ports[stack.predictor_address] = metrics_port + 1
            stack.processes.append(spawn_predictor(source.path, inner, predictor_port, predictor_checkpoint,
                                                   args=predictor_args, log_file=log_file, serve_args=[
                                                       *(predictor_serve_args or []),
                                                       *tls.args(), *metrics_args(metrics_port + 1 if metrics_port else 0)]))
            gateway_args += ["--predictor", stack.predictor_address]
        for proc, address in zip(stack.processes, [*stack.expert_addresses, stack.predictor_address]):
            wait_ready(proc, address, timeout_s, tls)
        stack.gateway_process = spawn_gateway(source.path, host, port, stack.expert_addresses, gateway_args, log_file)
        stack.processes.append(stack.gateway_process)
        wait_ready(stack.gateway_process, stack.gateway_address, timeout_s, tls)
    except BaseException:
        stack.stop()
        raise
    return stack


def _demo(address: str, tls: TlsConfig, api_keys_file: Path | None = None) -> None:
    """One Generate call, printed: what a first client sees (with the first API key, if any)."""
    from moe_common.auth import read_secret_lines
    from moe_protos.moe.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    prompt = "Experts, assemble!"
    metadata = [("authorization", f"Bearer {read_secret_lines(api_keys_file)[0]}")] if api_keys_file else None
    with tls.channel(address) as channel:
        reply = gateway_pb2_grpc.GatewayServiceStub(channel).Generate(gateway_pb2.GenerateRequest(
            prompts=[prompt], parameters=gateway_pb2.GenerationParameters(max_new_tokens=16)), metadata=metadata)
    g = reply.generations[0]
    print(f"demo request: {prompt!r} -> token ids {list(g.token_ids)} text {g.text!r} "
          f"({reply.timings.total_ns / 1e6:.0f} ms; a random-init preset writes gibberish)", flush=True)


# Replica memory per expert server when replication is on and --replica-memory was not
# given: room for about 13 switch-base experts (18.9 MB each in float32), and for every
# expert of the tiny and base-e32-l4 presets' hot layers on a laptop.
DEFAULT_REPLICA_MEMORY = "256MB"


def implied_defaults(a: argparse.Namespace, given: set[str]) -> list[str]:
    """Fill in what other flags imply, for options not in `given` (the dests set on the
    command line or in --config): a forecaster checkpoint is there to drive predictive
    replication, and replication needs memory for replicas. Returns what was implied, to log."""
    implied = []
    if a.predictor_checkpoint is not None and not a.no_predictor and "replication" not in given:
        a.replication = "predictive"
        implied.append("--replication predictive (implied by --predictor-checkpoint)")
    if a.replication != "off" and "replica_memory" not in given:
        a.replica_memory = DEFAULT_REPLICA_MEMORY
        implied.append(f"--replica-memory {DEFAULT_REPLICA_MEMORY} (replication {a.replication} needs room for replicas)")
    return implied


def _given(argv, config_values: dict) -> set[str]:
    """The dests set on the command line or in the --config file."""
    probe = build_parser()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    return set(vars(probe.parse_args(argv))) | set(config_values)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moe-serve", description=__doc__.splitlines()[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--config", type=Path, default=None,
                   help="YAML file of these options (keys as the flags, without --); flags given here win")
    p.add_argument("--model", help="checkpoint directory, hub id, or preset (tiny, base-e<E>[-l<L>])")
    p.add_argument("--expert-servers", type=int, default=2, help="number of expert server processes at start")
    p.add_argument("--port", type=int, default=50051, help="gateway port")
    p.add_argument("--admin-port", type=int, default=0,
                   help="gateway admin port on 127.0.0.1 (membership; 0 = any free one, printed)")
    p.add_argument("--api-keys-file", type=Path, default=None,
                   help="client API keys, one per line (the gateway reloads them on SIGHUP)")
    p.add_argument("--host", default="127.0.0.1", help="address the gateway's client port binds (loopback by default)")
    p.add_argument("--internal-host", default="127.0.0.1",
                   help="address expert servers and the predictor bind (loopback: only the gateway reaches them; "
                        "beyond it they need --cluster-token-file, mutual TLS or --insecure)")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR,
                   help="where presets are built and hub checkpoints are kept")
    p.add_argument("--device", default="cpu", help="expert server device: cpu, cuda or cuda:N")
    p.add_argument("--expert-kernel", default="exact", choices=["exact", "grouped"],
                   help="expert servers' FFN kernel: exact (bit-identical to HF) or grouped (grouped GEMM, not bit-exact)")
    p.add_argument("--expert-threads", type=int, default=None,
                   help="torch threads per expert server (default: the machine's cores split between the servers)")
    p.add_argument("--gateway-device", default=None,
                   help="where the gateway runs attention, norms and routers (default: cuda when --device is cuda)")
    p.add_argument("--wire-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of hidden states sent to expert servers (only float32 is exact)")
    p.add_argument("--transport", default="auto", choices=["auto", "shm", "grpc"],
                   help="hidden states between gateway and expert servers: shared memory where possible (auto)")
    p.add_argument("--max-batch-size", type=int, default=8, help="gateway: prompts per batch")
    p.add_argument("--max-wait-ms", type=float, default=5.0, help="gateway: how long a request waits for others to batch with")
    p.add_argument("--scheduler", default="continuous", choices=["static", "continuous"],
                   help="gateway batching: continuous (rows join and leave at every step), or static batches")
    p.add_argument("--max-batch-tokens", type=int, default=4096, help="continuous: prompt tokens per admission step")
    p.add_argument("--admission-wait-steps", type=int, default=16,
                   help="continuous: decode steps an arrival may wait for others to share its encoder pass")
    p.add_argument("--replication", default="off", choices=["off", "reactive", "window", "predictive"],
                   help="how replicas of hot experts are planned; unless given, predictive with --predictor-checkpoint")
    p.add_argument("--replica-policy", default="whole", choices=["whole", "split", "auto"],
                   help="whole: bit-identical outputs; split: also split one expert's tokens (float tolerance); auto: per layer call")
    p.add_argument("--replica-group-cost", type=float, default=0.0,
                   help="fixed cost of one expert group in tokens' worth (gateway --replica-group-cost)")
    p.add_argument("--replica-sharing", default="auto", choices=["auto", "off"],
                   help="auto: the planner counts expert servers that share a host's cores; off: it plans as if "
                        "each had its own (gateway --replica-sharing)")
    p.add_argument("--replica-memory", default="0",
                   help=f"replica memory per expert server, e.g. 2GB; unless given, {DEFAULT_REPLICA_MEMORY} "
                        "when --replication is not off")
    p.add_argument("--redundancy", type=int, default=1,
                   help="servers holding each logical expert (standby replicas need --replica-memory)")
    p.add_argument("--predictor-checkpoint", type=Path, default=None,
                   help="trained forecaster (moe-predictor train); without it the predictor uses a history method")
    p.add_argument("--no-predictor", action="store_true", help="run without the predictor service")
    p.add_argument("--demo", action="store_true", help="send one request once the stack is up and print the reply")
    p.add_argument("--restart-limit", type=int, default=5,
                   help="restarts of one crashed expert server or predictor within --restart-window-s; "
                        "one more crash stops the stack")
    p.add_argument("--restart-window-s", type=float, default=600.0, help="the window --restart-limit counts restarts in")
    p.add_argument("--restart-backoff-s", type=float, default=1.0,
                   help="wait before restarting a crashed child; doubles with each recent restart (at most 30 s)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING or ERROR; passed to every process")
    p.add_argument("--metrics-port", type=int, default=0,
                   help="BASE: Prometheus /metrics of the gateway on BASE, the predictor on BASE+1 and expert "
                        "server i on BASE+2+i (0 = off)")
    p.add_argument("--log-format", default="text", choices=["text", "json"],
                   help="every process's log lines: text, or one JSON object per line")
    g = p.add_argument_group("gateway (passed through to moe-gateway)")
    g.add_argument("--model-name", default="switch", help="name clients use for the model")
    g.add_argument("--max-input-tokens", type=int, default=512, help="longer prompts: INVALID_ARGUMENT")
    g.add_argument("--max-new-tokens-limit", type=int, default=512, help="largest max_new_tokens a request may ask for")
    g.add_argument("--default-max-new-tokens", type=int, default=32, help="max_new_tokens of a request that sets none")
    g.add_argument("--max-prompts-per-request", type=int, default=64, help="more prompts in one request: INVALID_ARGUMENT")
    g.add_argument("--max-queued-prompts", type=int, default=1024, help="beyond it requests get RESOURCE_EXHAUSTED")
    g.add_argument("--gateway-max-workers", type=int, default=64, help="gateway gRPC handler threads (its --max-workers)")
    g.add_argument("--gateway-dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                   help="dtype of the gateway's model, its --dtype (only float32 reproduces a float32 checkpoint exactly)")
    g.add_argument("--startup-timeout-s", type=float, default=600.0, help="gateway: waiting for expert servers to load")
    g.add_argument("--expert-timeout-s", type=float, default=60.0, help="deadline of one call to an expert server")
    g.add_argument("--predictor-timeout-ms", type=float, default=50.0, help="deadline of one forecast call")
    g.add_argument("--replication-window", type=int, default=8, help="batches per plan in window mode")
    g.add_argument("--replication-min-gain", type=float, default=0.02,
                   help="keep the current replicas unless a new plan cuts the forecast makespan by this share")
    g.add_argument("--record-traces", type=Path, default=None, help="record every pass's routing into this directory")
    g.add_argument("--membership-interval-s", type=float, default=1.0, help="period of the gateway's health watch")
    g.add_argument("--evict-after-s", type=float, default=10.0,
                   help="move an unreachable expert server's experts to the others after this long")
    g.add_argument("--join-timeout-s", type=float, default=10.0, help="how long a joining expert server may take to be SERVING")
    g.add_argument("--api-key-rate-per-s", type=float, default=0.0, help="requests per second per key (0 = no limit)")
    g.add_argument("--api-key-max-concurrent", type=int, default=0, help="requests in flight per key (0 = no limit)")
    g.add_argument("--client-status", default="auto", choices=["auto", "full", "public"],
                   help="GetStatus on the client port: public leaves out internal addresses; auto = full on loopback")
    g = p.add_argument_group("expert servers (passed through to moe-expert-server)")
    g.add_argument("--expert-dtype", default="float32", help="compute dtype of expert weights (their --dtype)")
    g.add_argument("--group-executor", default="sequential", choices=["sequential", "threads", "streams"],
                   help="run the experts of one call one after another, on a thread pool, or (CUDA) on 4 CUDA streams")
    g.add_argument("--expert-max-workers", type=int, default=16, help="expert server gRPC handler threads (their --max-workers)")
    g.add_argument("--drain-timeout-s", type=float, default=60.0,
                   help="a removed expert server serves on until the gateway moved its experts away, at most this long")
    g.add_argument("--drain-quiet-s", type=float, default=2.5,
                   help="...or until no call (health checks included) arrived for this long")
    g.add_argument("--no-shared-memory", dest="shared_memory", action="store_false",
                   help="expert servers refuse hidden states in shared memory (the gateway then sends bytes)")
    g.add_argument("--no-local-lane", dest="local_lane", action="store_false",
                   help="layer calls between the gateway and expert servers go over gRPC only, not over the "
                        "servers' Unix sockets (both get --no-local-lane)")
    g.add_argument("--simulate-load-delay-s", type=float, default=0.0,
                   help="testing: expert servers wait this long in every call that loads experts (a slow disk)")
    g = p.add_argument_group("predictor (passed through to moe-predictor serve)")
    g.add_argument("--predictor-method", choices=["sru", "last", "window", "ema"], default=None,
                   help="forecast method (default: sru with --predictor-checkpoint, window without)")
    g.add_argument("--predictor-window", type=int, default=16, help="window method: passes averaged")
    g.add_argument("--predictor-alpha", type=float, default=0.3, help="ema method: weight of the newest pass")
    g.add_argument("--predictor-sru-impl", choices=["auto", "kernel", "torch"], default="auto",
                   help="the SRU: kernel (C++, needs a compiler), torch (no compiler, slower), auto (kernel if it builds)")
    tls.add_arguments(p)
    return p


# moe-serve flag -> the child's flag, for each kind of child. Flags named here are forwarded
# as given (tests/test_launcher_flags.py checks that every child flag is here or excluded).
GATEWAY_FLAGS = {f: f for f in [
    "--transport", "--wire-dtype", "--max-batch-size", "--max-wait-ms", "--log-level", "--log-format", "--replication",
    "--replica-policy", "--replica-group-cost", "--replica-sharing", "--redundancy", "--scheduler", "--max-batch-tokens",
    "--api-keys-file", "--admission-wait-steps",
    "--model-name", "--max-input-tokens", "--max-new-tokens-limit", "--default-max-new-tokens",
    "--max-prompts-per-request", "--max-queued-prompts", "--startup-timeout-s", "--expert-timeout-s",
    "--predictor-timeout-ms", "--replication-window", "--replication-min-gain", "--record-traces",
    "--membership-interval-s", "--evict-after-s", "--join-timeout-s", "--api-key-rate-per-s",
    "--api-key-max-concurrent", "--client-status", "--no-local-lane"]} | {"--gateway-max-workers": "--max-workers", "--gateway-dtype": "--dtype"}
EXPERT_FLAGS = {f: f for f in [
    "--device", "--expert-kernel", "--log-level", "--log-format", "--replica-memory", "--group-executor",
    "--drain-timeout-s", "--drain-quiet-s", "--no-shared-memory", "--no-local-lane", "--simulate-load-delay-s"]} | {
    "--expert-dtype": "--dtype", "--expert-max-workers": "--max-workers"}
PREDICTOR_SERVE_FLAGS = {"--predictor-method": "--method", "--predictor-window": "--window", "--predictor-alpha": "--alpha",
                         "--predictor-sru-impl": "--sru-impl"}


def forward(a: argparse.Namespace, flags: dict[str, str]) -> list[str]:
    """The child's argument list for the moe-serve flags in `flags` (moe-serve flag -> child flag):
    values as given, switches when set, flags whose value is None left out."""
    actions = build_parser()._option_string_actions
    out: list[str] = []
    for ours, theirs in flags.items():
        action = actions[ours]
        value = getattr(a, action.dest)
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            out += [theirs] if value != action.default else []
        elif value is not None:
            out += [theirs, str(value)]
    return out


def gateway_argv(a: argparse.Namespace) -> list[str]:
    return ["--device", a.gateway_device or ("cuda" if a.device.startswith("cuda") else "cpu"),
            *forward(a, GATEWAY_FLAGS)]


def expert_argv(a: argparse.Namespace, threads: int) -> list[str]:
    return ["--threads", str(threads), *forward(a, EXPERT_FLAGS)]


def predictor_argv(a: argparse.Namespace) -> list[str]:
    """The predictor's flags before its `serve` subcommand."""
    return ["--log-level", a.log_level, "--log-format", a.log_format]


def parse_args(argv=None) -> argparse.Namespace:
    """Flags, with defaults from --config's YAML file when given."""
    p = build_parser()
    a = p.parse_args(argv)
    values: dict = {}
    if a.config is not None:
        import yaml

        try:
            loaded = yaml.safe_load(a.config.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            p.error(f"--config {a.config}: {exc}")
        if not isinstance(loaded, dict):
            p.error(f"--config {a.config}: expected a mapping of option: value")
        known = {action.dest for action in p._actions} - {"help", "config"}
        values = {str(k).replace("-", "_"): v for k, v in loaded.items()}
        unknown = sorted(set(values) - known)
        if unknown:
            p.error(f"--config {a.config}: unknown options {unknown}; known: {sorted(known)}")
        p.set_defaults(**values)
        a = p.parse_args(argv)
    if not a.model:
        p.error("--model is required (as a flag or in --config)")
    a.implied = implied_defaults(a, _given(argv, values))
    if a.expert_servers < 1:
        p.error("--expert-servers must be >= 1")
    if a.metrics_port and not 0 < a.metrics_port <= 65535 - 2 - a.expert_servers:
        p.error(f"--metrics-port BASE needs BASE..BASE+{1 + a.expert_servers} within 1..65535")
    try:
        a.restart_policy = RestartPolicy(a.restart_backoff_s, max(a.restart_backoff_s, 30.0), a.restart_limit,
                                         a.restart_window_s)
    except ValueError as exc:
        p.error(str(exc))
    return a


def supervise(stack: Stack, a: argparse.Namespace, model_path: Path, expert_args: list[str],
              tls_config: TlsConfig) -> Supervisor:
    """A Supervisor over every process of a started stack, each restartable on its own address
    except the gateway."""
    sup = Supervisor(stack, a.restart_policy)
    # A restarted expert server registers: if it was evicted meanwhile it joins again.
    args = [*expert_args, "--register-with", stack.admin_address, *tls_config.args()]
    for proc, address in zip(stack.processes, stack.expert_addresses):
        host, port = address.rsplit(":", 1)
        sup.watch("expert server", address, proc,
                  lambda host=host, port=int(port), mp=stack.metrics_ports.get(address, 0):
                  spawn_expert_server(model_path, host, port, [*args, *metrics_args(mp)]))
    if stack.predictor_address:
        host, port = stack.predictor_address.rsplit(":", 1)
        predictor_metrics = metrics_args(stack.metrics_ports.get(stack.predictor_address, 0))
        sup.watch("predictor", stack.predictor_address, stack.processes[len(stack.expert_addresses)],
                  lambda: spawn_predictor(model_path, host, int(port), a.predictor_checkpoint,
                                          args=predictor_argv(a), serve_args=[*forward(a, PREDICTOR_SERVE_FLAGS),
                                                                              *tls_config.args(), *predictor_metrics]))
    sup.watch("gateway", stack.gateway_address, stack.processes[-1], None)
    return sup


def add_expert_server(sup: Supervisor, model_path: Path, host: str, expert_args: list[str], tls_config: TlsConfig) -> None:
    """SIGUSR1: one more expert server, which joins the gateway once loaded."""
    port = serving.pick_free_port(host)
    address = f"{host}:{port}"
    args = [*expert_args, "--register-with", sup.stack.admin_address, *tls_config.args()]
    if sup.stack.metrics_ports:  # the next port after every one handed out so far
        sup.stack.metrics_ports[address] = max(sup.stack.metrics_ports.values()) + 1
        args += metrics_args(sup.stack.metrics_ports[address])
    proc = spawn_expert_server(model_path, host, port, args)
    sup.watch("expert server", address, proc, lambda: spawn_expert_server(model_path, host, port, args))
    log.info("adding expert server %s (pid %d); it joins the gateway once loaded", address, proc.pid)


def remove_expert_server(sup: Supervisor) -> None:
    """SIGUSR2: the newest expert server leaves (it drains: the gateway moves its experts first)."""
    servers = sup.expert_servers()
    if len(servers) <= 1:
        log.warning("not removing the last expert server")
        return
    child = servers[-1]
    sup.retire(child)
    log.info("removing expert server %s (pid %d); it drains first", child.address, child.proc.pid)
    child.proc.terminate()


def main(argv=None) -> int:
    a = parse_args(argv)
    serving.configure_logging(a.log_level, a.log_format)
    for what in a.implied:
        log.info("using %s; give the flag to choose otherwise", what)
    try:
        tls_config = tls.from_args(a)
    except ValueError as exc:
        build_parser().error(str(exc))

    def interrupt(*_):
        raise KeyboardInterrupt  # while starting: unwind start_stack, which stops what it started

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    # All servers share this machine: split its cores rather than oversubscribe them
    # (benchmarks/forward_throughput.py --expert-threads measures the difference).
    threads = a.expert_threads if a.expert_threads is not None else max(1, (os.cpu_count() or 1) // a.expert_servers)
    log.info("starting %d expert servers (%d threads each) and the gateway for model %s", a.expert_servers, threads, a.model)
    experts = expert_argv(a, threads)
    try:
        stack = start_stack(
            a.model, a.expert_servers, a.port, a.host, a.cache_dir,
            gateway_args=gateway_argv(a),
            expert_args=experts,
            predictor=not a.no_predictor, predictor_checkpoint=a.predictor_checkpoint, tls=tls_config,
            admin_port=a.admin_port, internal_host=a.internal_host,
            metrics_port=a.metrics_port, predictor_args=predictor_argv(a),
            predictor_serve_args=forward(a, PREDICTOR_SERVE_FLAGS),
        )
    except KeyboardInterrupt:
        log.info("interrupted while starting; every process started was stopped")
        return 130
    model_path = model_source.resolve(a.model, a.cache_dir).path
    supervisor = supervise(stack, a, model_path, experts, tls_config)
    stop = threading.Event()
    requests: list[str] = []  # "add" / "remove", handled by the loop below rather than in the handler
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    signal.signal(signal.SIGUSR1, lambda *_: requests.append("add"))
    signal.signal(signal.SIGUSR2, lambda *_: requests.append("remove"))
    with stack:
        print(f"gateway listening on {stack.gateway_address}", flush=True)
        print(f"gateway admin (membership, not for clients) on {stack.admin_address}", flush=True)
        print(f"expert servers: {', '.join(stack.expert_addresses)}", flush=True)
        if stack.predictor_address:
            print(f"predictor: {stack.predictor_address}", flush=True)
        for address, mp in stack.metrics_ports.items():
            print(f"metrics of {address}: http://{a.host}:{mp}/metrics", flush=True)
        print(f"moe-serve pid {os.getpid()}: Ctrl-C stops every process; kill -USR1 adds an expert server, "
              "kill -USR2 removes one", flush=True)
        if a.demo:
            _demo(stack.gateway_address, tls_config, a.api_keys_file)
        while not stop.wait(0.2):
            while requests:
                if requests.pop(0) == "add":
                    add_expert_server(supervisor, model_path, a.internal_host, experts, tls_config)
                else:
                    remove_expert_server(supervisor)
            if not supervisor.poll():
                log.error("%s; stopping the stack", supervisor.stop_reason)
                return 1
        log.info("stopping the stack")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
