from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType

class AttachSharedMemoryRequest(_message.Message):
    __slots__ = ("segment", "nonce")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    segment: str
    nonce: bytes
    def __init__(self, segment: _Optional[str] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class AttachSharedMemoryResponse(_message.Message):
    __slots__ = ("attached", "reason", "lane", "lane_token")
    ATTACHED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    LANE_FIELD_NUMBER: _ClassVar[int]
    LANE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    attached: bool
    reason: str
    lane: str
    lane_token: bytes
    def __init__(self, attached: _Optional[bool] = ..., reason: _Optional[str] = ..., lane: _Optional[str] = ..., lane_token: _Optional[bytes] = ...) -> None: ...

class SharedRegion(_message.Message):
    __slots__ = ("segment", "offset")
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    segment: str
    offset: int
    def __init__(self, segment: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class FetchExpertRequest(_message.Message):
    __slots__ = ("expert", "model_id")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    expert: ExpertRef
    model_id: str
    def __init__(self, expert: _Optional[_Union[ExpertRef, _Mapping]] = ..., model_id: _Optional[str] = ...) -> None: ...

class ExpertWeight(_message.Message):
    __slots__ = ("name", "weight")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    name: str
    weight: Tensor
    def __init__(self, name: _Optional[str] = ..., weight: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class ExpertGroup(_message.Message):
    __slots__ = ("expert", "num_tokens")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    expert: int
    num_tokens: int
    def __init__(self, expert: _Optional[int] = ..., num_tokens: _Optional[int] = ...) -> None: ...

class RunExpertsRequest(_message.Message):
    __slots__ = ("layer", "groups", "hidden_states", "model_id", "shared")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_STATES_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    SHARED_FIELD_NUMBER: _ClassVar[int]
    layer: int
    groups: _containers.RepeatedCompositeFieldContainer[ExpertGroup]
    hidden_states: Tensor
    model_id: str
    shared: SharedRegion
    def __init__(self, layer: _Optional[int] = ..., groups: _Optional[_Iterable[_Union[ExpertGroup, _Mapping]]] = ..., hidden_states: _Optional[_Union[Tensor, _Mapping]] = ..., model_id: _Optional[str] = ..., shared: _Optional[_Union[SharedRegion, _Mapping]] = ...) -> None: ...

class RunExpertsResponse(_message.Message):
    __slots__ = ("outputs", "compute_ns", "codec_ns", "outputs_shared")
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_NS_FIELD_NUMBER: _ClassVar[int]
    CODEC_NS_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_SHARED_FIELD_NUMBER: _ClassVar[int]
    outputs: Tensor
    compute_ns: int
    codec_ns: int
    outputs_shared: bool
    def __init__(self, outputs: _Optional[_Union[Tensor, _Mapping]] = ..., compute_ns: _Optional[int] = ..., codec_ns: _Optional[int] = ..., outputs_shared: _Optional[bool] = ...) -> None: ...

class ExpertRef(_message.Message):
    __slots__ = ("layer", "expert")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    layer: int
    expert: int
    def __init__(self, layer: _Optional[int] = ..., expert: _Optional[int] = ...) -> None: ...

class AssignExpertsRequest(_message.Message):
    __slots__ = ("experts", "model_id", "members")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MEMBERS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    model_id: str
    members: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., model_id: _Optional[str] = ..., members: _Optional[_Iterable[str]] = ...) -> None: ...

class GetExpertDigestsRequest(_message.Message):
    __slots__ = ("experts", "model_id")
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    model_id: str
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., model_id: _Optional[str] = ...) -> None: ...

class ExpertDigest(_message.Message):
    __slots__ = ("expert", "sha256")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    expert: ExpertRef
    sha256: bytes
    def __init__(self, expert: _Optional[_Union[ExpertRef, _Mapping]] = ..., sha256: _Optional[bytes] = ...) -> None: ...

class GetExpertDigestsResponse(_message.Message):
    __slots__ = ("digests", "dtype")
    DIGESTS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    digests: _containers.RepeatedCompositeFieldContainer[ExpertDigest]
    dtype: str
    def __init__(self, digests: _Optional[_Iterable[_Union[ExpertDigest, _Mapping]]] = ..., dtype: _Optional[str] = ...) -> None: ...

class AssignExpertsResponse(_message.Message):
    __slots__ = ("loaded", "dropped", "weight_bytes")
    LOADED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    loaded: int
    dropped: int
    weight_bytes: int
    def __init__(self, loaded: _Optional[int] = ..., dropped: _Optional[int] = ..., weight_bytes: _Optional[int] = ...) -> None: ...

class GetInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetInfoResponse(_message.Message):
    __slots__ = ("model_id", "model_source", "d_model", "num_sparse_layers", "num_experts", "experts", "weight_bytes", "device", "dtype", "replica_memory", "replica_slots", "replicas", "draining", "compute_domain", "compute_share")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SOURCE_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    NUM_SPARSE_LAYERS_FIELD_NUMBER: _ClassVar[int]
    NUM_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_BYTES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    REPLICA_MEMORY_FIELD_NUMBER: _ClassVar[int]
    REPLICA_SLOTS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SHARE_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    model_source: str
    d_model: int
    num_sparse_layers: int
    num_experts: int
    experts: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    weight_bytes: int
    device: str
    dtype: str
    replica_memory: int
    replica_slots: int
    replicas: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    draining: bool
    compute_domain: str
    compute_share: float
    def __init__(self, model_id: _Optional[str] = ..., model_source: _Optional[str] = ..., d_model: _Optional[int] = ..., num_sparse_layers: _Optional[int] = ..., num_experts: _Optional[int] = ..., experts: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., weight_bytes: _Optional[int] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., replica_memory: _Optional[int] = ..., replica_slots: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., draining: _Optional[bool] = ..., compute_domain: _Optional[str] = ..., compute_share: _Optional[float] = ...) -> None: ...

class SetReplicasRequest(_message.Message):
    __slots__ = ("replicas", "model_id", "home_addresses")
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    HOME_ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    replicas: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    model_id: str
    home_addresses: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, replicas: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., model_id: _Optional[str] = ..., home_addresses: _Optional[_Iterable[str]] = ...) -> None: ...

class ReplicaFailure(_message.Message):
    __slots__ = ("expert", "reason")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    expert: ExpertRef
    reason: str
    def __init__(self, expert: _Optional[_Union[ExpertRef, _Mapping]] = ..., reason: _Optional[str] = ...) -> None: ...

class SetReplicasResponse(_message.Message):
    __slots__ = ("ready", "failed", "replica_bytes", "bytes_loaded")
    READY_FIELD_NUMBER: _ClassVar[int]
    FAILED_FIELD_NUMBER: _ClassVar[int]
    REPLICA_BYTES_FIELD_NUMBER: _ClassVar[int]
    BYTES_LOADED_FIELD_NUMBER: _ClassVar[int]
    ready: _containers.RepeatedCompositeFieldContainer[ExpertRef]
    failed: _containers.RepeatedCompositeFieldContainer[ReplicaFailure]
    replica_bytes: int
    bytes_loaded: int
    def __init__(self, ready: _Optional[_Iterable[_Union[ExpertRef, _Mapping]]] = ..., failed: _Optional[_Iterable[_Union[ReplicaFailure, _Mapping]]] = ..., replica_bytes: _Optional[int] = ..., bytes_loaded: _Optional[int] = ...) -> None: ...
