"""The native Classifier API against a real server, with images written by Pillow."""

from __future__ import annotations

import io
from collections.abc import Callable

import grpc
import numpy as np
import pytest
from PIL import Image
from server_process import ServerProcess, kserve_method

from modelrepo.layout import read_labels
from wire import classifier_pb2 as pb
from wire import classifier_pb2_grpc
from wire import grpc_service_pb2 as kserve

pytestmark = pytest.mark.both_transports
SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}
MODES = {1: "L", 3: "RGB"}


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve("--models", "fashion_mnist,cifar10")


@pytest.fixture(scope="module")
def stub(channel: grpc.Channel) -> classifier_pb2_grpc.ClassifierStub:
    return classifier_pb2_grpc.ClassifierStub(channel)


def _picture(mode: str, size: tuple[int, int], seed: int) -> Image.Image:
    """A random picture in `mode` (any Pillow mode), `size` = (width, height)."""
    rgb = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(rgb, "RGB").convert(mode)


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _pixels(data: bytes, shape: tuple[int, int, int]) -> np.ndarray:
    """What the server is documented to do: decode, convert to the model's channels,
    resize to H x W (bilinear), keep 0..255 as uint8 C x H x W."""
    channels, height, width = shape
    with Image.open(io.BytesIO(data)) as image:
        converted = image.convert(MODES[channels])
    if converted.size != (width, height):
        converted = converted.resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(converted, np.uint8).reshape(height, width, channels).transpose(2, 0, 1)


def _kserve(channel: grpc.Channel, model: str, pixels: np.ndarray) -> np.ndarray:
    request = kserve.ModelInferRequest(model_name=model)
    request.inputs.add(name="input", datatype="UINT8", shape=pixels.shape)
    request.raw_input_contents.append(np.ascontiguousarray(pixels).tobytes())
    response = kserve_method(channel, "ModelInfer")(request, timeout=30)
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(len(pixels), -1)


def _probabilities(response: pb.ClassifyResponse) -> np.ndarray:
    return np.array([r.probabilities for r in response.results], np.float32)


CASES = [
    ("fashion_mnist", "RGB", (50, 40), "PNG"),
    ("fashion_mnist", "L", (28, 28), "PNG"),
    ("fashion_mnist", "RGBA", (17, 90), "PNG"),
    ("fashion_mnist", "P", (64, 64), "PNG"),
    ("cifar10", "L", (20, 20), "PNG"),
    ("cifar10", "RGB", (32, 32), "PNG"),
    ("cifar10", "RGB", (100, 75), "JPEG"),
    ("cifar10", "LA", (33, 31), "PNG"),
    ("cifar10", "RGB", (400, 300), "PNG"),  # large: decoded in a worker thread
]


@pytest.mark.parametrize(("model", "mode", "size", "fmt"), CASES)
def test_classify_encoded_images_like_the_kserve_path(
    stub: classifier_pb2_grpc.ClassifierStub,
    channel: grpc.Channel,
    server: ServerProcess,
    model: str,
    mode: str,
    size: tuple[int, int],
    fmt: str,
) -> None:
    files = [_encode(_picture(mode, size, seed), fmt) for seed in range(3)]
    request = pb.ClassifyRequest(model=model, images=[pb.Image(encoded=f) for f in files])
    response = stub.Classify(request, timeout=30)
    assert (response.model, response.version) == (model, "1")
    probabilities = _probabilities(response)
    assert probabilities.shape == (3, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)

    labels = read_labels(server.repository / model / "labels.txt")
    for row, result in zip(probabilities, response.results, strict=True):
        assert len(result.top) == 5  # the default top_k
        scores = [p.probability for p in result.top]
        assert scores == sorted(scores, reverse=True)
        assert result.top[0].index == int(np.argmax(row))
        assert [p.label for p in result.top] == [labels[p.index] for p in result.top]
        assert [p.probability for p in result.top] == [row[p.index] for p in result.top]

    pixels = np.stack([_pixels(f, SHAPES[model]) for f in files])
    np.testing.assert_allclose(probabilities, _kserve(channel, model, pixels), rtol=0, atol=1e-6)


def test_tensor_images_and_top_k(stub: classifier_pb2_grpc.ClassifierStub) -> None:
    """UINT8 and FP32 tensors of the same pixels answer the same; top_k is capped."""
    pixels = np.random.default_rng(5).integers(0, 256, (1, 28, 28), dtype=np.uint8)
    as_uint8 = pb.Tensor(shape=[1, 28, 28], datatype="UINT8", data=pixels.tobytes())
    as_float = pb.Tensor(
        shape=[1, 28, 28],
        datatype="FP32",
        data=(pixels.astype(np.float32) / np.float32(255)).astype("<f4").tobytes(),
    )
    request = pb.ClassifyRequest(
        model="fashion_mnist",
        images=[pb.Image(tensor=as_uint8), pb.Image(tensor=as_float)],
        top_k=3,
        id="tensors",
    )
    response = stub.Classify(request, timeout=30)
    assert response.id == "tensors"
    first, second = response.results
    assert list(first.probabilities) == list(second.probabilities)
    assert len(first.top) == 3
    request.top_k = 1000
    assert len(stub.Classify(request, timeout=30).results[0].top) == 10


def test_stream_answers_every_id(stub: classifier_pb2_grpc.ClassifierStub) -> None:
    png = _encode(_picture("RGB", (40, 30), 1))
    requests = [
        pb.ClassifyRequest(model="cifar10", id=f"r{i}", images=[pb.Image(encoded=png)] * (i + 1))
        for i in range(12)
    ]
    requests.append(
        pb.ClassifyRequest(model="cifar10", id="broken", images=[pb.Image(encoded=b"not a png")])
    )
    requests.append(pb.ClassifyRequest(model="no_such_model", id="missing", images=[]))
    answers = {a.id: a for a in stub.ClassifyStream(iter(requests), timeout=30)}
    assert set(answers) == {r.id for r in requests}
    for i in range(12):
        answer = answers[f"r{i}"]
        assert answer.WhichOneof("outcome") == "response"
        assert len(answer.response.results) == i + 1
        assert answer.response.id == f"r{i}"
    # One image, many times: every row of every answer is the same.
    first = list(answers["r0"].response.results[0].probabilities)
    assert all(list(r.probabilities) == first for r in answers["r11"].response.results)
    assert answers["broken"].error.code == "INVALID_ARGUMENT"
    assert "image 0" in answers["broken"].error.message
    assert answers["missing"].error.code == "NOT_FOUND"


def test_list_models(stub: classifier_pb2_grpc.ClassifierStub) -> None:
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest(), timeout=10).models}
    assert set(models) == {"fashion_mnist", "fashion_mnist_ts", "cifar10"}
    fashion = models["fashion_mnist"]
    assert (fashion.version, fashion.state, fashion.reason) == ("1", "READY", "")
    assert fashion.platform == "onnxruntime_onnx"
    assert list(fashion.input_shape) == [1, 28, 28]
    assert len(fashion.labels) == 10
    assert list(models["cifar10"].input_shape) == [3, 32, 32]
    # In the repository but not asked for at start (--models): listed, not ready.
    assert models["fashion_mnist_ts"].state == "UNAVAILABLE"
    assert models["fashion_mnist_ts"].reason


def test_bad_images_are_invalid_argument(stub: classifier_pb2_grpc.ClassifierStub) -> None:
    truncated = _encode(_picture("RGB", (30, 30), 2))[:60]
    cases = {
        "image 0: not a decodable PNG or JPEG": [pb.Image(encoded=b"\x89PNG\r\n garbage")],
        "image 1: not a decodable PNG or JPEG": [
            pb.Image(encoded=_encode(_picture("L", (28, 28), 3))),
            pb.Image(encoded=truncated),
        ],
        "expected shape [1,28,28] (C,H,W), got [3,28,28]": [
            pb.Image(tensor=pb.Tensor(shape=[3, 28, 28], datatype="UINT8", data=bytes(2352)))
        ],
        "needs 784 bytes (784 values), got 10": [
            pb.Image(tensor=pb.Tensor(shape=[1, 28, 28], datatype="UINT8", data=bytes(10)))
        ],
        "expected at least one image": [],
    }
    for expected, images in cases.items():
        with pytest.raises(grpc.RpcError) as caught:
            stub.Classify(pb.ClassifyRequest(model="fashion_mnist", images=images), timeout=10)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, expected
        assert expected in caught.value.details()
