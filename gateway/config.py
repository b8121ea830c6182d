"""The gateway's one validated config object."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from moe_common.metrics import check_port as check_metrics_port
from moe_common.model_source import DEFAULT_CACHE_DIR
from moe_common.tensor_codec import WIRE_DTYPES
from moe_common.tls import PLAINTEXT, TlsConfig

# How hidden states reach expert servers (gateway/transport.py): shared memory where a
# server can map this gateway's memory and bytes elsewhere, always shared memory, or bytes.
TRANSPORTS = ("auto", "shm", "grpc")


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
    replica_policy: str = "whole"  # whole: bit-identical outputs; split: also splits one expert's tokens
    replication_window: int = 8  # batches per plan and history length of "window"
    replication_min_gain: float = 0.02  # keep the previous plan unless the new one gains this share
    redundancy: int = 1  # servers holding each logical expert: home + (redundancy - 1) standby replicas
    # --- the model the gateway holds (everything but the experts) ---
    device: str = "cpu"  # "cpu", "cuda" or "cuda:N"
    dtype: str = "float32"  # only float32 reproduces the float32 checkpoint exactly
    # --- expert path ---
    wire_dtype: str = "float32"  # hidden states on the wire; only float32 is exact
    transport: str = "auto"  # auto | shm | grpc: how hidden states reach servers (gateway/transport.py)
    expert_timeout_s: float = 60.0  # deadline of one RunExperts call
    startup_timeout_s: float = 600.0  # waiting for expert servers to be SERVING and load their experts
    tls: TlsConfig = PLAINTEXT  # the client-facing port and the channels to expert servers and predictor
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
        if self.max_wait_ms < 0:
            raise ValueError("--max-wait-ms must be >= 0")
        if not 0 <= self.default_max_new_tokens <= self.max_new_tokens_limit:
            raise ValueError("--default-max-new-tokens must be within 0..--max-new-tokens-limit")
        if self.replication not in ("off", "reactive", "window", "predictive"):
            raise ValueError("--replication must be off, reactive, window or predictive")
        if self.replica_policy not in ("whole", "split"):
            raise ValueError("--replica-policy must be whole or split")
        if self.replication == "predictive" and not self.predictor:
            raise ValueError("--replication predictive needs --predictor")
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

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"
