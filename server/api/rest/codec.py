"""HTTP/REST inference bodies <-> the protocol's messages: JSON tensors and Triton's binary
tensor data extension (docs/protocol/extension_binary_data.md).

A request body is a JSON object, optionally followed by the inputs' bytes, in the order of the
inputs whose `binary_data_size` parameter says how many; `Inference-Header-Content-Length`
then gives the JSON's length. Every input becomes raw bytes of a ModelInferRequest (JSON
`data`, nested or flat, is converted to its datatype's little-endian bytes here), so the
protocol's own checks (server.api.codecs, through server.api.kserve) judge it exactly as they
judge a gRPC request. Checks that exist only in this format (an input with both `data` and
`binary_data_size`, bytes left over, a header length outside the body, JSON of the wrong
shape) raise InvalidInputError here.

An answer's outputs are JSON `data` or binary, per output: its `binary_data` parameter, else
the request's `binary_data_output`, else JSON. A header length of 0 is Triton's raw binary
request: the whole body is one batch-1 input of the model's datatype, answered in binary.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from modelrepo.datatypes import DATATYPES
from server.api.codecs import parse_bytes_tensor, serialize_bytes_tensor
from server.core.signature import Signature
from server.errors import InvalidInputError, UnsupportedError
from wire import grpc_service_pb2 as pb

HEADER_LENGTH = "Inference-Header-Content-Length"
JSON_TYPE = "application/json"
BINARY_TYPE = "application/octet-stream"
BINARY_SIZE = "binary_data_size"
BINARY_OUTPUT = "binary_data"
ALL_BINARY = "binary_data_output"
# Which kinds of JSON values (as numpy reads them) a float or BOOL datatype accepts: ints
# coerce to floats, never the reverse; booleans only for BOOL. Integers: _json_integers.
_ACCEPTED_KINDS = {"f": "fiu", "b": "b"}


@dataclass(frozen=True)
class InferBody:
    """A decoded request: the message, and which outputs to answer in binary."""

    request: pb.ModelInferRequest
    binary: Mapping[str, bool]  # output name -> binary; outputs not named use `binary_default`
    binary_default: bool


def header_length(value: str | None, body_size: int) -> int | None:
    """The JSON's length from Inference-Header-Content-Length (None: the whole body)."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise InvalidInputError(f"unable to parse {HEADER_LENGTH}, got: {value!r}") from None
    if not 0 <= length <= body_size:
        raise InvalidInputError(
            f"{HEADER_LENGTH} must be in [0, {body_size}] (the body's length), got {length}"
        )
    return length


def decode_infer(
    body: bytes, length: int | None, name: str, version: str, signature: Signature
) -> InferBody:
    """A JSON (+ binary) inference request for model `name` (version "" = latest), whose
    tensors `signature` declares: JSON `data` is read as the datatype the model expects."""
    header = body if length is None else body[:length]
    document = _object(_parse_json(header), "the inference request")
    request = pb.ModelInferRequest(model_name=name, model_version=version)
    identifier = document.get("id", "")
    if not isinstance(identifier, str):
        raise InvalidInputError("'id' must be a string")
    request.id = identifier
    binary_default = _request_parameters(document.get("parameters", {}), request)
    inputs = document.get("inputs")
    if not isinstance(inputs, list):
        raise InvalidInputError("'inputs' must be a list of tensors")
    view = memoryview(body)
    offset = len(body) if length is None else length
    for index, tensor in enumerate(inputs):
        offset = _input(_object(tensor, f"input {index}"), request, view, offset, length, signature)
    if offset != len(body):
        raise InvalidInputError(
            f"unexpected additional input data: {len(body) - offset} bytes after the inputs "
            f"their {BINARY_SIZE} parameters account for"
        )
    binary = _outputs(document.get("outputs", []), request)
    return InferBody(request, binary, binary_default)


def decode_raw(body: bytes, name: str, version: str, signature: Signature) -> InferBody:
    """Triton's raw binary request: the body is the model's one input, at batch size 1."""
    if len(signature.inputs) != 1:
        raise InvalidInputError(
            f"a raw binary request ({HEADER_LENGTH}: 0) needs a model with one input; "
            f"model '{signature.model}' has {len(signature.inputs)}"
        )
    spec = signature.inputs[0]
    if -1 in spec.dims:
        raise InvalidInputError(
            f"a raw binary request cannot say the shape of input '{spec.name}' "
            f"(dims {list(spec.dims)}): send the JSON header"
        )
    request = pb.ModelInferRequest(model_name=name, model_version=version)
    shape = [1, *spec.dims] if signature.batched else list(spec.dims)
    request.inputs.add(name=spec.name, datatype=spec.datatype.name, shape=shape)
    request.raw_input_contents.append(body)
    return InferBody(request, {}, binary_default=True)


def _parse_json(data: bytes | memoryview) -> Any:
    try:
        return json.loads(bytes(data))
    except RecursionError:
        raise InvalidInputError("the JSON is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidInputError(f"the body is not valid JSON: {exc}") from None


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInputError(f"{what} must be a JSON object")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _request_parameters(parameters: Any, request: pb.ModelInferRequest) -> bool:
    """Copy the request's parameters into the message; returns `binary_data_output`."""
    binary_default = False
    for key, value in _object(parameters, "'parameters'").items():
        if key == ALL_BINARY:
            if not isinstance(value, bool):
                raise InvalidInputError(f"parameter {ALL_BINARY!r} must be a boolean")
            binary_default = value
        elif key in ("priority", "timeout"):
            if not _is_int(value) or value < 0:
                raise InvalidInputError(f"parameter {key!r} must be an unsigned integer")
            if key == "priority":
                request.parameters[key].uint64_param = value
            else:
                request.parameters[key].int64_param = min(value, 2**63 - 1)
        else:
            _parameter(request.parameters[key], key, value)
    return binary_default


def _parameter(target: pb.InferParameter, key: str, value: Any) -> None:
    if isinstance(value, bool):
        target.bool_param = value
    elif _is_int(value) and -(2**63) <= value < 2**63:
        target.int64_param = value
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise InvalidInputError(
            f"parameter {key!r} must be an integer, a number, a boolean or a string"
        )


def _input(
    tensor: dict[str, Any],
    request: pb.ModelInferRequest,
    body: memoryview,
    offset: int,
    length: int | None,
    signature: Signature,
) -> int:
    """Add one input to the message; returns the offset of the next binary input."""
    name, datatype, shape = tensor.get("name"), tensor.get("datatype"), tensor.get("shape")
    if not isinstance(name, str) or not isinstance(datatype, str):
        raise InvalidInputError("each input needs a string 'name' and 'datatype'")
    if not isinstance(shape, list) or not all(_is_int(d) and 0 <= d < 2**63 for d in shape):
        raise InvalidInputError(f"input {name!r}: 'shape' must be a list of non-negative integers")
    added = request.inputs.add(name=name, datatype=datatype, shape=shape)
    parameters = _object(tensor.get("parameters", {}), f"input {name!r} 'parameters'")
    has_data, size = "data" in tensor, parameters.get(BINARY_SIZE)
    if "shared_memory_region" in parameters:
        raise UnsupportedError("shared-memory tensors are not supported; send the data inline")
    if has_data == (size is not None):
        raise InvalidInputError(
            f"input {name!r} must set exactly one of 'data' and the {BINARY_SIZE!r} parameter"
        )
    for key, value in parameters.items():
        if key != BINARY_SIZE:
            _parameter(added.parameters[key], key, value)
    if has_data:
        try:
            data = _json_data(tensor["data"], name, datatype, shape)
        except InvalidInputError:
            expected = signature.input(name)
            if expected is not None and expected.datatype.name == datatype:
                raise
            data = b""  # the protocol's check refuses the datatype, naming what is expected
        request.raw_input_contents.append(data)
        return offset
    if not _is_int(size) or size < 0:
        raise InvalidInputError(f"input {name!r}: {BINARY_SIZE!r} must be an unsigned integer")
    if length is None:
        raise InvalidInputError(
            f"input {name!r} has binary data: the request needs the {HEADER_LENGTH} header"
        )
    if offset + size > len(body):
        raise InvalidInputError(
            f"input {name!r}: expected {size} bytes of binary data, the body has "
            f"{len(body) - offset} left"
        )
    request.raw_input_contents.append(bytes(body[offset : offset + size]))
    return offset + size


def _json_data(data: Any, name: str, datatype: str, shape: Sequence[int]) -> bytes:
    """JSON `data` (nested or flat, row-major) as the datatype's raw bytes (BYTES: strings
    with Triton's 4-byte length prefixes).

    Datatypes the protocol does not know are left for the protocol's check to refuse, and so
    is a count of values that does not match the shape.
    """
    kind = DATATYPES.get(datatype)
    if kind is None:
        return b""
    if kind.is_bytes:
        flat = _flatten(data)
        if not all(isinstance(v, str) for v in flat):
            raise InvalidInputError(f"input {name!r}: BYTES 'data' must be a list of strings")
        return serialize_bytes_tensor(v.encode("utf-8") for v in flat)
    if kind.dtype.kind in "iu":
        return _json_integers(data, name, datatype, kind.dtype)
    try:
        values = np.asarray(data)
    except (ValueError, TypeError):
        raise InvalidInputError(
            f"input {name!r}: 'data' must be a list of numbers, flat or nested evenly"
        ) from None
    accepted = _ACCEPTED_KINDS[kind.dtype.kind]
    if values.dtype.kind not in accepted or (values.ndim == 0 and values.size == 1):
        expected = "booleans" if kind.dtype.kind == "b" else "numbers"
        raise InvalidInputError(f"input {name!r}: 'data' must be a list of {expected}")
    # Whether the count of values fits the shape is the protocol's check, after the shape's.
    return values.astype(kind.dtype).tobytes()


def _json_integers(data: Any, name: str, datatype: str, dtype: np.dtype) -> bytes:
    """Integers read exactly: numpy reads 2**64-1 beside small numbers as a float."""
    flat = _flatten(data) if isinstance(data, list) else None
    if flat is None or not all(type(v) is int for v in flat):
        raise InvalidInputError(f"input {name!r}: 'data' must be a list of integers")
    info = np.iinfo(dtype)
    if flat and (min(flat) < info.min or max(flat) > info.max):
        raise InvalidInputError(f"input {name!r}: {datatype} values must be {info.min}..{info.max}")
    return np.array(flat, dtype=dtype).tobytes()


def _flatten(data: Any) -> list[Any]:
    if isinstance(data, list):
        return [v for item in data for v in _flatten(item)]
    return [data]


def _outputs(outputs: Any, request: pb.ModelInferRequest) -> dict[str, bool]:
    """Copy the requested outputs into the message; returns their binary_data choices."""
    if not isinstance(outputs, list):
        raise InvalidInputError("'outputs' must be a list")
    binary: dict[str, bool] = {}
    for index, output in enumerate(outputs):
        output = _object(output, f"output {index}")
        name = output.get("name")
        if not isinstance(name, str):
            raise InvalidInputError(f"output {index} needs a string 'name'")
        added = request.outputs.add(name=name)
        parameters = _object(output.get("parameters", {}), f"output {name!r} 'parameters'")
        for key, value in parameters.items():
            if key == BINARY_OUTPUT:
                if not isinstance(value, bool):
                    raise InvalidInputError(f"output {name!r}: {BINARY_OUTPUT!r} must be a boolean")
                binary[name] = value
            elif key == "classification":
                if not _is_int(value) or not 0 <= value < 2**63:
                    raise InvalidInputError(
                        f"output {name!r}: 'classification' must be an unsigned integer"
                    )
                added.parameters[key].int64_param = value
            else:
                _parameter(added.parameters[key], key, value)
    return binary


def encode_infer(response: pb.ModelInferResponse, body: InferBody) -> tuple[bytes, int | None]:
    """(the HTTP body, the JSON's length when binary data follows it, else None).

    `response` carries every output in raw_output_contents (server.api.kserve answers so).
    """
    document: dict[str, Any] = {
        "model_name": response.model_name,
        "model_version": response.model_version,
    }
    if response.id:
        document["id"] = response.id
    outputs, tail = [], []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if body.binary.get(tensor.name, body.binary_default):
            entry["parameters"] = {BINARY_SIZE: len(raw)}
            tail.append(raw)
        else:
            entry["data"] = _json_values(tensor.datatype, raw)
        outputs.append(entry)
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not tail:
        return header, None
    return b"".join([header, *tail]), len(header)


def _json_values(datatype: str, raw: bytes) -> list[Any]:
    if datatype == "BYTES":
        return [item.decode("utf-8", "replace") for item in parse_bytes_tensor(raw)]
    return np.frombuffer(raw, DATATYPES[datatype].dtype).tolist()
