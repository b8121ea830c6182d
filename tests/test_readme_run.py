"""The README's commands run verbatim, in the order the README gives them, on a fresh copy
of the repository with a fresh .venv (issue 15: a newcomer copies them one by one).

The commands are read from the README's fenced blocks (tests/test_readme_commands.py has
the reader); nothing here retypes them. The copy holds the repository's files as git
knows them (tracked and untracked-but-not-ignored, as in the working tree), so no .venv,
cache or build output of this checkout travels along, and `deploy/quickstart.sh` makes
the .venv itself (pip installs from its cache and this machine's wheels; torch pinned to
2.13.0 as the README says).

Bash lines run one at a time in bash, each in the environment the previous one left (so
`source .venv/bin/activate` holds for the lines after it, as in a terminal). A command
that serves (SERVES) runs in the background in its own process group: the test waits
until its port answers SERVING on the health service (and, for the quickstart, until it
printed its demo reply), and stops it as a terminal's Ctrl-C would (SIGINT to the group),
before a later command needs its port and at the end, also on failure; it must exit 0.
Python blocks run as they are with the .venv's python, against whatever serves on
127.0.0.1:50051 by then (the by-hand gateway of "Running it").

The README's ports (50051, 50061, 50062) are used as written, so they must be free on this
machine; the test fails naming the port when one is not.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import yaml

from moe_common.serving import wait_for_serving
from tests.test_readme_commands import ROOT, readme_blocks

# README commands this test does not run, each matched by a regular expression, and why.
# Keep it short: a command left out here is a command a newcomer runs unchecked.
SKIP = {
    r"\.\.\.|<[a-z -]+>|/path/to/": "a placeholder the reader fills in (`...`, `<pid>`, `/path/to/`)",
    r"^\.ci/run|^python -m pytest": "runs the whole test suite, this test included (it is what CI runs)",
    r"^moe-predictor (collect|train|eval)": "minutes on this CPU (tests/test_predictor.py collects, trains and "
                                            "evaluates on a small trace)",
    r"forecaster\.pt": "needs the forecaster `moe-predictor train` writes (skipped above)",
    r"^(python |bash )?benchmarks/|^moe-bench": "benchmarks run for minutes (tests/test_bench.py runs a whole "
                                                "moe-bench on the tiny preset)",
    r"^grpcurl": "grpcurl is a Go binary that neither the install nor .ci/run provides",
}

# Commands that serve until stopped: moe-serve and the quickstart run a whole stack.
SERVES = ("deploy/quickstart.sh", "deploy/local/run.sh", "moe-serve", "moe-gateway", "moe-expert-server")
# What a serving command must have printed, beyond SERVING on its port, before it counts as
# started: moe-serve's banner comes once every process it starts is up (its gateway answers
# SERVING a moment before, and a Ctrl-C in between stops a stack still starting, exit 130);
# the quickstart's demo reply comes after that banner.
PRINTS = {"deploy/quickstart.sh": "demo request: ", "moe-serve": "Ctrl-C stops every process"}
START_TIMEOUT_S = 900  # the quickstart creates the .venv and installs into it first
HOST = "127.0.0.1"


def skip_reason(command: str) -> str | None:
    return next((why for pattern, why in SKIP.items() if re.search(pattern, command)), None)


def steps() -> list[tuple[str, str]]:
    """(kind, text) in README order: ("bash", one command line, continuations joined,
    comment kept) or ("python", a whole block)."""
    out = []
    for lang, body in readme_blocks():
        if lang == "python":
            out.append(("python", body))
            continue
        for line in body.replace("\\\n", " ").splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                out.append(("bash", line.strip()))
    return out


def test_every_skip_rule_matches_a_readme_command():
    """The table stays honest: a rule that matches nothing is stale and goes."""
    commands = [text for kind, text in steps() if kind == "bash"]
    for pattern in SKIP:
        assert any(re.search(pattern, c) for c in commands), f"no README command matches {pattern!r}"
    assert any(c.startswith("deploy/quickstart.sh") for c in commands)
    assert sum(kind == "python" for kind, _ in steps()) >= 2


def served_port(words: list[str], root: Path) -> int:
    """The port a serving command answers on: its --port, else its --config file's, else
    deploy/local/stack.yaml's (which the quickstart and run.sh pass, and which holds
    moe-serve's defaults)."""
    if "--port" in words:
        return int(words[words.index("--port") + 1])
    config = words[words.index("--config") + 1] if "--config" in words else "deploy/local/stack.yaml"
    return int(yaml.safe_load((root / config).read_text())["port"])


def fresh_copy(dest: Path) -> Path:
    """The working tree's files that git tracks or would track, copied to dest."""
    names = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           check=True, capture_output=True).stdout.decode().split("\0")
    for name in filter(None, names):
        src = ROOT / name
        if src.is_file():  # a file deleted in the working tree is not there to copy
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            (dest / name).write_bytes(src.read_bytes())
            os.chmod(dest / name, src.stat().st_mode)
    return dest


def newcomer_env() -> dict[str, str]:
    """This environment without the virtual environment pytest runs in: a shell where only
    the system's python3 is on PATH, as on the README's fresh machine."""
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    ours = {str(Path(sys.prefix) / "bin"), str(Path(sys.executable).parent)}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p not in ours)
    return env


class Shell:
    """Runs README lines in `root` one by one, carrying the environment from line to line."""

    def __init__(self, root: Path, logs: Path):
        self.root, self.logs, self.env = root, logs, newcomer_env()
        self.serving: list[tuple[str, int, subprocess.Popen, Path]] = []  # (command, port, process, log)
        self.n = 0

    def _log(self) -> Path:
        self.n += 1
        return self.logs / f"{self.n:02d}.log"

    def run(self, line: str, timeout_s: float) -> None:
        env_file = self.logs / "env"
        script = f"{line}\n__rc=$?\nenv -0 > {shlex.quote(str(env_file))}\nexit $__rc\n"
        log = self._log()
        with log.open("w") as out:
            done = subprocess.run(["bash", "-c", script], cwd=self.root, env=self.env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout_s)
        text = log.read_text()
        assert done.returncode == 0, f"`{line}` exited {done.returncode}:\n{text[-4000:]}"
        assert "Traceback" not in text, f"`{line}`:\n{text[-4000:]}"
        self.env = dict(kv.split("=", 1) for kv in env_file.read_text().split("\0") if "=" in kv)

    def python(self, code: str, timeout_s: float) -> str:
        log = self._log()
        with log.open("w") as out:
            # `python` is looked up on the carried PATH: the activated .venv's.
            done = subprocess.run(["python", "-c", code], cwd=self.root, env=self.env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout_s)
        text = log.read_text()
        assert done.returncode == 0, f"README python block exited {done.returncode}:\n{code}\n{text[-4000:]}"
        return text

    def serve(self, line: str) -> None:
        words = shlex.split(line, comments=True)
        port = served_port(words, self.root)
        for entry in [e for e in self.serving if e[1] == port]:  # the README's next stack on the same port
            self.stop(entry)
        assert port_is_free(port), f"port {port} is taken by another process; this test runs the README's " \
                                   "commands as written and needs it"
        log = self._log()
        with log.open("w") as out:
            proc = subprocess.Popen(["bash", "-c", line], cwd=self.root, env=self.env, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)
        self.serving.append((line, port, proc, log))
        deadline = time.monotonic() + START_TIMEOUT_S
        try:
            # The port first: a gRPC channel that failed to connect for a while (the quickstart
            # installs for minutes) backs off up to 2 minutes between tries, and would see
            # SERVING that much late.
            while not port_accepts(port):
                assert proc.poll() is None, f"`{line}` exited {proc.returncode} before it served"
                assert time.monotonic() < deadline, f"`{line}` did not open port {port} in {START_TIMEOUT_S} s"
                time.sleep(0.1)
            wait_for_serving(f"{HOST}:{port}", deadline - time.monotonic(), is_alive=lambda: proc.poll() is None)
            expected = PRINTS.get(words[0])
            while expected and expected not in log.read_text():
                assert proc.poll() is None and time.monotonic() < deadline, f"`{line}` printed no {expected!r}"
                time.sleep(0.2)
        except (RuntimeError, TimeoutError) as e:
            raise AssertionError(f"`{line}`: {e}\n{log.read_text()[-4000:]}") from e

    def stop(self, entry) -> None:
        """Ctrl-C, as in a terminal: SIGINT to the command's process group; it must exit 0."""
        line, port, proc, log = entry
        self.serving.remove(entry)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
        try:
            rc = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise AssertionError(f"`{line}` did not stop on Ctrl-C within 90 s:\n{log.read_text()[-4000:]}")
        text = log.read_text()
        assert rc == 0, f"`{line}` exited {rc} on Ctrl-C:\n{text[-4000:]}"
        assert "Traceback" not in text, f"`{line}`:\n{text[-4000:]}"

    def leftovers(self) -> list[psutil.Process]:
        """Processes still running from the copy (every child runs the copy's .venv python)."""
        found = []
        for p in psutil.process_iter(["cmdline"]):
            try:
                if p.pid != os.getpid() and any(str(self.root) in part for part in p.info["cmdline"] or []):
                    found.append(p)
            except psutil.Error:
                pass
        return found

    def close(self) -> None:
        """Every process the test started ends, also when the test failed (then by SIGKILL)."""
        for _, _, proc, _ in reversed(self.serving):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.serving.clear()
        for p in self.leftovers():
            p.kill()


def port_accepts(port: int) -> bool:
    try:
        socket.create_connection((HOST, port), timeout=1).close()
    except OSError:
        return False
    return True


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        # SO_REUSEADDR as the servers bind: a stopped server's connections in TIME_WAIT do
        # not hold the port, a listener does.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def test_the_readme_runs_verbatim_on_a_fresh_venv(tmp_path):
    root = fresh_copy(tmp_path / "repo")
    logs = tmp_path / "logs"
    logs.mkdir()
    shell = Shell(root, logs)
    ran, skipped, t0 = [], [], time.monotonic()
    try:
        for kind, text in steps():
            if kind == "python":
                shell.python(text, timeout_s=300)
                ran.append(("python block", time.monotonic() - t0))
                continue
            why = skip_reason(text)
            if why:
                skipped.append((text, why))
                continue
            words = shlex.split(text, comments=True)
            if words[0] in SERVES:
                shell.serve(text)
            else:
                shell.run(text, timeout_s=600)
            ran.append((text, time.monotonic() - t0))
        for entry in reversed(list(shell.serving)):
            shell.stop(entry)
        left = shell.leftovers()
        assert not left, f"left running after Ctrl-C: {[p.info['cmdline'] for p in left]}"
    finally:
        shell.close()
        print(f"\nran {len(ran)} README commands, skipped {len(skipped)}, {time.monotonic() - t0:.0f} s:")
        for text, at in ran:
            print(f"  {at:6.0f} s  {text[:100]}")
    assert any(t.startswith("deploy/quickstart.sh") for t, _ in ran)
    assert sum(t == "python block" for t, _ in ran) >= 2
