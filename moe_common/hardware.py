"""Which hardware a process computes on, so that a planner can tell which servers share it.

A *compute domain* is a set of processors that processes take turns on: one host's CPUs,
or one GPU. Two expert servers in the same domain do not run a layer faster than the
domain can do their combined work, however evenly the gateway balances them
(gateway.replication.Sharing).
"""

from __future__ import annotations

import os
import socket


def host_id() -> str:
    """An id of this host's running kernel: the same for every process and container on it
    (/proc/sys/kernel/random/boot_id), the host name where that cannot be read."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip()
    except OSError:
        return socket.gethostname()


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask; os.cpu_count() where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def compute_domain(device: str) -> str:
    """The compute domain of a process computing on `device` ("cpu", "cuda", "cuda:N")."""
    if device.startswith("cuda"):
        import torch

        index = int(device.split(":")[1]) if ":" in device else torch.cuda.current_device()
        uuid = getattr(torch.cuda.get_device_properties(index), "uuid", None)
        return f"{host_id()}/gpu-{uuid if uuid is not None else index}"
    return f"{host_id()}/cpu"


def compute_share(device: str, threads: int) -> float:
    """The share of its compute domain a process keeps busy alone: threads over the usable
    CPUs (at most 1) on a CPU. 0 on a GPU, meaning "not a bound": an expert server's
    groups are launch-bound there (0.2 ms of launches per group against microseconds of
    math on an H200, benchmarks/results/h200), so several servers' kernels fit on one GPU
    side by side, and the slowest server, not the GPU, bounds a layer."""
    if device.startswith("cuda"):
        return 0.0
    return min(1.0, threads / usable_cpus())
