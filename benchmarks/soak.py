"""Soak: a moe-serve stack under load for N minutes while expert servers crash, restart,
join and leave on a schedule; every reply checked, memory and file descriptors watched.

    python benchmarks/soak.py --minutes 20 --json benchmarks/results/soak.json --plot docs/bench/soak.png

Drives the gateway with --clients closed-loop clients and, meanwhile:
  - every --kill-every-s: SIGKILL one expert server (moe-serve restarts it on its address);
  - every --churn-every-s: alternately add an expert server (SIGUSR1 to moe-serve: it
    joins) and remove the newest (SIGUSR2: it drains and leaves).
Every reply is compared with the single-process HF model on the same prompt (the
gateway runs --max-batch-size 1). Every --sample-s the resident memory (RSS) and open
file descriptors of every process of the stack are sampled. The long-lived ones
(moe-serve, the gateway, the predictor, and expert servers never killed) must end
within --rss-tolerance of their RSS right after warm-up (medians of three samples),
and hold no more file descriptors at most in the last quarter of the run than at most
in the quarter after warm-up (the count moves with the membership: one channel per
expert server). Writes JSON and a PNG of memory over time; --from-json re-checks and
re-plots a saved run.
Exit status 1 if any request failed or differed, or a check did not hold.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import psutil  # noqa: E402

from crash import MoeServe  # noqa: E402
from loadgen import Load, add_arguments, prompts_and_reference, save_figure, status  # noqa: E402
from moe_common import model_source, serving  # noqa: E402


def role_of(proc: psutil.Process) -> str | None:
    """'gateway', 'predictor', 'expert_server' or None, from `python -m MODULE ...`."""
    try:
        cmd = proc.cmdline()
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    if cmd[1:2] == ["-m"] and cmd[2:3] and cmd[2] in ("gateway", "predictor_service", "expert_server"):
        return {"predictor_service": "predictor"}.get(cmd[2], cmd[2])
    return None


class Sampler:
    """RSS and open file descriptors of moe-serve and each of its children, every period_s."""

    def __init__(self, root_pid: int, period_s: float, t0: float):
        self.root = psutil.Process(root_pid)
        self.period_s = period_s
        self.t0 = t0
        self.samples: dict[int, dict] = {}  # pid -> {"role", "t": [], "rss_mb": [], "fds": []}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self):
        self._thread.start()

    def stop(self):
        self._stop.set()
        self._thread.join()

    def _run(self):
        while not self._stop.wait(self.period_s):
            now = time.monotonic() - self.t0
            procs = [(self.root, "moe-serve")]
            try:
                procs += [(c, role_of(c)) for c in self.root.children()]
            except psutil.NoSuchProcess:
                return
            for proc, role in procs:
                if role is None:
                    continue
                try:
                    with proc.oneshot():
                        rss, fds = proc.memory_info().rss / 1e6, proc.num_fds()
                except (psutil.NoSuchProcess, psutil.ZombieProcess):
                    continue
                s = self.samples.setdefault(proc.pid, {"role": role, "t": [], "rss_mb": [], "fds": []})
                s["t"].append(now)
                s["rss_mb"].append(rss)
                s["fds"].append(fds)


def stable(samples: dict, start_s: float, end_s: float) -> dict:
    """Per long-lived process (sampled from before start_s to after end_s): RSS right
    after warm-up vs at the end (medians of three samples), and the most file
    descriptors in the quarter after warm-up vs in the last quarter."""
    out = {}
    quarter = (end_s - start_s) / 4
    for pid, s in samples.items():
        t = np.array(s["t"])
        if len(t) < 6 or t[0] > start_s or t[-1] < end_s:
            continue  # started or ended during the run (killed, restarted, joined, left)
        after = np.nonzero(t >= start_s)[0][:3]
        rss0, rss1 = float(np.median(np.array(s["rss_mb"])[after])), float(np.median(s["rss_mb"][-3:]))
        fds = np.array(s["fds"])
        fd0 = int(fds[(t >= start_s) & (t < start_s + quarter)].max())
        fd1 = int(fds[t >= end_s - quarter].max())
        out[str(pid)] = {"role": s["role"], "rss_after_warmup_mb": rss0, "rss_end_mb": rss1,
                         "rss_change": rss1 / rss0 - 1, "fds_after_warmup": fd0, "fds_end": fd1}
    return out


def run(a) -> dict:
    source = model_source.resolve(a.model, a.cache_dir)
    prompts, reference = prompts_and_reference(source, a)
    logs = tempfile.NamedTemporaryFile("w+", prefix="soak-", suffix=".log", delete=False)
    stack = MoeServe(a.model, a.servers, a.cache_dir, serving.pick_free_port(), logs,
                     ["--log-level", "WARNING", "--restart-limit", "1000"], predictor=True)
    t0 = time.monotonic()
    sampler = Sampler(stack.proc.pid, a.sample_s, t0)
    load = Load(stack.address, prompts, a.max_new_tokens, a.clients)
    events: list[tuple[float, str]] = []
    duration = a.minutes * 60
    out: dict = {"model": source.spec, "minutes": a.minutes, "servers": a.servers, "clients": a.clients,
                 "kill_every_s": a.kill_every_s, "churn_every_s": a.churn_every_s, "logs": logs.name}
    try:
        sampler.start()
        load.start()
        next_kill, next_churn, adding, kills = a.kill_every_s, a.churn_every_s, True, 0
        while (now := time.monotonic() - t0) < duration:
            if now >= next_kill:
                servers = stack.expert_servers()
                if servers:
                    pid, address = servers[kills % len(servers)]
                    psutil.Process(pid).kill()
                    events.append((now, f"kill {address}"))
                    kills += 1
                next_kill += a.kill_every_s
            if now >= next_churn:
                stack.proc.send_signal(signal.SIGUSR1 if adding else signal.SIGUSR2)
                events.append((now, "join" if adding else "leave"))
                adding = not adding
                next_churn += a.churn_every_s
            if int(now) % 60 == 0:
                done = len(load.results)
                print(f"{now / 60:.0f}/{a.minutes} min: {done} requests, "
                      f"{sum(1 for r in load.results if r[4])} failed, {len(events)} events", flush=True)
            time.sleep(1.0)
        final = status(stack.address)
    finally:
        load.stop()
        sampler.stop()
        stack.stop()
    results = load.results
    failed = [r for r in results if r[4]]
    differing = [r for r in results if not r[4] and r[3] != reference[r[2]]]
    out.update(samples={str(pid): s for pid, s in sampler.samples.items()})
    out.update(
        requests=len(results), failed=len(failed), differing=len(differing),
        identical_to_reference=not differing and bool(results),
        failures=sorted({r[4] for r in failed})[:5], events=events,
        servers_after=[s.address for s in final.servers], membership_changes=final.membership_changes_total,
        suspects=final.expert_path.suspects, stand_in_loads=final.expert_path.stand_in_loads,
    )
    return check(out, a)


def check(out: dict, a) -> dict:
    """The memory and file-descriptor checks over the samples of a run."""
    end = out["minutes"] * 60 - a.sample_s
    out["long_lived"] = checks = stable(out["samples"], a.warmup_s, end)
    out["rss_within_tolerance"] = all(abs(c["rss_change"]) <= a.rss_tolerance for c in checks.values())
    out["fds_not_grown"] = all(c["fds_end"] <= c["fds_after_warmup"] for c in checks.values())
    return out


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for pid, s in out["samples"].items():
        long_lived = pid in out["long_lived"]
        ax.plot(np.array(s["t"]) / 60, s["rss_mb"], linewidth=1.5 if long_lived else 0.6,
                alpha=1.0 if long_lived else 0.4, label=f"{s['role']} {pid}" if long_lived else None)
    for t, what in out["events"]:
        ax.axvline(t / 60, color="red" if what.startswith("kill") else "gray", linewidth=0.5, alpha=0.5)
    ax.set_xlabel("minutes (red: an expert server killed; gray: one joined or left)")
    ax.set_ylabel("RSS (MB)")
    ax.set_title(f"soak: {out['model']}, {out['requests']} requests, {out['failed']} failed, "
                 f"{out['differing']} differing; thin lines: processes killed, restarted, joined or left", fontsize=8)
    ax.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    p.add_argument("--minutes", type=float, default=20)
    p.add_argument("--servers", type=int, default=3)
    add_arguments(p, clients=4)
    p.add_argument("--kill-every-s", type=float, default=60)
    p.add_argument("--churn-every-s", type=float, default=90)
    p.add_argument("--sample-s", type=float, default=5)
    p.add_argument("--warmup-s", type=float, default=120, help="RSS and fds are compared from here on")
    p.add_argument("--rss-tolerance", type=float, default=0.05)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    p.add_argument("--from-json", type=Path, default=None, help="re-check and re-plot a saved run instead of running")
    a = p.parse_args(argv)
    out = check(json.loads(a.from_json.read_text()), a) if a.from_json else run(a)
    print(f"{out['requests']} requests from {a.clients} clients over {a.minutes} min with {len(out['events'])} events: "
          f"{out['failed']} failed, {out['differing']} differ from the single-process model", flush=True)
    for pid, c in out["long_lived"].items():
        print(f"  {c['role']:>13} {pid}: RSS {c['rss_after_warmup_mb']:.0f} -> {c['rss_end_mb']:.0f} MB "
              f"({c['rss_change']:+.1%}), most fds {c['fds_after_warmup']} -> {c['fds_end']}", flush=True)
    print(f"  RSS within {a.rss_tolerance:.0%}: {out['rss_within_tolerance']}; fds not grown: {out['fds_not_grown']}",
          flush=True)
    if out["failures"]:
        print(f"  failures: {out['failures']}", flush=True)
    if a.json:
        a.json.parent.mkdir(parents=True, exist_ok=True)
        a.json.write_text(json.dumps(out, indent=2) + "\n")
    if a.plot:
        plot(out, a.plot)
    ok = out["failed"] == 0 and out["identical_to_reference"] and out["rss_within_tolerance"] and out["fds_not_grown"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
