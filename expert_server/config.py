"""The expert server's one validated config object."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from expert_server.kernels import KERNELS
from moe_common.metrics import check_port as check_metrics_port
from moe_common.model_source import DEFAULT_CACHE_DIR
from moe_common.tls import PLAINTEXT, TlsConfig

GROUP_EXECUTORS = ("sequential", "threads", "streams")  # streams: CUDA only


@dataclass
class ExpertServerConfig:
    # --- model ---
    model: str  # --model: checkpoint directory, hub id or preset
    cache_dir: Path = DEFAULT_CACHE_DIR
    # --- serving ---
    host: str = "127.0.0.1"
    port: int = 0
    max_workers: int = 16  # gRPC handler threads
    # Accept hidden states in shared memory from a gateway on this host (moe_common/shm.py).
    shared_memory: bool = True
    # ...and take their RunExperts calls over a Unix socket rather than gRPC (moe_common/lane.py).
    local_lane: bool = True
    # --- compute ---
    device: str = "cpu"  # "cpu" or "cuda" / "cuda:N"
    dtype: str = "float32"  # compute dtype of the expert weights
    # How the groups (experts) of one RunExperts call are run: one after another with
    # all intra-op threads, or concurrently on a thread pool. benchmarks/expert_groups.py measures both.
    group_executor: str = "sequential"
    # The expert FFN kernel (expert_server/kernels.py): "exact" is bit-identical to HF;
    # "grouped" runs one grouped GEMM per projection over the layer's stacked experts
    # (opt-in: not bit-exact, bf16 on CUDA, and a second copy of the weights).
    expert_kernel: str = "exact"
    # torch intra-op threads; 0 keeps torch's default (all cores). Several servers on one
    # machine should split the cores between them rather than oversubscribe.
    threads: int = 0
    # Memory for replicas of other servers' experts, in bytes (0 = no replicas).
    replica_memory: int = 0
    tls: TlsConfig = PLAINTEXT  # serving, and fetching replicas from other servers
    metrics_port: int = 0  # Prometheus /metrics on host:metrics_port (expert_server/metrics.py); 0 = off
    # --- experts held at start; the gateway may assign others later ---
    # "" = none until assigned; "all"; or "L:E,L:E-E,..." (layer:expert or layer:first-last).
    experts: str = ""
    # Or a shard of the default home placement: (index, count).
    shard: tuple[int, int] | None = None
    # --- membership (gateway/membership.py) ---
    register_with: str = ""  # the gateway's admin address (--admin-port) to join at start (and leave at shutdown)
    advertise: str = ""  # host:port the gateway should call; default: --host:--port
    # On SIGTERM: NOT_SERVING, then serve on until the gateway moved the home experts
    # away (it is given none), at most this long.
    drain_timeout_s: float = 60.0
    # ...but stop sooner once no call has arrived for this long: no gateway is using the
    # server (the gateway's health watch calls every --membership-interval-s, 1 s).
    drain_quiet_s: float = 2.5
    # --- testing ---
    # Every AssignExperts or SetReplicas that loads experts first waits this long, as a slow disk or a
    # checkpoint of real size would make it; fault tests widen races with it.
    simulate_load_delay_s: float = 0.0
    preload: list[tuple[int, int]] = field(default_factory=list, init=False)

    def __post_init__(self):
        if self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, not {self.device!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be float32, float16 or bfloat16, not {self.dtype!r}")
        if self.group_executor not in GROUP_EXECUTORS:
            raise ValueError(f"--group-executor must be one of {GROUP_EXECUTORS}")
        if self.expert_kernel not in KERNELS:
            raise ValueError(f"--expert-kernel must be one of {KERNELS}, not {self.expert_kernel!r}")
        if self.expert_kernel == "grouped" and self.group_executor != "sequential":
            raise ValueError(f"--group-executor {self.group_executor} runs the groups of --expert-kernel exact; "
                             "grouped runs a call as one GEMM per projection")
        if self.group_executor == "streams" and not self.device.startswith("cuda"):
            raise ValueError("--group-executor streams puts a call's expert groups on CUDA streams: it needs --device cuda")
        if self.replica_memory < 0:
            raise ValueError("--replica-memory must be >= 0")
        if self.simulate_load_delay_s < 0:
            raise ValueError("--simulate-load-delay-s must be >= 0")
        if self.threads < 0:
            raise ValueError("--threads must be >= 0")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port} is out of range")
        if self.shard is not None and not 0 <= self.shard[0] < self.shard[1]:
            raise ValueError(f"--shard {self.shard[0]}/{self.shard[1]}: need 0 <= index < count")
        if self.experts and self.shard is not None:
            raise ValueError("give --experts or --shard, not both")
        if self.drain_timeout_s < 0 or self.drain_quiet_s < 0:
            raise ValueError("--drain-timeout-s and --drain-quiet-s must be >= 0")
        if self.register_with and ":" not in self.register_with:
            raise ValueError(f"--register-with must be host:port, not {self.register_with!r}")
        if self.experts not in ("", "all"):
            parse_expert_list(self.experts)  # fail now, not after loading the model
        self.tls.check_bind(self.host, "the expert server")
        check_metrics_port(self.metrics_port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def advertised(self, port: int) -> str:
        """The address other processes reach this server at, once bound to `port`."""
        if self.advertise:
            return self.advertise
        if self.host in ("0.0.0.0", "::", "[::]"):
            raise ValueError("bound to all interfaces: give --advertise HOST:PORT for --register-with")
        return f"{self.host}:{port}"


def parse_bytes(text: str) -> int:
    """"2GB" -> 2_000_000_000, "512MiB" -> 536_870_912, "1000" -> 1000."""
    m = re.fullmatch(r"\s*([0-9.]+)\s*([kmgt]?i?b?)?\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a size like 1000, 500MB or 2GiB")
    unit = (m[2] or "").rstrip("b")
    scale = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
    if unit not in scale:
        raise ValueError(f"{text!r}: unknown unit")
    return int(float(m[1]) * scale[unit])


def parse_expert_list(text: str) -> list[tuple[int, int]]:
    """"0:1,0:4-6,2:0" -> [(0, 1), (0, 4), (0, 5), (0, 6), (2, 0)]."""
    out: list[tuple[int, int]] = []
    for item in filter(None, (s.strip() for s in text.split(","))):
        m = re.fullmatch(r"(\d+):(\d+)(?:-(\d+))?", item)
        if not m:
            raise ValueError(f"--experts item {item!r} is not LAYER:EXPERT or LAYER:FIRST-LAST")
        layer, first = int(m[1]), int(m[2])
        last = int(m[3]) if m[3] else first
        if last < first:
            raise ValueError(f"--experts item {item!r}: range runs backwards")
        out.extend((layer, e) for e in range(first, last + 1))
    return out
