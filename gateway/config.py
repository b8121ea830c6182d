"""The gateway's one validated config object."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from gateway.replication import POLICIES
from moe_common.auth import is_loopback
from moe_common.metrics import check_port as check_metrics_port
from moe_common.model_source import DEFAULT_CACHE_DIR
from moe_common.tensor_codec import WIRE_DTYPES
from moe_common.tls import PLAINTEXT, TlsConfig

# How requests are batched: static (gateway/batcher.py: a batch runs HF generate() to its
# end) or continuous (gateway/scheduler.py: rows join and leave the batch at every step).
SCHEDULERS = ("static", "continuous")

# How hidden states reach expert servers (gateway/transport.py): shared memory where a
# server can map this gateway's memory and bytes elsewhere, always shared memory, or bytes.
TRANSPORTS = ("auto", "shm", "grpc")
# Room beyond the prompts on the client port (parameters, names, metadata of a request).
CLIENT_MESSAGE_MARGIN = 1 << 20


@dataclass
class GatewayConfig:
    # --- model ---
    model: str  # --model: checkpoint directory, hub id or preset
    expert_servers: list[str] = field(default_factory=list)  # host:port of each expert server, placement order
    # --- membership (gateway/membership.py) ---
    expert_discovery: str = ""  # host:port of a DNS name re-resolved for expert servers (headless Service)
    membership_interval_s: float = 1.0  # how often discovery and the health watch run
    evict_after_s: float = 10.0  # an unreachable member's experts move to the others after this long
    join_timeout_s: float = 10.0  # how long a joining server may take to answer SERVING
    cache_dir: Path = DEFAULT_CACHE_DIR
    model_name: str = "switch"  # name clients use (Open Inference Protocol model name)
    # --- serving ---
    host: str = "127.0.0.1"
    port: int = 0
    max_workers: int = 64  # gRPC handler threads: each in-flight request holds one while it waits
    # --- batching ---
    max_batch_size: int = 8  # prompts per forward batch (a bigger single request runs alone)
    max_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    max_prompts_per_request: int = 64
    max_queued_prompts: int = 1024  # beyond it new requests get RESOURCE_EXHAUSTED
    scheduler: str = "continuous"  # continuous | static (SCHEDULERS)
    max_batch_tokens: int = 4096  # continuous: prompt tokens per admission step (the oldest prompt always fits)
    admission_wait_steps: int = 16  # continuous: decode steps waiting rows may wait to share an encoder pass
    # --- limits ---
    max_input_tokens: int = 512
    max_new_tokens_limit: int = 512
    default_max_new_tokens: int = 32
    # --- forecasts and traces ---
    predictor: str = ""  # host:port of the predictor service; "" = no forecasts
    predictor_timeout_ms: float = 50.0  # deadline of one forecast call
    record_traces: Path | None = None  # append every pass's routing to this trace directory
    # --- replication ---
    replication: str = "off"  # off | reactive | window | predictive (gateway/replicas.py)
    replica_policy: str = "whole"  # whole: bit-identical outputs; split: also splits one expert's tokens; auto: per layer
    replication_window: int = 8  # batches per plan and history length of "window"
    replication_min_gain: float = 0.02  # keep the previous plan unless the new one gains this share
    # Fixed cost of one expert group in tokens' worth (gateway/replication.py): 0 on CPUs;
    # group_s / token_s of benchmarks/gpu_costs.py on a launch-bound GPU (~190 on an H200).
    replica_group_cost: float = 0.0
    # auto: expert servers say which cores they share (GetInfo) and the planner bounds a
    # layer by a shared host's work; off: plan as if every server had cores of its own.
    replica_sharing: str = "auto"
    redundancy: int = 1  # servers holding each logical expert: home + (redundancy - 1) standby replicas
    # --- the model the gateway holds (everything but the experts) ---
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str = "float32"  # only float32 reproduces the float32 checkpoint exactly
    # --- expert path ---
    wire_dtype: str = "float32"  # hidden states on the wire; only float32 is exact
    transport: str = "auto"  # auto | shm | grpc: how hidden states reach servers (gateway/transport.py)
    local_lane: bool = True  # shm calls' control messages over a server's Unix socket when it offers one
    expert_timeout_s: float = 60.0  # deadline of one RunExperts call
    startup_timeout_s: float = 600.0  # waiting for expert servers to be SERVING and load their experts
    tls: TlsConfig = PLAINTEXT  # the client-facing port and the channels to expert servers and predictor
    # --- security (moe_common/auth.py; README "Security") ---
    # The admin port serves MembershipService (and a full GetStatus): whatever changes the
    # deployment. It is a cluster-plane server: loopback by default, the cluster token
    # and peer allow-list of `tls` apply. Port 0: any free one (logged).
    admin_host: str = "127.0.0.1"
    admin_port: int = 0
    api_keys_file: Path | None = None  # client port: one key per line, reloaded on SIGHUP; None = open
    api_key_rate_per_s: float = 0.0  # per key; 0 = no limit
    api_key_max_concurrent: int = 0  # requests in flight per key; 0 = no limit
    # GetStatus on the client port: "full", or "public" without the internal addresses of
    # expert servers and predictor; "auto" = full when the client port is on loopback.
    client_status: str = "auto"
    metrics_port: int = 0  # Prometheus /metrics on host:metrics_port (gateway/metrics.py); 0 = off

    def __post_init__(self):
        if not self.expert_servers and not self.expert_discovery:
            raise ValueError("give the expert servers (--expert-servers host:port,...) or --expert-discovery NAME:PORT")
        if self.membership_interval_s <= 0 or self.evict_after_s < 0 or self.join_timeout_s <= 0:
            raise ValueError("need --membership-interval-s > 0, --evict-after-s >= 0 and --join-timeout-s > 0")
        if len(set(self.expert_servers)) != len(self.expert_servers):
            raise ValueError(f"expert servers listed twice: {self.expert_servers}")
        if self.wire_dtype not in WIRE_DTYPES:
            raise ValueError(f"--wire-dtype must be one of {sorted(WIRE_DTYPES)}")
        if self.transport not in TRANSPORTS:
            raise ValueError(f"--transport must be one of {TRANSPORTS}")
        if self.device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", self.device):
            raise ValueError(f"--device must be cpu, cuda or cuda:N, not {self.device!r}")
        if self.dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"--dtype must be float32, float16 or bfloat16, not {self.dtype!r}")
        if self.max_batch_size < 1:
            raise ValueError("--max-batch-size must be >= 1")
        if self.max_prompts_per_request < 1 or self.max_queued_prompts < self.max_prompts_per_request:
            raise ValueError("need 1 <= --max-prompts-per-request <= --max-queued-prompts")
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"--scheduler must be one of {SCHEDULERS}, not {self.scheduler!r}")
        if self.max_batch_tokens < 1:
            raise ValueError("--max-batch-tokens must be >= 1")
        if self.admission_wait_steps < 0:
            raise ValueError("--admission-wait-steps must be >= 0")
        if self.max_wait_ms < 0:
            raise ValueError("--max-wait-ms must be >= 0")
        if not 0 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError("--default-max-new-tokens must be within 0..--max-new-tokens-limit")
        if self.replication not in ("off", "reactive", "window", "predictive"):
            raise ValueError("--replication must be off, reactive, window or predictive")
        if self.replica_policy not in POLICIES:
            raise ValueError(f"--replica-policy must be one of {', '.join(POLICIES)}")
        if self.replication == "predictive" and not self.predictor:
            raise ValueError("--replication predictive needs --predictor")
        if self.replica_sharing not in ("auto", "off"):
            raise ValueError("--replica-sharing must be auto or off")
        if self.replica_group_cost < 0:
            raise ValueError("--replica-group-cost must be >= 0")
        check_metrics_port(self.metrics_port)
        if self.redundancy < 1:
            raise ValueError("--redundancy must be >= 1")
        if self.replication_window < 1:
            raise ValueError("--replication-window must be >= 1")
        if self.predictor_timeout_ms <= 0:
            raise ValueError("--predictor-timeout-ms must be > 0")
        if self.max_input_tokens < 1:
            raise ValueError("--max-input-tokens must be >= 1")
        if not 0 <= self.port < 65536:
            raise ValueError(f"--port {self.port} is out of range")
        if not 0 <= self.admin_port < 65536:
            raise ValueError(f"--admin-port {self.admin_port} is out of range")
        if self.admin_port and self.admin_port == self.port and self.admin_host == self.host:
            raise ValueError("--admin-port must differ from --port: clients must not reach the control plane")
        if self.client_status not in ("auto", "full", "public"):
            raise ValueError("--client-status must be auto, full or public")
        if self.api_key_rate_per_s < 0 or self.api_key_max_concurrent < 0:
            raise ValueError("--api-key-rate-per-s and --api-key-max-concurrent must be >= 0 (0: no limit)")
        self.tls.check_bind(self.admin_host, "the gateway's admin port")

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def admin_address(self) -> str:
        return f"{self.admin_host}:{self.admin_port}"

    @property
    def public_status(self) -> bool:
        """Whether the client port's GetStatus leaves out internal addresses."""
        return self.client_status == "public" or (self.client_status == "auto" and not is_loopback(self.host))

    @property
    def client_max_message_bytes(self) -> int:
        """The client port's message limit: the largest legal request or reply, not 1 GiB.
        A prompt or generation of n tokens is at most n int64s as ids (OIP INT64, 8 bytes)
        or about n * 32 bytes of UTF-8 text (a sentencepiece token is a short piece of at
        most a few 4-byte characters); twice that covers both forms and protobuf framing."""
        tokens = max(self.max_input_tokens, self.max_new_tokens_limit)
        return self.max_prompts_per_request * tokens * 64 + CLIENT_MESSAGE_MARGIN
