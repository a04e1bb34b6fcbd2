from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ZeroGradMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ZERO_GRAD_NONE: _ClassVar[ZeroGradMode]
    ZERO_GRAD_TO_NONE: _ClassVar[ZeroGradMode]
    ZERO_GRAD_TO_ZERO: _ClassVar[ZeroGradMode]
ZERO_GRAD_NONE: ZeroGradMode
ZERO_GRAD_TO_NONE: ZeroGradMode
ZERO_GRAD_TO_ZERO: ZeroGradMode

class Header(_message.Message):
    __slots__ = ("request_id", "payload_bytes", "keep_context", "training", "backward_seq", "needs_input_grad", "reply_quantization", "release_ids", "zero_grad", "weights_version", "compute_seconds", "codec_seconds", "recomputed", "grad_scale", "rng_seed", "recompute", "server_id", "bulk_connection", "freeze_parameters", "autocast_dtype", "report_nonfinite", "nonfinite", "named_values", "weights_id", "outputs_without_grad")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    KEEP_CONTEXT_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    BACKWARD_SEQ_FIELD_NUMBER: _ClassVar[int]
    NEEDS_INPUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    REPLY_QUANTIZATION_FIELD_NUMBER: _ClassVar[int]
    RELEASE_IDS_FIELD_NUMBER: _ClassVar[int]
    ZERO_GRAD_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    CODEC_SECONDS_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTED_FIELD_NUMBER: _ClassVar[int]
    GRAD_SCALE_FIELD_NUMBER: _ClassVar[int]
    RNG_SEED_FIELD_NUMBER: _ClassVar[int]
    RECOMPUTE_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    BULK_CONNECTION_FIELD_NUMBER: _ClassVar[int]
    FREEZE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    AUTOCAST_DTYPE_FIELD_NUMBER: _ClassVar[int]
    REPORT_NONFINITE_FIELD_NUMBER: _ClassVar[int]
    NONFINITE_FIELD_NUMBER: _ClassVar[int]
    NAMED_VALUES_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_ID_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_WITHOUT_GRAD_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    payload_bytes: int
    keep_context: bool
    training: bool
    backward_seq: int
    needs_input_grad: _containers.RepeatedScalarFieldContainer[bool]
    reply_quantization: str
    release_ids: _containers.RepeatedScalarFieldContainer[str]
    zero_grad: ZeroGradMode
    weights_version: int
    compute_seconds: float
    codec_seconds: float
    recomputed: bool
    grad_scale: float
    rng_seed: int
    recompute: bool
    server_id: str
    bulk_connection: str
    freeze_parameters: bool
    autocast_dtype: str
    report_nonfinite: bool
    nonfinite: bool
    named_values: bool
    weights_id: str
    outputs_without_grad: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, request_id: _Optional[str] = ..., payload_bytes: _Optional[int] = ..., keep_context: _Optional[bool] = ..., training: _Optional[bool] = ..., backward_seq: _Optional[int] = ..., needs_input_grad: _Optional[_Iterable[bool]] = ..., reply_quantization: _Optional[str] = ..., release_ids: _Optional[_Iterable[str]] = ..., zero_grad: _Optional[_Union[ZeroGradMode, str]] = ..., weights_version: _Optional[int] = ..., compute_seconds: _Optional[float] = ..., codec_seconds: _Optional[float] = ..., recomputed: _Optional[bool] = ..., grad_scale: _Optional[float] = ..., rng_seed: _Optional[int] = ..., recompute: _Optional[bool] = ..., server_id: _Optional[str] = ..., bulk_connection: _Optional[str] = ..., freeze_parameters: _Optional[bool] = ..., autocast_dtype: _Optional[str] = ..., report_nonfinite: _Optional[bool] = ..., nonfinite: _Optional[bool] = ..., named_values: _Optional[bool] = ..., weights_id: _Optional[str] = ..., outputs_without_grad: _Optional[_Iterable[bool]] = ...) -> None: ...

class Frame(_message.Message):
    __slots__ = ("header", "payload")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_FIELD_NUMBER: _ClassVar[int]
    header: Header
    payload: bytes
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., payload: _Optional[bytes] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoReply(_message.Message):
    __slots__ = ("server_version", "protocol_version", "quantizations", "compressions", "max_payload_bytes", "max_tensor_bytes", "max_tensors", "unary_payload_bytes", "stream_chunk_bytes", "trainable_parameters", "trainable_numel", "device", "module_repr", "context_ttl_seconds", "server_id", "bulk_port", "fingerprint", "weights_version", "buffers", "dtype", "world_size", "parallel", "batch_statistics")
    SERVER_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUANTIZATIONS_FIELD_NUMBER: _ClassVar[int]
    COMPRESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSOR_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TENSORS_FIELD_NUMBER: _ClassVar[int]
    UNARY_PAYLOAD_BYTES_FIELD_NUMBER: _ClassVar[int]
    STREAM_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    TRAINABLE_NUMEL_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    MODULE_REPR_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    BULK_PORT_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    PARALLEL_FIELD_NUMBER: _ClassVar[int]
    BATCH_STATISTICS_FIELD_NUMBER: _ClassVar[int]
    server_version: str
    protocol_version: int
    quantizations: _containers.RepeatedScalarFieldContainer[str]
    compressions: _containers.RepeatedScalarFieldContainer[str]
    max_payload_bytes: int
    max_tensor_bytes: int
    max_tensors: int
    unary_payload_bytes: int
    stream_chunk_bytes: int
    trainable_parameters: _containers.RepeatedScalarFieldContainer[str]
    trainable_numel: int
    device: str
    module_repr: str
    context_ttl_seconds: float
    server_id: str
    bulk_port: int
    fingerprint: str
    weights_version: int
    buffers: _containers.RepeatedScalarFieldContainer[str]
    dtype: str
    world_size: int
    parallel: str
    batch_statistics: str
    def __init__(self, server_version: _Optional[str] = ..., protocol_version: _Optional[int] = ..., quantizations: _Optional[_Iterable[str]] = ..., compressions: _Optional[_Iterable[str]] = ..., max_payload_bytes: _Optional[int] = ..., max_tensor_bytes: _Optional[int] = ..., max_tensors: _Optional[int] = ..., unary_payload_bytes: _Optional[int] = ..., stream_chunk_bytes: _Optional[int] = ..., trainable_parameters: _Optional[_Iterable[str]] = ..., trainable_numel: _Optional[int] = ..., device: _Optional[str] = ..., module_repr: _Optional[str] = ..., context_ttl_seconds: _Optional[float] = ..., server_id: _Optional[str] = ..., bulk_port: _Optional[int] = ..., fingerprint: _Optional[str] = ..., weights_version: _Optional[int] = ..., buffers: _Optional[_Iterable[str]] = ..., dtype: _Optional[str] = ..., world_size: _Optional[int] = ..., parallel: _Optional[str] = ..., batch_statistics: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("request_ids",)
    REQUEST_IDS_FIELD_NUMBER: _ClassVar[int]
    request_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, request_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: int
    def __init__(self, released: _Optional[int] = ...) -> None: ...

class ConfigureOptimizerRequest(_message.Message):
    __slots__ = ("name", "options", "param_groups", "none_in_tuples", "optimizer_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    PARAM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    NONE_IN_TUPLES_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    options: bytes
    param_groups: bytes
    none_in_tuples: bool
    optimizer_id: str
    def __init__(self, name: _Optional[str] = ..., options: _Optional[bytes] = ..., param_groups: _Optional[bytes] = ..., none_in_tuples: _Optional[bool] = ..., optimizer_id: _Optional[str] = ...) -> None: ...

class ConfigureOptimizerReply(_message.Message):
    __slots__ = ("param_group", "param_groups")
    PARAM_GROUP_FIELD_NUMBER: _ClassVar[int]
    PARAM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    param_group: bytes
    param_groups: bytes
    def __init__(self, param_group: _Optional[bytes] = ..., param_groups: _Optional[bytes] = ...) -> None: ...

class GradNormRequest(_message.Message):
    __slots__ = ("norm_type", "zero_grad", "grad_scale", "ops_id", "server_id")
    NORM_TYPE_FIELD_NUMBER: _ClassVar[int]
    ZERO_GRAD_FIELD_NUMBER: _ClassVar[int]
    GRAD_SCALE_FIELD_NUMBER: _ClassVar[int]
    OPS_ID_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    norm_type: float
    zero_grad: ZeroGradMode
    grad_scale: float
    ops_id: str
    server_id: str
    def __init__(self, norm_type: _Optional[float] = ..., zero_grad: _Optional[_Union[ZeroGradMode, str]] = ..., grad_scale: _Optional[float] = ..., ops_id: _Optional[str] = ..., server_id: _Optional[str] = ...) -> None: ...

class GradNormReply(_message.Message):
    __slots__ = ("norms", "dtype", "dtypes")
    NORMS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DTYPES_FIELD_NUMBER: _ClassVar[int]
    norms: _containers.RepeatedScalarFieldContainer[float]
    dtype: str
    dtypes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, norms: _Optional[_Iterable[float]] = ..., dtype: _Optional[str] = ..., dtypes: _Optional[_Iterable[str]] = ...) -> None: ...

class StepRequest(_message.Message):
    __slots__ = ("step", "param_groups", "grad_scale", "zero_grad", "server_id", "optimizer_id")
    STEP_FIELD_NUMBER: _ClassVar[int]
    PARAM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    GRAD_SCALE_FIELD_NUMBER: _ClassVar[int]
    ZERO_GRAD_FIELD_NUMBER: _ClassVar[int]
    SERVER_ID_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_ID_FIELD_NUMBER: _ClassVar[int]
    step: int
    param_groups: bytes
    grad_scale: float
    zero_grad: ZeroGradMode
    server_id: str
    optimizer_id: str
    def __init__(self, step: _Optional[int] = ..., param_groups: _Optional[bytes] = ..., grad_scale: _Optional[float] = ..., zero_grad: _Optional[_Union[ZeroGradMode, str]] = ..., server_id: _Optional[str] = ..., optimizer_id: _Optional[str] = ...) -> None: ...

class StepReply(_message.Message):
    __slots__ = ("step", "weights_version", "replayed", "wait_seconds", "waited_forwards", "wait_expired")
    STEP_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    WAIT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    WAITED_FORWARDS_FIELD_NUMBER: _ClassVar[int]
    WAIT_EXPIRED_FIELD_NUMBER: _ClassVar[int]
    step: int
    weights_version: int
    replayed: bool
    wait_seconds: float
    waited_forwards: int
    wait_expired: bool
    def __init__(self, step: _Optional[int] = ..., weights_version: _Optional[int] = ..., replayed: _Optional[bool] = ..., wait_seconds: _Optional[float] = ..., waited_forwards: _Optional[int] = ..., wait_expired: _Optional[bool] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("parameters", "optimizer", "buffers")
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_FIELD_NUMBER: _ClassVar[int]
    parameters: bool
    optimizer: bool
    buffers: bool
    def __init__(self, parameters: _Optional[bool] = ..., optimizer: _Optional[bool] = ..., buffers: _Optional[bool] = ...) -> None: ...

class LoadStateReply(_message.Message):
    __slots__ = ("parameters_loaded", "optimizer_loaded", "buffers_loaded")
    PARAMETERS_LOADED_FIELD_NUMBER: _ClassVar[int]
    OPTIMIZER_LOADED_FIELD_NUMBER: _ClassVar[int]
    BUFFERS_LOADED_FIELD_NUMBER: _ClassVar[int]
    parameters_loaded: int
    optimizer_loaded: bool
    buffers_loaded: int
    def __init__(self, parameters_loaded: _Optional[int] = ..., optimizer_loaded: _Optional[bool] = ..., buffers_loaded: _Optional[int] = ...) -> None: ...

class OpenBulkRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class OpenBulkReply(_message.Message):
    __slots__ = ("ticket", "connection_id", "ticket_ttl_seconds")
    TICKET_FIELD_NUMBER: _ClassVar[int]
    CONNECTION_ID_FIELD_NUMBER: _ClassVar[int]
    TICKET_TTL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ticket: bytes
    connection_id: str
    ticket_ttl_seconds: float
    def __init__(self, ticket: _Optional[bytes] = ..., connection_id: _Optional[str] = ..., ticket_ttl_seconds: _Optional[float] = ...) -> None: ...

class CheckpointRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class CheckpointReply(_message.Message):
    __slots__ = ("path", "weights_version")
    PATH_FIELD_NUMBER: _ClassVar[int]
    WEIGHTS_VERSION_FIELD_NUMBER: _ClassVar[int]
    path: str
    weights_version: int
    def __init__(self, path: _Optional[str] = ..., weights_version: _Optional[int] = ...) -> None: ...

class EndSessionRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class EndSessionReply(_message.Message):
    __slots__ = ("ended",)
    ENDED_FIELD_NUMBER: _ClassVar[int]
    ended: bool
    def __init__(self, ended: _Optional[bool] = ...) -> None: ...
