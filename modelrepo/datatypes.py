"""The tensor datatypes of Triton's model configuration and of the KServe v2 protocol.

One table: the config's `TYPE_*` enum, the protocol's datatype name, the numpy dtype a tensor
of that type is held in (little-endian, as the protocol's raw bytes are), and the typed-contents
field of InferTensorContents that carries it (None: raw bytes only, as Triton has it for FP16).
BYTES (`TYPE_STRING`) tensors are numpy object arrays of `bytes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from wire import model_config_pb2


@dataclass(frozen=True)
class Datatype:
    name: str  # the protocol's: "FP32"
    config_type: int  # model_config_pb2.TYPE_FP32
    dtype: np.dtype
    contents_field: str | None  # InferTensorContents field; None: raw only
    onnx_type: str  # onnxruntime's spelling of the tensor type: "tensor(float)"
    # Read per request: kept as fields. Bytes per element in raw contents (0 for BYTES: each
    # element says its own length).
    is_bytes: bool = field(init=False)
    itemsize: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "is_bytes", self.name == "BYTES")
        object.__setattr__(self, "itemsize", 0 if self.is_bytes else self.dtype.itemsize)


_T = model_config_pb2
DATATYPES: dict[str, Datatype] = {
    d.name: d
    for d in (
        Datatype("BOOL", _T.TYPE_BOOL, np.dtype("?"), "bool_contents", "tensor(bool)"),
        Datatype("UINT8", _T.TYPE_UINT8, np.dtype("u1"), "uint_contents", "tensor(uint8)"),
        Datatype("UINT16", _T.TYPE_UINT16, np.dtype("<u2"), "uint_contents", "tensor(uint16)"),
        Datatype("UINT32", _T.TYPE_UINT32, np.dtype("<u4"), "uint_contents", "tensor(uint32)"),
        Datatype("UINT64", _T.TYPE_UINT64, np.dtype("<u8"), "uint64_contents", "tensor(uint64)"),
        Datatype("INT8", _T.TYPE_INT8, np.dtype("i1"), "int_contents", "tensor(int8)"),
        Datatype("INT16", _T.TYPE_INT16, np.dtype("<i2"), "int_contents", "tensor(int16)"),
        Datatype("INT32", _T.TYPE_INT32, np.dtype("<i4"), "int_contents", "tensor(int32)"),
        Datatype("INT64", _T.TYPE_INT64, np.dtype("<i8"), "int64_contents", "tensor(int64)"),
        Datatype("FP16", _T.TYPE_FP16, np.dtype("<f2"), None, "tensor(float16)"),
        Datatype("FP32", _T.TYPE_FP32, np.dtype("<f4"), "fp32_contents", "tensor(float)"),
        Datatype("FP64", _T.TYPE_FP64, np.dtype("<f8"), "fp64_contents", "tensor(double)"),
        Datatype("BYTES", _T.TYPE_STRING, np.dtype(object), "bytes_contents", "tensor(string)"),
    )
}
BY_CONFIG_TYPE: dict[int, Datatype] = {d.config_type: d for d in DATATYPES.values()}


def from_config_type(value: int) -> Datatype | None:
    """The datatype of a config `data_type`; None for types this server does not serve."""
    return BY_CONFIG_TYPE.get(value)
