from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AddExpertServerRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class RemoveExpertServerRequest(_message.Message):
    __slots__ = ("address",)
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    address: str
    def __init__(self, address: _Optional[str] = ...) -> None: ...

class MembershipChange(_message.Message):
    __slots__ = ("servers", "experts_moved", "load_s", "drain_s", "total_s")
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_MOVED_FIELD_NUMBER: _ClassVar[int]
    LOAD_S_FIELD_NUMBER: _ClassVar[int]
    DRAIN_S_FIELD_NUMBER: _ClassVar[int]
    TOTAL_S_FIELD_NUMBER: _ClassVar[int]
    servers: _containers.RepeatedScalarFieldContainer[str]
    experts_moved: int
    load_s: float
    drain_s: float
    total_s: float
    def __init__(self, servers: _Optional[_Iterable[str]] = ..., experts_moved: _Optional[int] = ..., load_s: _Optional[float] = ..., drain_s: _Optional[float] = ..., total_s: _Optional[float] = ...) -> None: ...

class GenerationParameters(_message.Message):
    __slots__ = ("max_new_tokens", "do_sample", "temperature", "top_k", "top_p", "seed")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DO_SAMPLE_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    seed: int
    def __init__(self, max_new_tokens: _Optional[int] = ..., do_sample: _Optional[bool] = ..., temperature: _Optional[float] = ..., top_k: _Optional[int] = ..., top_p: _Optional[float] = ..., seed: _Optional[int] = ...) -> None: ...

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("model", "prompts", "token_ids", "parameters")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    model: str
    prompts: _containers.RepeatedScalarFieldContainer[str]
    token_ids: _containers.RepeatedCompositeFieldContainer[TokenIds]
    parameters: GenerationParameters
    def __init__(self, model: _Optional[str] = ..., prompts: _Optional[_Iterable[str]] = ..., token_ids: _Optional[_Iterable[_Union[TokenIds, _Mapping]]] = ..., parameters: _Optional[_Union[GenerationParameters, _Mapping]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ns", "first_token_ns", "total_ns", "batch_size")
    QUEUE_NS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_NS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_NS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    queue_ns: int
    first_token_ns: int
    total_ns: int
    batch_size: int
    def __init__(self, queue_ns: _Optional[int] = ..., first_token_ns: _Optional[int] = ..., total_ns: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class Generation(_message.Message):
    __slots__ = ("text", "token_ids", "num_input_tokens", "finish_reason")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    NUM_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    num_input_tokens: int
    finish_reason: str
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ..., num_input_tokens: _Optional[int] = ..., finish_reason: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("generations", "timings")
    GENERATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    generations: _containers.RepeatedCompositeFieldContainer[Generation]
    timings: Timings
    def __init__(self, generations: _Optional[_Iterable[_Union[Generation, _Mapping]]] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class GenerateStreamResponse(_message.Message):
    __slots__ = ("index", "token_id", "text", "finish_reason", "timings")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_id: int
    text: str
    finish_reason: str
    timings: Timings
    def __init__(self, index: _Optional[int] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., finish_reason: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertServerStatus(_message.Message):
    __slots__ = ("address", "healthy", "num_home_experts", "weight_bytes", "device", "tokens", "compute_ns", "suspect")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    NUM_HOME_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_FIELD_NUMBER: _ClassVar[int]
    address: str
    healthy: bool
    num_home_experts: int
    weight_bytes: int
    device: str
    tokens: int
    compute_ns: int
    suspect: bool
    def __init__(self, address: _Optional[str] = ..., healthy: _Optional[bool] = ..., num_home_experts: _Optional[int] = ..., weight_bytes: _Optional[int] = ..., device: _Optional[str] = ..., tokens: _Optional[int] = ..., compute_ns: _Optional[int] = ..., suspect: _Optional[bool] = ...) -> None: ...

class ExpertPathStats(_message.Message):
    __slots__ = ("layer_calls", "rpcs", "tokens", "bytes_sent", "bytes_received", "forward_ns", "dispatch_ns", "rpc_wall_ns", "compute_max_ns", "compute_mean_ns", "gateway_codec_ns", "server_codec_ns", "load_mean_sum", "load_max_sum", "suspects", "stand_in_loads", "bytes_shared", "decode_layer_calls", "decode_tokens")
    LAYER_CALLS_FIELD_NUMBER: _ClassVar[int]
    RPCS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SENT_FIELD_NUMBER: _ClassVar[int]
    BYTES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_NS_FIELD_NUMBER: _ClassVar[int]
    DISPATCH_NS_FIELD_NUMBER: _ClassVar[int]
    RPC_WALL_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MAX_NS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MEAN_NS_FIELD_NUMBER: _ClassVar[int]
    GATEWAY_CODEC_NS_FIELD_NUMBER: _ClassVar[int]
    SERVER_CODEC_NS_FIELD_NUMBER: _ClassVar[int]
    LOAD_MEAN_SUM_FIELD_NUMBER: _ClassVar[int]
    LOAD_MAX_SUM_FIELD_NUMBER: _ClassVar[int]
    SUSPECTS_FIELD_NUMBER: _ClassVar[int]
    STAND_IN_LOADS_FIELD_NUMBER: _ClassVar[int]
    BYTES_SHARED_FIELD_NUMBER: _ClassVar[int]
    DECODE_LAYER_CALLS_FIELD_NUMBER: _ClassVar[int]
    DECODE_TOKENS_FIELD_NUMBER: _ClassVar[int]
    layer_calls: int
    rpcs: int
    tokens: int
    bytes_sent: int
    bytes_received: int
    forward_ns: int
    dispatch_ns: int
    rpc_wall_ns: int
    compute_max_ns: int
    compute_mean_ns: int
    gateway_codec_ns: int
    server_codec_ns: int
    load_mean_sum: float
    load_max_sum: float
    suspects: int
    stand_in_loads: int
    bytes_shared: int
    decode_layer_calls: int
    decode_tokens: int
    def __init__(self, layer_calls: _Optional[int] = ..., rpcs: _Optional[int] = ..., tokens: _Optional[int] = ..., bytes_sent: _Optional[int] = ..., bytes_received: _Optional[int] = ..., forward_ns: _Optional[int] = ..., dispatch_ns: _Optional[int] = ..., rpc_wall_ns: _Optional[int] = ..., compute_max_ns: _Optional[int] = ..., compute_mean_ns: _Optional[int] = ..., gateway_codec_ns: _Optional[int] = ..., server_codec_ns: _Optional[int] = ..., load_mean_sum: _Optional[float] = ..., load_max_sum: _Optional[float] = ..., suspects: _Optional[int] = ..., stand_in_loads: _Optional[int] = ..., bytes_shared: _Optional[int] = ..., decode_layer_calls: _Optional[int] = ..., decode_tokens: _Optional[int] = ...) -> None: ...

class LayerPlacement(_message.Message):
    __slots__ = ("layer", "name", "home_server")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOME_SERVER_FIELD_NUMBER: _ClassVar[int]
    layer: int
    name: str
    home_server: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., name: _Optional[str] = ..., home_server: _Optional[_Iterable[int]] = ...) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("model_name", "model_source", "model_id", "num_experts", "servers", "placement", "healthy", "requests_total", "requests_failed", "wire_dtype", "predictor", "replication", "membership_changes", "expert_path", "membership_changes_total")
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    SERVERS_FIELD_NUMBER: _ClassVar[int]
    PLACEMENT_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    WIRE_DTYPE_FIELD_NUMBER: _ClassVar[int]
    PREDICTOR_FIELD_NUMBER: _ClassVar[int]
    REPLICATION_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_CHANGES_FIELD_NUMBER: _ClassVar[int]
    EXPERT_PATH_FIELD_NUMBER: _ClassVar[int]
    MEMBERSHIP_CHANGES_TOTAL_FIELD_NUMBER: _ClassVar[int]
    model_name: str
    model_source: str
    model_id: str
    num_experts: int
    servers: _containers.RepeatedCompositeFieldContainer[ExpertServerStatus]
    placement: _containers.RepeatedCompositeFieldContainer[LayerPlacement]
    healthy: bool
    requests_total: int
    requests_failed: int
    wire_dtype: str
    predictor: PredictorStatus
    replication: ReplicationStatus
    membership_changes: _containers.RepeatedCompositeFieldContainer[MembershipChange]
    expert_path: ExpertPathStats
    membership_changes_total: int
    def __init__(self, model_name: _Optional[str] = ..., model_source: _Optional[str] = ..., model_id: _Optional[str] = ..., num_experts: _Optional[int] = ..., servers: _Optional[_Iterable[_Union[ExpertServerStatus, _Mapping]]] = ..., placement: _Optional[_Iterable[_Union[LayerPlacement, _Mapping]]] = ..., healthy: _Optional[bool] = ..., requests_total: _Optional[int] = ..., requests_failed: _Optional[int] = ..., wire_dtype: _Optional[str] = ..., predictor: _Optional[_Union[PredictorStatus, _Mapping]] = ..., replication: _Optional[_Union[ReplicationStatus, _Mapping]] = ..., membership_changes: _Optional[_Iterable[_Union[MembershipChange, _Mapping]]] = ..., expert_path: _Optional[_Union[ExpertPathStats, _Mapping]] = ..., membership_changes_total: _Optional[int] = ...) -> None: ...

class ReplicationStatus(_message.Message):
    __slots__ = ("mode", "policy", "batches", "plans", "kept_plans", "replicas_planned", "replicas_ready", "prefetch_hit_rate", "balancedness", "replica_tokens", "bytes_moved", "failures", "planning_ms_p50", "forecast_makespan", "forecast_baseline_makespan", "tokens_per_server", "request_path_ms", "lookahead_plans", "prefetch_hit_rate_by_layer")
    MODE_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    BATCHES_FIELD_NUMBER: _ClassVar[int]
    PLANS_FIELD_NUMBER: _ClassVar[int]
    KEPT_PLANS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_PLANNED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_READY_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_HIT_RATE_FIELD_NUMBER: _ClassVar[int]
    BALANCEDNESS_FIELD_NUMBER: _ClassVar[int]
    REPLICA_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BYTES_MOVED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    PLANNING_MS_P50_FIELD_NUMBER: _ClassVar[int]
    FORECAST_MAKESPAN_FIELD_NUMBER: _ClassVar[int]
    FORECAST_BASELINE_MAKESPAN_FIELD_NUMBER: _ClassVar[int]
    TOKENS_PER_SERVER_FIELD_NUMBER: _ClassVar[int]
    REQUEST_PATH_MS_FIELD_NUMBER: _ClassVar[int]
    LOOKAHEAD_PLANS_FIELD_NUMBER: _ClassVar[int]
    PREFETCH_HIT_RATE_BY_LAYER_FIELD_NUMBER: _ClassVar[int]
    mode: str
    policy: str
    batches: int
    plans: int
    kept_plans: int
    replicas_planned: int
    replicas_ready: int
    prefetch_hit_rate: float
    balancedness: float
    replica_tokens: int
    bytes_moved: int
    failures: int
    planning_ms_p50: float
    forecast_makespan: float
    forecast_baseline_makespan: float
    tokens_per_server: _containers.RepeatedScalarFieldContainer[int]
    request_path_ms: float
    lookahead_plans: int
    prefetch_hit_rate_by_layer: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, mode: _Optional[str] = ..., policy: _Optional[str] = ..., batches: _Optional[int] = ..., plans: _Optional[int] = ..., kept_plans: _Optional[int] = ..., replicas_planned: _Optional[int] = ..., replicas_ready: _Optional[int] = ..., prefetch_hit_rate: _Optional[float] = ..., balancedness: _Optional[float] = ..., replica_tokens: _Optional[int] = ..., bytes_moved: _Optional[int] = ..., failures: _Optional[int] = ..., planning_ms_p50: _Optional[float] = ..., forecast_makespan: _Optional[float] = ..., forecast_baseline_makespan: _Optional[float] = ..., tokens_per_server: _Optional[_Iterable[int]] = ..., request_path_ms: _Optional[float] = ..., lookahead_plans: _Optional[int] = ..., prefetch_hit_rate_by_layer: _Optional[_Iterable[float]] = ...) -> None: ...

class PredictorStatus(_message.Message):
    __slots__ = ("address", "forecasts_ok", "forecasts_late", "forecasts_failed", "reports_failed")
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    FORECASTS_OK_FIELD_NUMBER: _ClassVar[int]
    FORECASTS_LATE_FIELD_NUMBER: _ClassVar[int]
    FORECASTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    address: str
    forecasts_ok: int
    forecasts_late: int
    forecasts_failed: int
    reports_failed: int
    def __init__(self, address: _Optional[str] = ..., forecasts_ok: _Optional[int] = ..., forecasts_late: _Optional[int] = ..., forecasts_failed: _Optional[int] = ..., reports_failed: _Optional[int] = ...) -> None: ...
