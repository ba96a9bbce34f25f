"""The KServe v2 protocol over HTTP/REST against a real server, with tritonclient.http.

Every answer is checked against the same call over gRPC (tritonclient.grpc) field by field,
and inference outputs against onnxruntime run directly on the model files: a client that
switches transport must see the same answers.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from google.protobuf import json_format
from http_calls import http_post
from server_process import ServerProcess, onnx_probabilities
from tritonclient.utils import InferenceServerException

from modelrepo.layout import read_labels
from server.api.status import REQUEST_ID_KEY
from wire import grpc_service_pb2 as pb
from wire import model_config_pb2

SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve()


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> Iterator[httpclient.InferenceServerClient]:
    client = httpclient.InferenceServerClient(server.http_target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def grpc(server: ServerProcess) -> Iterator[grpcclient.InferenceServerClient]:
    client = grpcclient.InferenceServerClient(server.target)
    yield client
    client.close()


def _images(model: str, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPES[model]), dtype=np.float32)


def _reference(server: ServerProcess, model: str, images: np.ndarray) -> np.ndarray:
    return onnx_probabilities(server.repository / model / "1" / "model.onnx", images)


def _http_input(images: np.ndarray, binary: bool = True) -> httpclient.InferInput:
    datatype = "UINT8" if images.dtype == np.uint8 else "FP32"
    tensor = httpclient.InferInput("input", list(images.shape), datatype)
    tensor.set_data_from_numpy(images, binary_data=binary)
    return tensor


def _grpc_input(images: np.ndarray) -> grpcclient.InferInput:
    datatype = "UINT8" if images.dtype == np.uint8 else "FP32"
    tensor = grpcclient.InferInput("input", list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return tensor


def _as_message(document: Any, message: Any) -> Any:
    """Triton's JSON parsed into the protocol's message: equal messages, equal answers."""
    return json_format.ParseDict(document, message, ignore_unknown_fields=False)


def _same(ours: Any, theirs: Any) -> bool:
    """Our message and tritonclient's (another package, the same fields) hold the same."""
    return ours.SerializeToString(deterministic=True) == theirs.SerializeToString(
        deterministic=True
    )


def test_health_and_readiness_match_grpc(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    assert http.is_server_live() and grpc.is_server_live()
    assert http.is_server_ready() and grpc.is_server_ready()
    for model, version in [
        ("fashion_mnist", ""),
        ("fashion_mnist", "1"),
        ("cifar10", ""),
        ("fashion_mnist", "9"),
        ("no_such_model", ""),
    ]:
        assert http.is_model_ready(model, version) == grpc.is_model_ready(model, version)
    assert not http.is_model_ready("fashion_mnist", "9")


def test_metadata_and_config_match_grpc_field_by_field(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    server = http.get_server_metadata()
    assert server == json_format.MessageToDict(grpc.get_server_metadata())
    assert {"binary_tensor_data", "schedule_policy", "statistics"} <= set(server["extensions"])
    for model in ("fashion_mnist", "cifar10", "fashion_mnist_ts"):
        metadata = http.get_model_metadata(model)
        assert metadata["inputs"][0]["shape"] == [-1, *SHAPES.get(model, (1, 28, 28))]
        ours = _as_message(metadata, pb.ModelMetadataResponse())
        assert _same(ours, grpc.get_model_metadata(model))
        config = http.get_model_config(model)
        assert isinstance(config["max_batch_size"], int)  # numbers, not protobuf's strings
        assert config["input"][0]["dims"] == list(SHAPES.get(model, (1, 28, 28)))
        ours = _as_message(config, model_config_pb2.ModelConfig())
        assert _same(ours, grpc.get_model_config(model).config)
    assert http.get_model_metadata("cifar10", "1")["versions"] == ["1"]


@pytest.mark.parametrize("model", ["fashion_mnist", "cifar10"])
@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_infer_matches_onnxruntime_and_grpc(
    http: httpclient.InferenceServerClient,
    grpc: grpcclient.InferenceServerClient,
    server: ServerProcess,
    model: str,
    binary: bool,
) -> None:
    images = _images(model, 5, seed=3)
    wanted = [httpclient.InferRequestedOutput("probabilities", binary_data=binary)]
    result = http.infer(model, [_http_input(images, binary)], outputs=wanted, request_id="h-1")
    response = result.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == (
        model,
        "1",
        "h-1",
    )
    [output] = response["outputs"]
    assert (output["name"], output["datatype"], output["shape"]) == (
        "probabilities",
        "FP32",
        [5, 10],
    )
    assert ("data" in output) != binary and ("parameters" in output) == binary
    probabilities = result.as_numpy("probabilities")
    np.testing.assert_allclose(probabilities, _reference(server, model, images), atol=1e-6)
    over_grpc = grpc.infer(model, [_grpc_input(images)]).as_numpy("probabilities")
    np.testing.assert_array_equal(probabilities, over_grpc)


def test_outputs_default_to_json_unless_binary_data_output(server: ServerProcess) -> None:
    images = _images("fashion_mnist", 2)
    body = {
        "inputs": [
            {"name": "input", "datatype": "FP32", "shape": [2, 1, 28, 28], "data": images.tolist()}
        ]
    }
    status, headers, answer = http_post(server, "/v2/models/fashion_mnist/infer", body)
    assert status == 200 and "Inference-Header-Content-Length" not in headers
    data = np.array(json.loads(answer)["outputs"][0]["data"], np.float32).reshape(2, 10)
    np.testing.assert_allclose(data, _reference(server, "fashion_mnist", images), atol=1e-6)
    body["parameters"] = {"binary_data_output": True}
    status, headers, answer = http_post(server, "/v2/models/fashion_mnist/infer", body)
    length = int(headers["Inference-Header-Content-Length"])
    header = json.loads(answer[:length])
    assert header["outputs"][0]["parameters"] == {"binary_data_size": 80}
    np.testing.assert_array_equal(np.frombuffer(answer[length:], "<f4").reshape(2, 10), data)


def test_uint8_and_classification_match_grpc(
    http: httpclient.InferenceServerClient,
    grpc: grpcclient.InferenceServerClient,
    server: ServerProcess,
) -> None:
    pixels = np.random.default_rng(7).integers(0, 256, (3, 3, 32, 32), dtype=np.uint8)
    for binary in (True, False):
        out = http.infer("cifar10", [_http_input(pixels, binary)]).as_numpy("probabilities")
        np.testing.assert_array_equal(
            out, grpc.infer("cifar10", [_grpc_input(pixels)]).as_numpy("probabilities")
        )
    images = _images("fashion_mnist", 4, seed=5)
    labels = read_labels(server.repository / "fashion_mnist" / "labels.txt")
    for binary in (True, False):
        wanted = httpclient.InferRequestedOutput("probabilities", binary, class_count=3)
        top = http.infer("fashion_mnist", [_http_input(images)], outputs=[wanted])
        strings = top.as_numpy("probabilities")
        assert strings.shape == (4, 3)
        theirs = grpc.infer(
            "fashion_mnist",
            [_grpc_input(images)],
            outputs=[grpcclient.InferRequestedOutput("probabilities", class_count=3)],
        ).as_numpy("probabilities")
        assert [s if isinstance(s, bytes) else s.encode() for s in strings.ravel()] == list(
            theirs.ravel()
        )
    first = theirs[0][0].decode().split(":")
    assert first[2] in labels


@pytest.mark.parametrize("algorithm", ["gzip", "deflate"])
def test_compressed_requests_and_answers(
    http: httpclient.InferenceServerClient, server: ServerProcess, algorithm: str
) -> None:
    images = _images("fashion_mnist", 3, seed=4)
    result = http.infer(
        "fashion_mnist",
        [_http_input(images)],
        request_compression_algorithm=algorithm,
        response_compression_algorithm=algorithm,
    )
    expected = _reference(server, "fashion_mnist", images)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, atol=1e-6)
    body = _json_body_of(images)
    status, headers, _ = http_post(
        server, "/v2/models/fashion_mnist/infer", body, headers={"Accept-Encoding": algorithm}
    )
    assert status == 200 and headers["Content-Encoding"] == algorithm


def _json_body_of(images: np.ndarray) -> dict[str, Any]:
    shape = list(images.shape)
    tensor = {"name": "input", "datatype": "FP32", "shape": shape, "data": images.tolist()}
    return {"inputs": [tensor]}


def test_raw_binary_request_without_a_json_header(server: ServerProcess) -> None:
    """Triton's raw binary request: Inference-Header-Content-Length 0, the body one image."""
    image = _images("fashion_mnist", 1, seed=9)
    request = urllib.request.Request(
        f"{server.http_url}/v2/models/fashion_mnist/infer",
        data=image.tobytes(),
        headers={"Inference-Header-Content-Length": "0"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        length = int(answer.headers["Inference-Header-Content-Length"])
        body = answer.read()
    assert json.loads(body[:length])["outputs"][0]["shape"] == [1, 10]
    got = np.frombuffer(body[length:], "<f4").reshape(1, 10)
    np.testing.assert_allclose(got, _reference(server, "fashion_mnist", image), atol=1e-6)


def test_statistics_and_repository_index_match_grpc(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    http.infer("cifar10", [_http_input(_images("cifar10", 2))])
    grpc.infer("cifar10", [_grpc_input(_images("cifar10", 2))])
    for name, version in [("cifar10", ""), ("cifar10", "1"), ("", "")]:
        ours = _as_message(
            http.get_inference_statistics(name, version), pb.ModelStatisticsResponse()
        )
        theirs = grpc.get_inference_statistics(name, version)
        assert _same(ours, theirs)  # nothing ran between the two calls
    stats = http.get_inference_statistics("cifar10")["model_stats"][0]
    assert isinstance(stats["inference_count"], int) and stats["inference_count"] >= 4
    index = http.get_model_repository_index()
    assert index == [
        json_format.MessageToDict(m, preserving_proto_field_name=True)
        for m in grpc.get_model_repository_index().models
    ]
    assert {(m["name"], m["state"]) for m in index} == {
        ("cifar10", "READY"),
        ("fashion_mnist", "READY"),
        ("fashion_mnist_ts", "READY"),
    }


def test_statistics_count_http_and_grpc_requests_like_triton(
    http: httpclient.InferenceServerClient, grpc: grpcclient.InferenceServerClient
) -> None:
    """Queue, compute_input, compute_infer, compute_output and success count once per request
    (perf_analyzer refuses a server whose compute counts differ); a request larger than
    max_batch_size (64) is split into batches but counted once; batch_stats count batches."""

    def stats() -> pb.ModelStatistics:
        return grpc.get_inference_statistics("fashion_mnist").model_stats[0]

    before = stats()
    http.infer("fashion_mnist", [_http_input(_images("fashion_mnist", 3))])
    grpc.infer("fashion_mnist", [_grpc_input(_images("fashion_mnist", 2))])
    http.infer("fashion_mnist", [_http_input(_images("fashion_mnist", 100), binary=False)])
    with pytest.raises(InferenceServerException):
        http.infer("fashion_mnist", [_http_input(_images("cifar10", 1))])  # wrong shape
    after = stats()
    change = {
        name: getattr(after.inference_stats, name).count
        - getattr(before.inference_stats, name).count
        for name in ("success", "queue", "compute_input", "compute_infer", "compute_output", "fail")
    }
    assert change == {
        "success": 3, "queue": 3, "compute_input": 3, "compute_infer": 3, "compute_output": 3,
        "fail": 1,
    }  # fmt: skip
    for name in ("compute_input", "compute_infer", "compute_output", "success"):
        assert getattr(after.inference_stats, name).ns > getattr(before.inference_stats, name).ns
    assert after.inference_count - before.inference_count == 105
    batches = after.execution_count - before.execution_count
    assert batches == 4  # 3, 2, and the 100 images as 64 + 36
    sizes = {b.batch_size: b for b in after.batch_stats}
    assert {3, 2, 64, 36} <= set(sizes)
    for batch in after.batch_stats:
        assert batch.compute_input.count == batch.compute_infer.count == batch.compute_output.count
        assert batch.compute_input.ns > 0 and batch.compute_output.ns > 0


def test_request_ids_and_metrics_label_the_api(server: ServerProcess) -> None:
    before = server.metric("imgserve_requests_total", api="http", model="cifar10", code="OK")
    bad = server.metric("imgserve_requests_total", api="http", code="NOT_FOUND")
    body = {"inputs": [{"name": "input", "datatype": "FP32", "shape": [1, 3, 32, 32],
                        "data": [0.5] * 3072}]}  # fmt: skip
    status, headers, _ = http_post(
        server, "/v2/models/cifar10/infer", body, headers={REQUEST_ID_KEY: "order-42"}
    )
    assert status == 200 and headers[REQUEST_ID_KEY] == "order-42"
    status, headers, answer = http_post(server, "/v2/models/nope/infer", body)
    assert status == 404 and len(headers[REQUEST_ID_KEY]) == 32
    assert json.loads(answer) == {"error": "Request for unknown model: 'nope' is not found"}
    after = server.metric("imgserve_requests_total", api="http", model="cifar10", code="OK")
    assert after - before == 1
    assert server.metric("imgserve_requests_total", api="http", code="NOT_FOUND") - bad == 1


# --- the repository extension, on a server of its own: it changes what is served ---


@pytest.fixture(scope="module")
def control_server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve("--enable-model-control", "--workers", "2", models=["fashion_mnist"])


def test_unload_and_load_over_http_on_every_worker(control_server: ServerProcess) -> None:
    http = httpclient.InferenceServerClient(control_server.http_target)
    grpc = grpcclient.InferenceServerClient(control_server.target)
    try:
        http.unload_model("fashion_mnist")
        assert not http.is_model_ready("fashion_mnist") and not grpc.is_model_ready("fashion_mnist")
        with pytest.raises(InferenceServerException) as caught:
            http.infer("fashion_mnist", [_http_input(_images("fashion_mnist", 1))])
        assert caught.value.status() == "503"
        index = {m["name"]: m["state"] for m in http.get_model_repository_index()}
        assert index == {"fashion_mnist": "UNAVAILABLE"}
        http.load_model("fashion_mnist")
        assert http.is_model_ready("fashion_mnist") and grpc.is_server_ready()
        with pytest.raises(InferenceServerException) as caught:
            http.unload_model("no_such_model")
        assert caught.value.status() == "404"
        # Every worker answers (connections spread over them): ready everywhere.
        for _ in range(8):
            with httpclient.InferenceServerClient(control_server.http_target) as fresh:
                assert fresh.is_model_ready("fashion_mnist")
    finally:
        http.close()
        grpc.close()
