"""A gateway restarted over expert servers that already hold their experts: time to SERVING.

    python benchmarks/gateway_restart.py --model base-e32-l4 --servers 3

Starts --servers expert servers, then a gateway, stops it, and starts a second gateway
over the same servers. Prints for each gateway the seconds from its process start to
SERVING and its own log line on how many experts it loaded and how many it adopted
(assigning experts is idempotent: the second gateway should load none).
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gateway.launcher import spawn_expert_server, spawn_gateway, wait_ready  # noqa: E402
from moe_common import model_source, serving  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="base-e32-l4")
    p.add_argument("--cache-dir", type=Path, default=model_source.DEFAULT_CACHE_DIR)
    p.add_argument("--servers", type=int, default=3)
    a = p.parse_args(argv)
    source = model_source.resolve(a.model, a.cache_dir)
    procs, addresses = [], []
    try:
        for _ in range(a.servers):
            port = serving.pick_free_port()
            procs.append(spawn_expert_server(source.path, "127.0.0.1", port, ["--threads", "1"]))
            addresses.append(f"127.0.0.1:{port}")
        for proc, address in zip(procs, addresses):
            wait_ready(proc, address, 600)
        for run in ("first", "restarted"):
            port = serving.pick_free_port()
            with tempfile.NamedTemporaryFile("w+", prefix="gateway-", suffix=".log") as log:
                t0 = time.monotonic()
                gateway = spawn_gateway(source.path, "127.0.0.1", port, addresses, log_file=log)
                try:
                    wait_ready(gateway, f"127.0.0.1:{port}", 600)
                    serving_s = time.monotonic() - t0
                finally:
                    gateway.terminate()
                    gateway.wait(timeout=60)
                log.seek(0)
                found = re.search(r"hold their home experts \(([\d.]+) s: (\d+) loaded, (\d+) adopted\)", log.read())
            loading = f"{found.group(1)} s loading, {found.group(2)} loaded, {found.group(3)} adopted" if found else "?"
            print(f"{run} gateway: SERVING {serving_s:.1f} s after its process started ({loading})", flush=True)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait(timeout=60)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
