"""Protocol tensors and encoded images <-> numpy arrays, validated.

The servicers call these to turn messages into what the core accepts (a model's tensors by
name, checked against its config; for the native API, float32 N x C x H x W images with pixels
in [0, 1]) and to turn its answers back into messages. Every
check raises InvalidInputError with a message that says what was expected, so a caller can
fix the request without reading the server's code. Both APIs share the pixel conversions,
so the same pixels give the same answer whichever API carried them.
"""

from __future__ import annotations

import io
import math
import struct
from collections.abc import Iterable, Mapping, MutableSequence, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from modelrepo.datatypes import DATATYPES, Datatype
from server.core.imagemodel import ImageModel
from server.core.signature import Signature
from server.errors import InvalidInputError, UnsupportedError
from wire import classifier_pb2, grpc_service_pb2

Shape = tuple[int, int, int]

# The native API's image tensors: float pixels in [0, 1] or 8-bit pixels (little-endian).
INPUT_DTYPES = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}
CLASSIFICATION_PARAM = "classification"
DEFAULT_TOP_K = 5
# Refuse images whose decoded pixels would not fit a sane budget (decompression bombs).
MAX_IMAGE_PIXELS = 40_000_000
IMAGE_FORMATS = ("PNG", "JPEG")
_MODES = {1: "L", 3: "RGB"}


def _shape_text(shape: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in shape) + "]"


def to_unit_float(pixels: np.ndarray) -> np.ndarray:
    """UINT8 0..255 -> float32 0..1 (exact float32 division); float32 passes through uncopied."""
    if pixels.dtype == np.uint8:
        return np.divide(pixels, np.float32(255.0), dtype=np.float32)
    return pixels.astype(np.float32, copy=False)


def _check_datatype(datatype: str, what: str) -> np.dtype:
    dtype = INPUT_DTYPES.get(datatype)
    if dtype is None:
        raise InvalidInputError(
            f"{what}: expected datatype FP32 (pixels in [0,1]) or UINT8 (0..255), got {datatype!r}"
        )
    return dtype


def _from_bytes(data: bytes, dtype: np.dtype, shape: Sequence[int], what: str) -> np.ndarray:
    """Zero-copy view of little-endian bytes; the length must match the shape exactly."""
    count = math.prod(shape)
    expected = count * dtype.itemsize
    if len(data) != expected:
        raise InvalidInputError(
            f"{what}: shape {_shape_text(shape)} of {dtype_name(dtype)} needs {expected} bytes "
            f"({count} values), got {len(data)}"
        )
    return np.frombuffer(data, dtype=dtype).reshape(shape)


def dtype_name(dtype: np.dtype) -> str:
    return next(name for name, d in INPUT_DTYPES.items() if d == dtype)


# --- KServe v2 -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Schedule:
    """A request's schedule-policy parameters (0: the model's defaults; server.core.queues)."""

    priority: int = 0
    timeout_us: int = 0


NO_SCHEDULE = Schedule()
# Parameters with a meaning of their own (Triton's reserved names, docs/protocol/
# extension_parameters.md); any other is the caller's and travels unread.
_SEQUENCE_PARAMS = ("sequence_id", "sequence_start", "sequence_end")
RESERVED_PREFIX = "triton_"
# The one `triton_` name a request may carry (decoupled models: an empty last response). One
# response answers each request here, so it changes nothing; perf_analyzer sends it.
EMPTY_FINAL_RESPONSE = "triton_enable_empty_final_response"
_PARAM_KINDS = ("int64_param", "bool_param", "string_param", "double_param")


def request_schedule(request: grpc_service_pb2.ModelInferRequest) -> Schedule:
    """The request's `priority` and `timeout`, its parameters checked as Triton checks them:
    `priority` an int64 >= 0 or a uint64, `timeout` an int64 in microseconds (0 or less: none),
    `sequence_*` the types the sequence extension gives them (a sequence is refused
    UNIMPLEMENTED: the models are stateless), no `triton_` names but Triton's one allowed
    (a bool), and every other parameter an int64, bool, string or double."""
    if not request.parameters:  # most requests: nothing to check
        return NO_SCHEDULE
    priority = timeout_us = 0
    for key, param in request.parameters.items():
        kind = param.WhichOneof("parameter_choice")
        if key == "priority":
            if kind == "int64_param" and param.int64_param >= 0:
                priority = param.int64_param
            elif kind == "uint64_param":
                priority = param.uint64_param
            else:
                raise InvalidInputError(
                    "parameter 'priority' must be an int64 >= 0 or a uint64 (1 is the highest "
                    "priority level, 0 the model's default)"
                )
        elif key == "timeout":
            if kind != "int64_param":
                raise InvalidInputError("parameter 'timeout' must be an int64, in microseconds")
            timeout_us = max(param.int64_param, 0)
        elif key == "sequence_id":
            if kind not in ("int64_param", "string_param"):
                raise InvalidInputError("parameter 'sequence_id' must be an int64 or a string")
            if param.int64_param or param.string_param:
                raise UnsupportedError(
                    "sequence batching is not supported: the models are stateless"
                )
        elif key in _SEQUENCE_PARAMS or key == EMPTY_FINAL_RESPONSE:
            if kind != "bool_param":
                raise InvalidInputError(f"parameter {key!r} must be a bool")
        elif key.startswith(RESERVED_PREFIX):
            raise InvalidInputError(
                f"parameter {key!r}: names starting with {RESERVED_PREFIX!r} are reserved"
            )
        elif kind not in _PARAM_KINDS:
            raise InvalidInputError(f"parameter {key!r} must be an int64, bool, string or double")
    return Schedule(priority, timeout_us)


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    # 0: the tensor; k > 0: its top k classes as BYTES (classification extension).
    class_count: int = 0


def decode_infer_inputs(
    request: grpc_service_pb2.ModelInferRequest,
    signature: Signature,
    image: ImageModel | None = None,
) -> dict[str, np.ndarray]:
    """The request's inputs as arrays by name, checked against the model's signature as
    Triton checks them. An image classifier that takes float pixels in [0, 1] (our exports)
    also takes UINT8 pixels for its image input, divided by 255."""
    inputs = request.inputs
    pixels = image.input if image is not None and image.takes_unit_pixels else None
    declared: dict[str, tuple[str, Sequence[int]]] = {}
    sent = []  # (tensor, name, datatype as sent, shape)
    for tensor in inputs:
        name = tensor.name
        if tensor.parameters and "shared_memory_region" in tensor.parameters:
            raise UnsupportedError("shared-memory tensors are not supported; send the data inline")
        if name in declared:
            raise InvalidInputError(f"input '{name}' is given more than once")
        datatype, shape = tensor.datatype, tuple(tensor.shape)
        sent.append((tensor, name, datatype, shape))
        declared[name] = ("FP32" if name == pixels and datatype == "UINT8" else datatype, shape)
    signature.check_inputs(declared)
    contents = request.raw_input_contents
    if contents and len(contents) != len(inputs):
        raise InvalidInputError(
            f"expected {len(inputs)} raw_input_contents entries (one per input), "
            f"got {len(contents)}"
        )
    decoded = {}
    for index, (tensor, name, datatype, shape) in enumerate(sent):
        kind = DATATYPES[datatype]
        if tensor.HasField("contents"):
            _check_contents(tensor, request, kind)
        what = _Named(name, signature.model)
        if contents:
            array = _from_raw(contents[index], kind, shape, what)
        else:
            array = _from_contents(tensor, kind, shape, what)
        decoded[name] = to_unit_float(array) if datatype != declared[name][0] else array
    return decoded


class _Named:
    """An input as messages name it, formatted only when a message is written."""

    __slots__ = ("model", "name")

    def __init__(self, name: str, model: str) -> None:
        self.name, self.model = name, model

    def __str__(self) -> str:
        return f"input '{self.name}' for model '{self.model}'"


def _from_raw(data: bytes, datatype: Datatype, shape: Sequence[int], what: object) -> np.ndarray:
    """Zero-copy view of little-endian bytes (BYTES: Triton's 4-byte length prefixes); the
    length must match the shape exactly."""
    count = math.prod(shape)
    if datatype.is_bytes:
        items = parse_bytes_tensor(data, what)
        if len(items) != count:
            raise InvalidInputError(
                f"{what}: shape {_shape_text(shape)} needs {count} BYTES elements, got {len(items)}"
            )
        return np.array(items, dtype=object).reshape(shape)
    expected = count * datatype.itemsize
    if len(data) != expected:
        raise InvalidInputError(
            f"input byte size mismatch for {what}. Expected {expected}, got {len(data)}"
        )
    return np.frombuffer(data, dtype=datatype.dtype).reshape(shape)


def _from_contents(
    tensor: grpc_service_pb2.ModelInferRequest.InferInputTensor,
    datatype: Datatype,
    shape: Sequence[int],
    what: object,
) -> np.ndarray:
    field = datatype.contents_field
    if field is None:
        raise InvalidInputError(f"{what}: {datatype.name} data goes in raw_input_contents")
    values = getattr(tensor.contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInputError(
            f"{what}: shape {_shape_text(shape)} needs {count} values in contents.{field} "
            f"(or the bytes in raw_input_contents), got {len(values)}"
        )
    if datatype.is_bytes:
        return np.array(list(values), dtype=object).reshape(shape)
    dtype = datatype.dtype
    if dtype.kind in "iu" and dtype.itemsize < 4 and values:
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if int(wide.min()) < info.min or int(wide.max()) > info.max:
            raise InvalidInputError(
                f"{what}: {datatype.name} values must be {info.min}..{info.max}, got "
                f"{int(wide.min())}..{int(wide.max())}"
            )
        return wide.astype(dtype).reshape(shape)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _check_contents(
    tensor: grpc_service_pb2.ModelInferRequest.InferInputTensor,
    request: grpc_service_pb2.ModelInferRequest,
    datatype: Datatype,
) -> None:
    """The protocol's MUST NOTs: typed contents beside raw_input_contents, or typed contents
    in a field other than the datatype's."""
    if not tensor.HasField("contents"):
        return
    if request.raw_input_contents:
        raise InvalidInputError(
            f"input {tensor.name!r}: contents must not be set when raw_input_contents is used"
        )
    expected = datatype.contents_field
    for field, values in tensor.contents.ListFields():
        if field.name != expected and len(values):
            where = f"contents.{expected}" if expected else "raw_input_contents"
            raise InvalidInputError(
                f"input {tensor.name!r}: {tensor.datatype} data goes in {where}, "
                f"not contents.{field.name}"
            )


def requested_outputs(
    request: grpc_service_pb2.ModelInferRequest, signature: Signature
) -> Sequence[RequestedOutput]:
    """What to answer: every output when none is named, else the named ones in order."""
    if not request.outputs:
        return [RequestedOutput(name) for name in signature.output_names]
    outputs = []
    names = [tensor.name for tensor in request.outputs]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate is not None:
        raise InvalidInputError(f"output {duplicate!r} is requested more than once")
    for tensor in request.outputs:
        spec = signature.check_output(tensor.name)
        if "shared_memory_region" in tensor.parameters:
            raise UnsupportedError("shared-memory tensors are not supported")
        count = 0
        if CLASSIFICATION_PARAM in tensor.parameters:
            param = tensor.parameters[CLASSIFICATION_PARAM]
            if param.WhichOneof("parameter_choice") in ("int64_param", "uint64_param"):
                count = param.int64_param or param.uint64_param
            if count < 1:
                raise InvalidInputError(
                    f"output {tensor.name!r}: parameter {CLASSIFICATION_PARAM!r} must be an "
                    "int64 class count >= 1"
                )
            if spec.datatype.is_bytes:
                raise InvalidInputError(
                    f"output {tensor.name!r}: classification needs a numeric output, not BYTES"
                )
        outputs.append(RequestedOutput(tensor.name, count))
    return outputs


def top_indices(probabilities: np.ndarray, k: int) -> np.ndarray:
    """N x k class indices, most probable first (ties: lower index first)."""
    return np.argsort(-probabilities, axis=1, kind="stable")[:, :k]


def classification_strings(scores: np.ndarray, k: int, labels: Sequence[str]) -> list[bytes]:
    """Triton's classification format, row-major N x k: b"score:index:label" (no label part
    when the output has no label file)."""
    items = []
    for row, indices in zip(scores, top_indices(scores, k), strict=True):
        for i in indices:
            text = f"{float(row[i]):f}:{int(i)}"
            if i < len(labels):
                text += f":{labels[i]}"
            items.append(text.encode())
    return items


def serialize_bytes_tensor(items: Iterable[bytes]) -> bytes:
    """The raw BYTES layout: each element prefixed by its 4-byte little-endian length."""
    return b"".join(struct.pack("<I", len(item)) + item for item in items)


def parse_bytes_tensor(data: bytes, what: str = "BYTES tensor") -> list[bytes]:
    """The raw BYTES layout back into its elements; a length past the end is refused."""
    items, offset, end = [], 0, len(data)
    while offset < end:
        if offset + 4 > end:
            raise InvalidInputError(f"{what}: BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", data, offset)
        offset += 4
        if offset + size > end:
            raise InvalidInputError(
                f"{what}: a BYTES element of {size} bytes runs past the data's end"
            )
        items.append(bytes(data[offset : offset + size]))
        offset += size
    return items


def encode_infer_outputs(
    response: grpc_service_pb2.ModelInferResponse,
    results: Mapping[str, np.ndarray],
    outputs: Sequence[RequestedOutput],
    signature: Signature,
    labels: Mapping[str, Sequence[str]],
) -> None:
    """Fill `outputs` and raw_output_contents from the model's answer: outputs travel raw,
    whatever contents the inputs came in, as Triton answers (clients read only those)."""
    batched = signature.batched
    for wanted in outputs:
        array = results[wanted.name]
        tensor = response.outputs.add(name=wanted.name)
        if wanted.class_count:
            scores = array.reshape(array.shape[0], -1) if batched else array.reshape(1, -1)
            k = min(wanted.class_count, scores.shape[1])
            items = classification_strings(scores, k, labels.get(wanted.name, ()))
            tensor.datatype = "BYTES"
            tensor.shape.extend([array.shape[0], k] if batched else [k])
            response.raw_output_contents.append(serialize_bytes_tensor(items))
            continue
        datatype = signature.output(wanted.name).datatype  # type: ignore[union-attr]
        tensor.datatype = datatype.name
        tensor.shape.extend(array.shape)
        if datatype.is_bytes:
            data = serialize_bytes_tensor(bytes(item) for item in array.ravel())
        else:
            data = array.astype(datatype.dtype, copy=False).tobytes()
        response.raw_output_contents.append(data)


# --- native Classifier API -------------------------------------------------------------------


def decode_image(data: bytes, input_shape: Shape, what: str = "image") -> np.ndarray:
    """A PNG/JPEG of any mode and size -> float32 C x H x W in [0, 1] (model channels, size)."""
    channels, height, width = input_shape
    mode = _MODES.get(channels)
    if mode is None:
        raise UnsupportedError(f"encoded images need a 1- or 3-channel model, not {channels}")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            if image.width * image.height > MAX_IMAGE_PIXELS:
                raise InvalidInputError(
                    f"{what}: {image.width}x{image.height} is larger than {MAX_IMAGE_PIXELS} pixels"
                )
            converted = image.convert(mode)
    except Image.DecompressionBombError:  # PIL's own guard, at open, for the most absurd sizes
        raise InvalidInputError(f"{what}: larger than {MAX_IMAGE_PIXELS} pixels") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidInputError(
            f"{what}: not a decodable PNG or JPEG ({len(data)} bytes)"
        ) from None
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.BILINEAR)
    pixels = np.asarray(converted, dtype=np.uint8).reshape(height, width, channels)
    return to_unit_float(pixels.transpose(2, 0, 1))


def decode_tensor(tensor: classifier_pb2.Tensor, input_shape: Shape, what: str) -> np.ndarray:
    """One C x H x W image tensor (FP32 or UINT8) -> float32 in [0, 1]."""
    dtype = _check_datatype(tensor.datatype, what)
    shape = tuple(tensor.shape)
    if shape != tuple(input_shape):
        raise InvalidInputError(
            f"{what}: expected shape {_shape_text(input_shape)} (C,H,W), got {_shape_text(shape)}"
        )
    return to_unit_float(_from_bytes(tensor.data, dtype, shape, what))


def decode_images(images: Sequence[classifier_pb2.Image], input_shape: Shape) -> np.ndarray:
    """The request's images as one float32 N x C x H x W batch."""
    if not images:
        raise InvalidInputError("expected at least one image, got none")
    decoded = []
    for i, image in enumerate(images):
        what = f"image {i}"
        kind = image.WhichOneof("data")
        if kind == "encoded":
            decoded.append(decode_image(image.encoded, input_shape, what))
        elif kind == "tensor":
            decoded.append(decode_tensor(image.tensor, input_shape, what))
        else:
            raise InvalidInputError(f"{what}: set either `encoded` (PNG/JPEG) or `tensor`")
    return np.stack(decoded)


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Bytes per decoded pixel counted by decode_cost: 8-bit RGBA, what most images decode to.
_PIXEL_BYTES = 4


def declared_pixels(data: bytes) -> int:
    """Pixels an encoded image says it has, from its header alone; 0 when it has none.

    The header, not the payload size, is what decoding costs: a few kilobytes of PNG can
    declare tens of megapixels. PNG's IHDR is read directly (width and height, bytes 16..24);
    other formats through PIL, which reads only the header at open.
    """
    if data[:8] == _PNG_SIGNATURE and data[12:16] == b"IHDR" and len(data) >= 24:
        width, height = struct.unpack(">II", data[16:24])
        return width * height
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as image:
            return image.width * image.height
    except Image.DecompressionBombError:
        return MAX_IMAGE_PIXELS + 1  # refused at open by the decoder too
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return 0  # refused at open by the decoder too: nothing to decode


def decode_cost(images: Sequence[classifier_pb2.Image]) -> int:
    """Bytes decoding the images reads and writes: decides whether to move it off the event
    loop. Encoded images count their payload plus the pixels their headers declare."""
    cost = 0
    for image in images:
        if image.encoded:
            cost += len(image.encoded) + _PIXEL_BYTES * declared_pixels(image.encoded)
        elif image.HasField("tensor"):
            cost += len(image.tensor.data)
    return cost


def add_classifications(
    results: MutableSequence[classifier_pb2.Classification],
    probabilities: np.ndarray,
    labels: Sequence[str],
    top_k: int,
) -> None:
    """Append one Classification per image to `results` (a response's repeated field): all
    probabilities plus the top k (0: the default 5).

    Built in place with `add` and from Python lists converted once per request: passing
    finished messages to a constructor copies each of them, and numpy scalars convert one
    by one; either costs more than the whole rest of the encoding.
    """
    num_classes = probabilities.shape[1]
    k = min(top_k or DEFAULT_TOP_K, num_classes)
    known = len(labels)
    tops = top_indices(probabilities, k).tolist()
    for row, indices in zip(probabilities.tolist(), tops, strict=True):
        add = results.add(probabilities=row).top.add
        for i in indices:
            add(index=i, label=labels[i] if i < known else str(i), probability=row[i])
