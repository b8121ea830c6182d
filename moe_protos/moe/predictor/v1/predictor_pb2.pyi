from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PassKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PASS_KIND_UNSPECIFIED: _ClassVar[PassKind]
    PASS_KIND_ENCODER: _ClassVar[PassKind]
    PASS_KIND_DECODER: _ClassVar[PassKind]
PASS_KIND_UNSPECIFIED: PassKind
PASS_KIND_ENCODER: PassKind
PASS_KIND_DECODER: PassKind

class ForecastRequest(_message.Message):
    __slots__ = ("model_id", "kind", "batch_size", "seq_len", "token_ids")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    SEQ_LEN_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    kind: PassKind
    batch_size: int
    seq_len: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, model_id: _Optional[str] = ..., kind: _Optional[_Union[PassKind, str]] = ..., batch_size: _Optional[int] = ..., seq_len: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class LayerForecast(_message.Message):
    __slots__ = ("layer", "load", "hot_experts")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    HOT_EXPERTS_FIELD_NUMBER: _ClassVar[int]
    layer: int
    load: _containers.RepeatedScalarFieldContainer[float]
    hot_experts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., load: _Optional[_Iterable[float]] = ..., hot_experts: _Optional[_Iterable[int]] = ...) -> None: ...

class ForecastResponse(_message.Message):
    __slots__ = ("layers", "method", "forecast_ns")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    METHOD_FIELD_NUMBER: _ClassVar[int]
    FORECAST_NS_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[LayerForecast]
    method: str
    forecast_ns: int
    def __init__(self, layers: _Optional[_Iterable[_Union[LayerForecast, _Mapping]]] = ..., method: _Optional[str] = ..., forecast_ns: _Optional[int] = ...) -> None: ...

class LayerLoad(_message.Message):
    __slots__ = ("layer", "load")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    LOAD_FIELD_NUMBER: _ClassVar[int]
    layer: int
    load: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, layer: _Optional[int] = ..., load: _Optional[_Iterable[int]] = ...) -> None: ...

class ReportLoadsRequest(_message.Message):
    __slots__ = ("model_id", "layers")
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    model_id: str
    layers: _containers.RepeatedCompositeFieldContainer[LayerLoad]
    def __init__(self, model_id: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[LayerLoad, _Mapping]]] = ...) -> None: ...

class ReportLoadsResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("method", "has_checkpoint", "note", "model_id", "forecasts", "reports", "live_load_l1", "forecast_ms_p50")
    METHOD_FIELD_NUMBER: _ClassVar[int]
    HAS_CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    NOTE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    FORECASTS_FIELD_NUMBER: _ClassVar[int]
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    LIVE_LOAD_L1_FIELD_NUMBER: _ClassVar[int]
    FORECAST_MS_P50_FIELD_NUMBER: _ClassVar[int]
    method: str
    has_checkpoint: bool
    note: str
    model_id: str
    forecasts: int
    reports: int
    live_load_l1: float
    forecast_ms_p50: float
    def __init__(self, method: _Optional[str] = ..., has_checkpoint: _Optional[bool] = ..., note: _Optional[str] = ..., model_id: _Optional[str] = ..., forecasts: _Optional[int] = ..., reports: _Optional[int] = ..., live_load_l1: _Optional[float] = ..., forecast_ms_p50: _Optional[float] = ...) -> None: ...
