"""Expert servers joining and leaving under load: failed requests, exactness, time to traffic.

    python benchmarks/membership.py --model base-e32-l4 --clients 4 --json benchmarks/results/membership.json

Starts a real stack (2 expert servers and a gateway, separate processes), drives it
with --clients concurrent clients sending Generate calls without pause, then:
  1. starts a third expert server with --register-with (it joins the running gateway);
     time to traffic = from starting its process to its first tokens (GetStatus);
  2. sends SIGTERM to one of the first two servers: it drains (NOT_SERVING, the gateway
     moves its experts away, then it exits).
Every reply is checked against the single-process HF model on the same prompt.
Prints a summary; --json writes it. Exit status 1 if any request failed or differed.

The gateway runs --max-batch-size 1 by default (see benchmarks/loadgen.py).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gateway.launcher import spawn_expert_server, start_stack  # noqa: E402
from loadgen import Load, add_arguments, prompts_and_reference, status  # noqa: E402
from moe_common import model_source, serving  # noqa: E402


def tokens_of(address: str, server: str) -> int:
    st = status(address)
    servers = [s.address for s in st.servers]
    return st.replication.tokens_per_server[servers.index(server)] if server in servers else 0


def run(a) -> dict:
    source = model_source.resolve(a.model, a.cache_dir)
    prompts, reference = prompts_and_reference(source, a)
    logs = tempfile.NamedTemporaryFile("w+", prefix="membership-", suffix=".log", delete=False)
    expert_args = ["--threads", "1", "--drain-timeout-s", "60"]
    stack = start_stack(a.model, 2, cache_dir=a.cache_dir, predictor=False, log_file=logs,
                        gateway_args=["--max-batch-size", str(a.max_batch_size), "--membership-interval-s", "0.5"],
                        expert_args=expert_args)
    load = Load(stack.gateway_address, prompts, a.max_new_tokens, a.clients)
    out: dict = {"model": source.spec, "clients": a.clients, "max_new_tokens": a.max_new_tokens,
                 "max_batch_size": a.max_batch_size, "logs": logs.name}
    try:
        load.start()
        time.sleep(a.hold_s)
        # 1. a third server joins.
        port = serving.pick_free_port()
        newcomer = f"127.0.0.1:{port}"
        t_spawn = time.monotonic()
        proc = spawn_expert_server(source.path, "127.0.0.1", port, [*expert_args, "--register-with", stack.admin_address],
                                   log_file=logs)
        stack.processes.append(proc)
        while tokens_of(stack.gateway_address, newcomer) == 0:
            if proc.poll() is not None or time.monotonic() - t_spawn > 600:
                raise RuntimeError(f"the new expert server did not take traffic; see {logs.name}")
            time.sleep(0.02)
        out["join_time_to_traffic_s"] = time.monotonic() - t_spawn
        print(f"joined: {newcomer} took traffic {out['join_time_to_traffic_s']:.2f} s after its process started", flush=True)
        time.sleep(a.hold_s)
        # 2. one of the first servers leaves (SIGTERM: it drains).
        leaving, leaving_proc = stack.expert_addresses[0], stack.processes[0]
        t_term = time.monotonic()
        leaving_proc.send_signal(signal.SIGTERM)
        leaving_proc.wait(timeout=120)
        out["leave_exit_code"] = leaving_proc.returncode
        t_left = time.monotonic()
        out["leave_time_to_exit_s"] = t_left - t_term
        print(f"left: {leaving} exited with code {leaving_proc.returncode} "
              f"{out['leave_time_to_exit_s']:.2f} s after SIGTERM", flush=True)
        time.sleep(a.hold_s)
    finally:
        load.stop()
        final = None
        try:
            final = status(stack.gateway_address)
        finally:
            stack.stop()
    results = load.results
    failed = [r for r in results if r[4]]
    differing = [r for r in results if not r[4] and r[3] != reference[r[2]]]
    out.update(
        requests=len(results), failed=len(failed), differing=len(differing),
        # Requests in flight while the server joined, and while the other one drained.
        requests_during_join=sum(1 for r in results if r[0] < t_spawn + out["join_time_to_traffic_s"] and r[1] > t_spawn),
        requests_during_leave=sum(1 for r in results if r[0] < t_left and r[1] > t_term),
        identical_to_reference=not differing and bool(results),
        failures=sorted({r[4] for r in failed})[:5],
        servers_after=[s.address for s in final.servers],
        tokens_per_server_after=list(final.replication.tokens_per_server),
        changes=[{"servers": list(c.servers), "experts_moved": c.experts_moved, "load_s": c.load_s,
                  "drain_s": c.drain_s, "total_s": c.total_s} for c in final.membership_changes],
        requests_per_s=len(results) / (max(r[1] for r in results) - min(r[0] for r in results)) if results else 0.0,
    )
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base-e32-l4")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    add_arguments(p, clients=4)
    p.add_argument("--max-batch-size", type=int, default=1)
    p.add_argument("--hold-s", type=float, default=5.0, help="seconds of load before, between and after the changes")
    p.add_argument("--json", type=Path, default=None)
    a = p.parse_args(argv)
    out = run(a)
    print(f"{out['requests']} requests ({out['requests_per_s']:.1f}/s) from {a.clients} clients: "
          f"{out['failed']} failed, {out['differing']} differ from the single-process model", flush=True)
    for c in out["changes"]:
        print(f"  change -> {len(c['servers'])} servers: {c['experts_moved']} experts moved, load {c['load_s']:.2f} s, "
              f"drain {c['drain_s']:.3f} s, total {c['total_s']:.2f} s", flush=True)
    print(f"  tokens per server after: {dict(zip(out['servers_after'], out['tokens_per_server_after']))}", flush=True)
    if out["failures"]:
        print(f"  failures: {out['failures']}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if out["failed"] == 0 and out["identical_to_reference"] and out.get("leave_exit_code") == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
