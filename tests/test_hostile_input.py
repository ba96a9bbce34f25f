"""Property-based: arbitrary KServe ModelInfer and native Classify requests against one real
server. Each request gets the status a model of the protocol predicts (OK with the right
answer when it is well formed; a client error with a message, never INTERNAL or UNKNOWN,
when it is not), and a well-formed request sent right after every one of them still gets
the reference answer: no bad request leaves anything behind.

Examples are derandomized (the same ones on every run) and bounded, so CI is reproducible.
"""

from __future__ import annotations

import io
import math
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image
from server_process import ServerProcess, kserve_method, rss_bytes

from modelrepo.layout import ONNX_FILE, REFERENCE_FILE
from server.api import classifier, codecs
from server.api.status import INTERNAL_MESSAGE
from wire import classifier_pb2, classifier_pb2_grpc
from wire import grpc_service_pb2 as pb

pytestmark = pytest.mark.both_transports
MODEL = "fashion_mnist"
SHAPE = (1, 28, 28)
PIXELS = math.prod(SHAPE)
CLIENT_ERRORS = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.UNIMPLEMENTED,
}
EXAMPLES = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@dataclass
class Served:
    server: ServerProcess
    channel: grpc.Channel
    session: ort.InferenceSession  # the served model file, run directly: the expected answers
    reference_inputs: np.ndarray
    reference_outputs: np.ndarray

    def expected(self, images: np.ndarray) -> np.ndarray:
        return self.session.run(["probabilities"], {"input": images.astype(np.float32)})[0]


@pytest.fixture(scope="module")
def served(serve: Callable[..., ServerProcess]) -> Iterator[Served]:
    server = serve(models=[MODEL])
    version_dir = server.repository / MODEL / "1"
    with np.load(version_dir / REFERENCE_FILE) as data:
        inputs, outputs = data["inputs"].astype(np.float32), data["outputs"]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(
        str(version_dir / ONNX_FILE), options, providers=["CPUExecutionProvider"]
    )
    with grpc.insecure_channel(server.target) as channel:
        yield Served(server, channel, session, inputs, outputs)


def _status(call: Callable[[], object]) -> tuple[grpc.StatusCode, str, object]:
    try:
        return grpc.StatusCode.OK, "", call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or "", None


def _check_error(code: grpc.StatusCode, message: str, request: object) -> None:
    assert code in CLIENT_ERRORS, (code, message, request)
    assert message and message != INTERNAL_MESSAGE, (code, request)


# --- the well-formed request interleaved after every hostile one ---


def _good_request_still_answered(served: Served, row: int, native: bool) -> None:
    image = served.reference_inputs[row : row + 1]
    expected = served.reference_outputs[row : row + 1]
    if native:
        tensor = classifier_pb2.Tensor(shape=list(SHAPE), datatype="FP32", data=image.tobytes())
        request = classifier_pb2.ClassifyRequest(
            model=MODEL, images=[classifier_pb2.Image(tensor=tensor)]
        )
        stub = classifier_pb2_grpc.ClassifierStub(served.channel)
        response = stub.Classify(request, timeout=30)
        got = np.array([r.probabilities for r in response.results], np.float32)
    else:
        request = pb.ModelInferRequest(model_name=MODEL)
        request.inputs.add(name="input", datatype="FP32", shape=[1, *SHAPE])
        request.raw_input_contents.append(image.tobytes())
        response = kserve_method(served.channel, "ModelInfer")(request, timeout=30)
        got = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(1, -1)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)


# --- KServe ModelInfer ---

# Each request starts well formed and gets 0..3 mutations: about a third stay well formed,
# the rest break in one or several ways at once.
BAD_NAMES = st.one_of(
    st.sampled_from(["", "no_such_model", MODEL.upper(), MODEL + "\x00", MODEL + " "]),
    st.text(max_size=40),
)
BAD_VERSIONS = st.sampled_from(["2", "0", "-1", "one", "9" * 30, " 1"])
BAD_DATATYPES = st.sampled_from(["INT32", "FP64", "BYTES", "", "fp32", "FP16"])
DIM = st.one_of(st.sampled_from([1, 28, 0, -1, 3]), st.integers(-(2**63), 2**63 - 1))
BAD_SHAPES = st.one_of(
    st.lists(DIM, max_size=5),
    st.sampled_from([[0, *SHAPE], [-1, *SHAPE], [2**40, *SHAPE], [1, 28, 28], [1, 1, 28, 28, 1]]),
)
FLOATS = st.floats(width=32, allow_nan=True, allow_infinity=True)
MUTATIONS = st.lists(st.integers(0, 99), max_size=3)


def _pixels(draw: st.DrawFn, count: int) -> np.ndarray:
    """`count` float32 pixels in [0, 1), with a few drawn floats (NaN, Inf, huge...) set in."""
    array = np.random.default_rng(draw(st.integers(0, 2**16))).random(count, dtype=np.float32)
    if count and draw(st.integers(0, 3)) == 0:
        for value in draw(st.lists(FLOATS, min_size=1, max_size=4)):
            array[draw(st.integers(0, count - 1))] = value
    return array


def _set_data(draw: st.DrawFn, request: pb.ModelInferRequest, raw: bool, typed: bool) -> None:
    """Fill the first input's data for its datatype and shape (as raw bytes and/or typed)."""
    tensor = request.inputs[0]
    count = math.prod(tensor.shape)
    if tensor.datatype == "UINT8":
        values = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, count)
        if raw:
            request.raw_input_contents.append(values.astype(np.uint8).tobytes())
        if typed:
            tensor.contents.uint_contents.extend(values.tolist())
    else:
        pixels = _pixels(draw, count)
        if raw:
            request.raw_input_contents.append(pixels.astype("<f4").tobytes())
        if typed:
            tensor.contents.fp32_contents.extend(pixels.tolist())


def _mutate_infer(draw: st.DrawFn, request: pb.ModelInferRequest, which: int) -> None:
    tensor = request.inputs[0] if request.inputs else None
    match which % 16:
        case 0:
            request.model_name = draw(BAD_NAMES)
        case 1:
            request.model_version = draw(BAD_VERSIONS)
        case 2 if tensor is not None:
            tensor.name = draw(st.sampled_from(["pixels", "", "INPUT"]))
        case 3:
            request.inputs.add(name=draw(st.sampled_from(["input", "mask"])), datatype="FP32")
        case 4:
            del request.inputs[:]
        case 5 if tensor is not None:
            tensor.datatype = draw(BAD_DATATYPES)
        case 6 if tensor is not None:
            del tensor.shape[:]
            tensor.shape.extend(draw(BAD_SHAPES))
        case 7 if request.raw_input_contents:
            data = request.raw_input_contents[0]
            cut = draw(st.sampled_from([1, 3, 4, len(data)]))
            request.raw_input_contents[0] = (
                data[:-cut] if draw(st.booleans()) else data + b"\0" * cut
            )
        case 8 if tensor is not None and not request.raw_input_contents:
            values = tensor.contents.fp32_contents or tensor.contents.uint_contents
            if values:
                values.pop()
            else:
                tensor.contents.fp32_contents.append(0.5)
        case 9 if tensor is not None and tensor.datatype == "UINT8":
            del request.raw_input_contents[:]
            tensor.contents.uint_contents[:] = [draw(st.integers(256, 2**32 - 1))] * math.prod(
                tensor.shape
            )
        case 10 if tensor is not None:  # raw and typed at once: the protocol forbids it
            tensor.contents.fp32_contents.extend(draw(st.lists(FLOATS, max_size=4)))
        case 11:
            request.raw_input_contents.append(draw(st.binary(max_size=8)))
        case 12 if tensor is not None:
            tensor.parameters["shared_memory_region"].string_param = "region"
        case 13:
            output = request.outputs.add(name=draw(st.sampled_from(["logits", "probabilities"])))
            param = output.parameters["classification"]
            choice = draw(st.sampled_from(["bad_int", "string", "bool", "double"]))
            if choice == "bad_int":
                param.int64_param = draw(st.integers(-(2**63), 0))
            elif choice == "string":
                param.string_param = draw(st.sampled_from(["3", "x", ""]))
            elif choice == "bool":
                param.bool_param = True
            else:
                param.double_param = 2.0
        case 14:
            request.parameters["sequence_id"].int64_param = draw(st.integers(1, 2**40))
        case 15:  # harmless: a timeout that cannot expire (or is ignored), an unknown parameter
            request.parameters["timeout"].int64_param = draw(st.sampled_from([-5, 0, 10**12]))
            request.parameters["priority"].int64_param = 1


@st.composite
def infer_requests(draw: st.DrawFn) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(
        model_name=MODEL,
        model_version=draw(st.sampled_from(["", "1"])),
        id=draw(st.text(max_size=8)),
    )
    n = draw(st.integers(1, 3))
    request.inputs.add(
        name="input", datatype=draw(st.sampled_from(["FP32", "UINT8"])), shape=[n, *SHAPE]
    )
    raw = draw(st.booleans())
    _set_data(draw, request, raw=raw, typed=not raw)
    for _ in range(draw(st.integers(0, 2))):
        output = request.outputs.add(name="probabilities")
        if draw(st.booleans()):
            output.parameters["classification"].int64_param = draw(st.integers(1, 2**40))
    for which in draw(MUTATIONS):
        _mutate_infer(draw, request, which)
    return request


def _kserve_expectation(request: pb.ModelInferRequest) -> tuple[str, np.ndarray | None]:
    """("ok", the images the answer must be computed from) or (the error family, None)."""
    if request.model_name != MODEL or request.model_version not in ("", "1"):
        return "not_found", None
    sequence = request.parameters.get("sequence_id")
    if sequence is not None and sequence.int64_param:
        return "unimplemented", None
    if [t.name for t in request.inputs] != ["input"]:
        return "invalid", None
    tensor = request.inputs[0]
    if "shared_memory_region" in tensor.parameters:
        return "unimplemented", None
    if tensor.datatype not in ("FP32", "UINT8"):
        return "invalid", None
    shape = list(tensor.shape)
    if len(shape) != 4 or shape[0] < 1 or shape[1:] != list(SHAPE):
        return "invalid", None
    dtype = np.dtype("<f4") if tensor.datatype == "FP32" else np.dtype("u1")
    count = math.prod(shape)
    if request.raw_input_contents and tensor.HasField("contents"):
        return "invalid", None  # contents MUST NOT be set beside raw_input_contents
    if request.raw_input_contents:
        if len(request.raw_input_contents) != 1:
            return "invalid", None
        raw = request.raw_input_contents[0]
        if len(raw) != count * dtype.itemsize:
            return "invalid", None
        pixels = np.frombuffer(raw, dtype).reshape(shape)
    else:
        values = (
            tensor.contents.uint_contents
            if tensor.datatype == "UINT8"
            else tensor.contents.fp32_contents
        )
        if len(values) != count or (tensor.datatype == "UINT8" and any(v > 255 for v in values)):
            return "invalid", None
        pixels = np.array(values, dtype).reshape(shape)
    if len({output.name for output in request.outputs}) != len(request.outputs):
        return "invalid", None  # an output asked for twice
    for output in request.outputs:
        if output.name != "probabilities":
            return "invalid", None
        if "classification" in output.parameters:
            param = output.parameters["classification"]
            if param.WhichOneof("parameter_choice") != "int64_param" or param.int64_param < 1:
                return "invalid", None
    return "ok", _unit_float(pixels)


def _unit_float(pixels: np.ndarray) -> np.ndarray:
    """The pixels the model sees: UINT8 0..255 scaled to [0, 1], FP32 as it is."""
    if pixels.dtype == np.uint8:
        return np.divide(pixels, np.float32(255.0), dtype=np.float32)
    return pixels.astype(np.float32)


FAMILIES = {
    "not_found": {grpc.StatusCode.NOT_FOUND},
    "unimplemented": {grpc.StatusCode.UNIMPLEMENTED},
    "invalid": {grpc.StatusCode.INVALID_ARGUMENT},
}


def _asks_unsupported(request: pb.ModelInferRequest) -> bool:
    """Whether the request asks for shared memory or sequences (refused UNIMPLEMENTED)."""
    sequence = request.parameters.get("sequence_id")
    tensors = [*request.inputs, *request.outputs]
    return (sequence is not None and sequence.int64_param != 0) or any(
        "shared_memory_region" in tensor.parameters for tensor in tensors
    )


def _allowed_codes(family: str, request: pb.ModelInferRequest) -> set[grpc.StatusCode]:
    """A request broken in several ways may be refused for any one of them: an invalid one
    that also asks for what is not supported may be refused UNIMPLEMENTED instead."""
    codes = set(FAMILIES[family])
    if family == "invalid" and _asks_unsupported(request):
        codes.add(grpc.StatusCode.UNIMPLEMENTED)
    return codes


def _check_kserve_answer(
    served: Served,
    request: pb.ModelInferRequest,
    response: pb.ModelInferResponse,
    images: np.ndarray,
) -> None:
    expected = served.expected(images)
    assert response.model_name == MODEL and response.id == request.id
    outputs = list(request.outputs) or [pb.ModelInferRequest.InferRequestedOutputTensor()]
    assert len(response.outputs) == len(outputs)
    for index, (asked, tensor) in enumerate(zip(outputs, response.outputs, strict=True)):
        k = min(output_k(asked), 10)
        if k:
            assert tensor.datatype == "BYTES" and list(tensor.shape) == [len(images), k]
            continue
        assert tensor.datatype == "FP32" and list(tensor.shape) == [len(images), 10]
        got = np.frombuffer(response.raw_output_contents[index], "<f4")  # typed or raw in
        np.testing.assert_allclose(got.reshape(expected.shape), expected, rtol=0, atol=1e-5)


def output_k(output: pb.ModelInferRequest.InferRequestedOutputTensor) -> int:
    param = output.parameters.get("classification")
    return 0 if param is None else int(param.int64_param)


@EXAMPLES
@given(request=infer_requests(), row=st.integers(0, 3), native_after=st.booleans())
def test_any_kserve_request_gets_its_expected_status(
    served: Served, request: pb.ModelInferRequest, row: int, native_after: bool
) -> None:
    code, message, response = _status(
        lambda: kserve_method(served.channel, "ModelInfer")(request, timeout=30)
    )
    family, images = _kserve_expectation(request)
    event(f"{family}: {code.name}")  # shown by --hypothesis-show-statistics
    if family == "ok":
        assert code == grpc.StatusCode.OK, (code, message, request)
        assert images is not None and isinstance(response, pb.ModelInferResponse)
        _check_kserve_answer(served, request, response, images)
    else:
        _check_error(code, message, request)
        assert code in _allowed_codes(family, request), (family, code, message, request)
    _good_request_still_answered(served, row, native_after)


# --- native Classify ---


def _png_header(width: int, height: int, body: bytes | None = None) -> bytes:
    """An 8-bit grey PNG whose header claims width x height, with `body` as its compressed
    rows; by default a few bytes that would decode to gigabytes."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = zlib.compress(b"\0" * 64) if body is None else body
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b"")
    )


def _image_bytes(draw: st.DrawFn, broken: bool) -> bytes:
    kind = draw(st.sampled_from(["png", "jpeg"]))
    if broken:
        kind = draw(st.sampled_from(["truncated", "garbage", "huge", "empty", "gif"]))
    if kind == "garbage":
        return draw(st.binary(max_size=64))
    if kind == "empty":
        return b""
    if kind == "huge":
        side = draw(st.sampled_from([7000, 20000, 100000, 2**31 - 1]))
        return _png_header(side, side)
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I;16", "LA"]))
    size = (draw(st.integers(1, 64)), draw(st.integers(1, 64)))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), np.uint8)
    image = Image.fromarray(pixels, "RGB")
    buffer = io.BytesIO()
    if kind == "jpeg":
        image.convert(draw(st.sampled_from(["RGB", "L"]))).save(buffer, format="JPEG")
    elif kind == "gif":  # a real image in a format the server does not take
        image.save(buffer, format="GIF")
    else:
        image.convert(mode).save(buffer, format="PNG")
    data = buffer.getvalue()
    if kind == "truncated":
        return data[: draw(st.integers(0, len(data) - 1))]
    return data


def _tensor(draw: st.DrawFn, broken: bool) -> classifier_pb2.Tensor:
    datatype = draw(st.sampled_from(["FP32", "UINT8"]))
    shape = list(SHAPE)
    flaw = draw(st.sampled_from(["datatype", "shape", "length"])) if broken else ""
    if flaw == "datatype":
        datatype = draw(BAD_DATATYPES)
    elif flaw == "shape":
        shape = draw(BAD_SHAPES)
    count = PIXELS
    if datatype == "UINT8":
        data = np.random.default_rng(draw(st.integers(0, 2**16))).integers(0, 256, count)
        raw = data.astype(np.uint8).tobytes()
    else:
        raw = _pixels(draw, count).astype("<f4").tobytes()
    if flaw == "length":
        raw = raw[: draw(st.integers(0, len(raw) - 1))]
    return classifier_pb2.Tensor(shape=shape, datatype=datatype, data=raw)


@st.composite
def classify_requests(draw: st.DrawFn) -> classifier_pb2.ClassifyRequest:
    request = classifier_pb2.ClassifyRequest(
        model=MODEL,
        version=draw(st.sampled_from(["", "1"])),
        top_k=draw(st.sampled_from([0, 1, 3, 10, 11, 2**32 - 1])),
        id=draw(st.text(max_size=8)),
    )
    mutations = draw(MUTATIONS)
    broken = {which % 8 for which in mutations}
    count = draw(st.integers(1, 3))
    for index in range(count):
        spoilt = bool(broken & {4, 5}) and index == count - 1
        if draw(st.booleans()):
            request.images.add(encoded=_image_bytes(draw, spoilt and 4 in broken))
        else:
            request.images.add(tensor=_tensor(draw, spoilt and 5 in broken))
    if 0 in broken:
        request.model = draw(BAD_NAMES)
    if 1 in broken:
        request.version = draw(BAD_VERSIONS)
    if 2 in broken:
        del request.images[:]
    if 3 in broken:
        request.images.add()  # neither encoded nor tensor
    return request


def _native_expectation(request: classifier_pb2.ClassifyRequest) -> tuple[str, np.ndarray | None]:
    if request.model != MODEL or request.version not in ("", "1"):
        return "not_found", None
    if not request.images:
        return "invalid", None
    images = []
    for image in request.images:
        kind = image.WhichOneof("data")
        if kind is None:
            return "invalid", None
        if kind == "tensor":
            pixels = _tensor_pixels(image.tensor)
            if pixels is None:
                return "invalid", None
            images.append(pixels)
            continue
        try:  # what an encoded image's pixels are is PIL's business (tested elsewhere)
            images.append(codecs.decode_image(image.encoded, SHAPE))
        except codecs.InvalidInputError:
            return "invalid", None
    return "ok", np.stack(images)


def _tensor_pixels(tensor: classifier_pb2.Tensor) -> np.ndarray | None:
    """A tensor image's pixels in [0, 1], or None when its datatype, shape or length is wrong."""
    dtype = {"FP32": np.dtype("<f4"), "UINT8": np.dtype("u1")}.get(tensor.datatype)
    if dtype is None or list(tensor.shape) != list(SHAPE):
        return None
    if len(tensor.data) != PIXELS * dtype.itemsize:
        return None
    return _unit_float(np.frombuffer(tensor.data, dtype).reshape(SHAPE))


@EXAMPLES
@given(request=classify_requests(), row=st.integers(0, 3), native_after=st.booleans())
def test_any_classify_request_gets_its_expected_status(
    served: Served, request: classifier_pb2.ClassifyRequest, row: int, native_after: bool
) -> None:
    stub = classifier_pb2_grpc.ClassifierStub(served.channel)
    code, message, response = _status(lambda: stub.Classify(request, timeout=30))
    family, images = _native_expectation(request)
    event(f"{family}: {code.name}")
    if family == "ok":
        assert code == grpc.StatusCode.OK, (code, message)
        assert images is not None and isinstance(response, classifier_pb2.ClassifyResponse)
        assert (response.model, response.version, response.id) == (MODEL, "1", request.id)
        expected = served.expected(images)
        got = np.array([r.probabilities for r in response.results], np.float32)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
        k = min(request.top_k or 5, 10)
        assert all(len(r.top) == k for r in response.results)
    else:
        _check_error(code, message, request)
        assert code in FAMILIES[family], (family, code, message, request)
    _good_request_still_answered(served, row, native_after)


def test_absurd_image_sizes_are_refused_by_their_header(served: Served) -> None:
    """A 100 000 x 100 000 PNG (a few dozen bytes claiming 10 gigapixels) is refused from its
    header, with a message that says why, before anything is decoded."""
    stub = classifier_pb2_grpc.ClassifierStub(served.channel)
    for side in (7000, 100_000):
        request = classifier_pb2.ClassifyRequest(
            model=MODEL, images=[classifier_pb2.Image(encoded=_png_header(side, side))]
        )
        code, message, _ = _status(lambda request=request: stub.Classify(request, timeout=30))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert f"larger than {codecs.MAX_IMAGE_PIXELS} pixels" in message, message
    rss = rss_bytes(served.server)
    assert rss < 2 * 1024**3, rss  # nothing near 10 GB (or even 2 GiB) was allocated


# 40 megapixels, just under codecs.MAX_IMAGE_PIXELS: decoded, which takes about 0.2 s.
BIG_SIDE = 6300


def _black_png(side: int) -> bytes:
    """A real side x side black PNG: tens of kilobytes that decode to side * side pixels."""
    rows = zlib.compress(bytes(side * (side + 1)))  # each row: filter type 0, then its pixels
    return _png_header(side, side, rows)


def test_decode_cost_reads_the_declared_size() -> None:
    """Whether an image is decoded on the event loop is decided by the pixels its header
    declares, not by its size in bytes."""
    big = _black_png(BIG_SIDE)
    assert len(big) < classifier.DECODE_INLINE_COST  # its bytes alone would say "cheap"
    assert codecs.declared_pixels(big) == BIG_SIDE * BIG_SIDE
    assert codecs.decode_cost([classifier_pb2.Image(encoded=big)]) > classifier.DECODE_INLINE_COST

    def encoded(image: Image.Image, kind: str) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format=kind)
        return buffer.getvalue()

    small = encoded(Image.new("L", (28, 28)), "PNG")
    photo = encoded(Image.new("RGB", (40, 30)), "JPEG")  # its size comes from PIL's header read
    assert codecs.declared_pixels(small) == 28 * 28 and codecs.declared_pixels(photo) == 40 * 30
    tensor = classifier_pb2.Tensor(shape=list(SHAPE), datatype="FP32", data=bytes(4 * PIXELS))
    garbage = b"not an image at all"
    assert codecs.declared_pixels(garbage) == 0  # refused at once when decoded
    images = [
        classifier_pb2.Image(encoded=small),
        classifier_pb2.Image(encoded=photo),
        classifier_pb2.Image(tensor=tensor),
        classifier_pb2.Image(encoded=garbage),
    ]
    cost = codecs.decode_cost(images)
    assert cost == len(small) + len(photo) + 4 * (28 * 28 + 40 * 30) + 4 * PIXELS + len(garbage)
    assert cost <= classifier.DECODE_INLINE_COST  # small requests stay on the event loop


def test_images_declaring_many_pixels_are_decoded_aside(served: Served) -> None:
    """Requests of big images (decoded in a worker thread) and a small one sent among them
    are all answered, each with its own right answer."""
    stub = classifier_pb2_grpc.ClassifierStub(served.channel)
    big = classifier_pb2.ClassifyRequest(
        model=MODEL, images=[classifier_pb2.Image(encoded=_black_png(BIG_SIDE))]
    )
    image = served.reference_inputs[0]
    tensor = classifier_pb2.Tensor(shape=list(SHAPE), datatype="FP32", data=image.tobytes())
    small = classifier_pb2.ClassifyRequest(
        model=MODEL, images=[classifier_pb2.Image(tensor=tensor)]
    )
    calls = [stub.Classify.future(big, timeout=60) for _ in range(2)]
    calls.append(stub.Classify.future(small, timeout=60))
    calls.append(stub.Classify.future(big, timeout=60))
    answers = [np.array(call.result().results[0].probabilities, np.float32) for call in calls]
    np.testing.assert_allclose(answers[2], served.reference_outputs[0], rtol=0, atol=1e-5)
    black = served.expected(np.zeros((1, *SHAPE), np.float32))[0]
    for answer in (answers[0], answers[1], answers[3]):
        np.testing.assert_allclose(answer, black, rtol=0, atol=1e-5)


# --- bytes that are not a protobuf message at all ---


def _raw_method(channel: grpc.Channel, path: str) -> grpc.UnaryUnaryMultiCallable:
    return channel.unary_unary(path, request_serializer=bytes, response_deserializer=bytes)


@EXAMPLES
@given(payload=st.binary(max_size=300), native=st.booleans(), row=st.integers(0, 3))
def test_any_bytes_as_a_request_get_a_client_error_or_an_answer(
    served: Served, payload: bytes, native: bool, row: int
) -> None:
    path = (
        "/imgserve.classifier.v1.Classifier/Classify"
        if native
        else "/inference.GRPCInferenceService/ModelInfer"
    )
    code, message, _ = _status(lambda: _raw_method(served.channel, path)(payload, timeout=30))
    event(code.name)
    if code != grpc.StatusCode.OK:  # bytes that happen to parse may even be a valid request
        _check_error(code, message, payload)
    _good_request_still_answered(served, row, not native)


def test_undecodable_messages_are_invalid_argument_and_counted(served: Served) -> None:
    """Bytes that do not parse are a malformed request like any other: INVALID_ARGUMENT
    (not gRPC's UNKNOWN), counted under the unknown model, and a stream goes on after one."""
    server = served.server
    before = server.metric("imgserve_requests_total", model="", code="INVALID_ARGUMENT")
    garbage = b"\xff\xff\xff\xff"
    for path, what in (
        ("/inference.GRPCInferenceService/ModelInfer", "ModelInferRequest"),
        ("/imgserve.classifier.v1.Classifier/Classify", "ClassifyRequest"),
    ):
        code, message, _ = _status(lambda path=path: _raw_method(served.channel, path)(garbage))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
        assert message == f"the request is not a valid {what} message"
    good = pb.ModelInferRequest(model_name=MODEL, id="after")
    good.inputs.add(name="input", datatype="FP32", shape=[1, *SHAPE])
    good.raw_input_contents.append(served.reference_inputs[:1].tobytes())
    stream = served.channel.stream_stream(
        "/inference.GRPCInferenceService/ModelStreamInfer",
        request_serializer=bytes,
        response_deserializer=pb.ModelStreamInferResponse.FromString,
    )
    answers = list(stream(iter([garbage, good.SerializeToString()]), timeout=30))
    errors = sorted(a.error_message for a in answers)
    assert errors == ["", "the request is not a valid ModelInferRequest message"]
    [ok] = [a for a in answers if not a.error_message]
    assert ok.infer_response.id == "after"
    after = server.metric("imgserve_requests_total", model="", code="INVALID_ARGUMENT")
    assert after == before + 3
