"""The KServe v2 protocol against a real server, with tritonclient and raw gRPC stubs.

Outputs are compared with onnxruntime run directly on the model files of the repository.
"""

from __future__ import annotations

import queue
import shutil
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_process import ServerProcess, copy_repository, kserve_method, onnx_probabilities
from tritonclient.utils import InferenceServerException

from modelrepo.layout import read_labels
from wire import grpc_service_pb2 as pb

SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.fixture(scope="module")
def repository(model_repository: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    # A private copy: the load/unload test adds a version to it.
    return copy_repository(model_repository, tmp_path_factory.mktemp("kserve") / "repository")


@pytest.fixture(scope="module")
def server(repository: Path) -> Iterator[ServerProcess]:
    with ServerProcess(repository) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> Iterator[triton.InferenceServerClient]:
    client = triton.InferenceServerClient(server.target)
    yield client
    client.close()


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.target) as channel:
        yield channel


def _images(model: str, n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPES[model]), dtype=np.float32)


def _infer(
    client: triton.InferenceServerClient, model: str, images: np.ndarray, **kwargs: object
) -> triton.InferResult:
    datatype = "UINT8" if images.dtype == np.uint8 else "FP32"
    tensor = triton.InferInput("input", list(images.shape), datatype)
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor], **kwargs)


def _reference(repository: Path, model: str, images: np.ndarray) -> np.ndarray:
    return onnx_probabilities(repository / model / "1" / "model.onnx", images)


def test_live_and_ready(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    for model in ("fashion_mnist", "fashion_mnist_ts", "cifar10"):
        assert client.is_model_ready(model)
        assert client.is_model_ready(model, "1")
    assert not client.is_model_ready("fashion_mnist", "9")
    assert not client.is_model_ready("no_such_model")


def test_server_metadata(client: triton.InferenceServerClient) -> None:
    metadata = client.get_server_metadata()
    assert metadata.name == "imgserve"
    assert metadata.version
    assert {"classification", "model_repository", "statistics"} <= set(metadata.extensions)


@pytest.mark.parametrize("model", ["fashion_mnist", "cifar10"])
def test_model_metadata(client: triton.InferenceServerClient, model: str) -> None:
    metadata = client.get_model_metadata(model)
    assert metadata.name == model
    assert list(metadata.versions) == ["1"]
    assert metadata.platform == "onnxruntime_onnx"
    [tensor] = metadata.inputs
    assert (tensor.name, tensor.datatype, list(tensor.shape)) == (
        "input",
        "FP32",
        [-1, *SHAPES[model]],
    )
    [output] = metadata.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("probabilities", "FP32", [-1, 10])


def test_model_config(client: triton.InferenceServerClient) -> None:
    config = client.get_model_config("cifar10").config
    assert config.name == "cifar10"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert list(config.input[0].dims) == [3, 32, 32]
    assert config.input[0].name == "input"
    assert list(config.output[0].dims) == [10]
    assert config.output[0].label_filename == "labels.txt"
    assert config.dynamic_batching.max_queue_delay_microseconds > 0


@pytest.mark.parametrize("model", ["fashion_mnist", "cifar10"])
@pytest.mark.parametrize("batch", [1, 37])
def test_infer_raw_matches_onnxruntime(
    client: triton.InferenceServerClient, repository: Path, model: str, batch: int
) -> None:
    images = _images(model, batch, seed=batch)
    result = _infer(client, model, images, request_id=f"req-{batch}")
    probabilities = result.as_numpy("probabilities")
    assert probabilities.shape == (batch, 10) and probabilities.dtype == np.float32
    np.testing.assert_allclose(
        probabilities, _reference(repository, model, images), rtol=0, atol=1e-6
    )
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    response = result.get_response()
    assert (response.id, response.model_name, response.model_version) == (
        f"req-{batch}",
        model,
        "1",
    )


@pytest.mark.parametrize("model", ["fashion_mnist", "cifar10"])
@pytest.mark.parametrize("batch", [1, 37])
def test_infer_typed_contents(
    channel: grpc.Channel, repository: Path, model: str, batch: int
) -> None:
    """Typed fp32_contents in, typed fp32_contents out (no raw bytes either way)."""
    images = _images(model, batch, seed=100 + batch)
    request = pb.ModelInferRequest(model_name=model, id="typed")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    tensor.contents.fp32_contents.extend(images.ravel().tolist())
    response = kserve_method(channel, "ModelInfer")(request, timeout=30)
    assert not response.raw_output_contents
    [output] = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == (
        "probabilities",
        "FP32",
        [batch, 10],
    )
    probabilities = np.array(output.contents.fp32_contents, dtype=np.float32).reshape(batch, 10)
    np.testing.assert_allclose(
        probabilities, _reference(repository, model, images), rtol=0, atol=1e-6
    )


def test_uint8_input_raw_and_typed(
    client: triton.InferenceServerClient, channel: grpc.Channel, repository: Path
) -> None:
    pixels = np.random.default_rng(7).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    expected = _reference(repository, "cifar10", pixels.astype(np.float32) / np.float32(255))
    raw = _infer(client, "cifar10", pixels).as_numpy("probabilities")
    np.testing.assert_allclose(raw, expected, rtol=0, atol=1e-6)

    request = pb.ModelInferRequest(model_name="cifar10")
    tensor = request.inputs.add(name="input", datatype="UINT8", shape=pixels.shape)
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    response = kserve_method(channel, "ModelInfer")(request, timeout=30)
    typed = np.array(response.outputs[0].contents.fp32_contents, np.float32).reshape(5, 10)
    np.testing.assert_array_equal(typed, raw)


def test_classification_extension(
    client: triton.InferenceServerClient, channel: grpc.Channel, repository: Path
) -> None:
    images = _images("fashion_mnist", 4, seed=3)
    expected = _reference(repository, "fashion_mnist", images)
    labels = read_labels(repository / "fashion_mnist" / "labels.txt")
    wanted = triton.InferRequestedOutput("probabilities", class_count=3)
    result = _infer(client, "fashion_mnist", images, outputs=[wanted])
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 3)
    for row, entries in zip(expected, top, strict=True):
        order = np.argsort(-row, kind="stable")[:3]
        parsed = [entry.decode().split(":", 2) for entry in entries]
        assert [int(index) for _, index, _ in parsed] == order.tolist()
        assert [label for _, _, label in parsed] == [labels[i] for i in order]
        for (probability, _, _), i in zip(parsed, order, strict=True):
            assert abs(float(probability) - row[i]) <= 1e-6

    # A typed request gets the same strings in bytes_contents.
    request = pb.ModelInferRequest(model_name="fashion_mnist")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    tensor.contents.fp32_contents.extend(images.ravel().tolist())
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    response = kserve_method(channel, "ModelInfer")(request, timeout=30)
    [output] = response.outputs
    assert (output.datatype, list(output.shape)) == ("BYTES", [4, 3])
    assert list(output.contents.bytes_contents) == top.ravel().tolist()


def test_torchscript_matches_onnx(client: triton.InferenceServerClient) -> None:
    images = _images("fashion_mnist", 9, seed=11)
    onnx = _infer(client, "fashion_mnist", images).as_numpy("probabilities")
    torchscript = _infer(client, "fashion_mnist_ts", images).as_numpy("probabilities")
    np.testing.assert_allclose(torchscript, onnx, rtol=0, atol=1e-5)


def test_stream_infer_answers_every_request(
    client: triton.InferenceServerClient, repository: Path
) -> None:
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        images = {f"s{i}": _images("fashion_mnist", 1 + i, seed=20 + i) for i in range(5)}
        for request_id, batch in images.items():
            tensor = triton.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            client.async_stream_infer("fashion_mnist", [tensor], request_id=request_id)
        bad = triton.InferInput("input", [1, 1, 28, 28], "FP32")
        bad.set_data_from_numpy(images["s0"])
        client.async_stream_infer("no_such_model", [bad], request_id="bad")
        results, errors = {}, []
        for _ in range(len(images) + 1):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                results[result.get_response().id] = result.as_numpy("probabilities")
    finally:
        client.stop_stream()
    assert len(errors) == 1 and "no_such_model" in str(errors[0])
    assert set(results) == set(images)
    for request_id, batch in images.items():
        expected = _reference(repository, "fashion_mnist", batch)
        np.testing.assert_allclose(results[request_id], expected, rtol=0, atol=1e-6)


def test_statistics_count_inferences(client: triton.InferenceServerClient) -> None:
    def stats() -> pb.ModelStatistics:
        [model] = client.get_inference_statistics("cifar10").model_stats
        return model

    before = stats()
    for seed in range(2):
        _infer(client, "cifar10", _images("cifar10", 3, seed=seed))
    after = stats()
    assert (after.name, after.version) == ("cifar10", "1")
    assert after.inference_count - before.inference_count == 6
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    assert 1 <= after.execution_count - before.execution_count <= 2
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.last_inference >= before.last_inference > 0
    every = client.get_inference_statistics().model_stats
    assert {s.name for s in every} == {"fashion_mnist", "fashion_mnist_ts", "cifar10"}


def test_repository_index(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index().models
    assert {(m.name, m.version, m.state) for m in index} == {
        ("fashion_mnist", "1", "READY"),
        ("fashion_mnist_ts", "1", "READY"),
        ("cifar10", "1", "READY"),
    }


def test_health(channel: grpc.Channel) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "inference.GRPCInferenceService", "fashion_mnist", "cifar10"):
        response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
        assert response.status == health_pb2.HealthCheckResponse.SERVING, service
    with pytest.raises(grpc.RpcError) as caught:
        health.Check(health_pb2.HealthCheckRequest(service="no_such_model"), timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_lists_services_under_wire_names(channel: grpc.Channel) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    def ask(**request: str) -> reflection_pb2.ServerReflectionResponse:
        [response] = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(**request)]), timeout=10
        )
        return response

    services = {s.name for s in ask(list_services="").list_services_response.service}
    assert {
        "inference.GRPCInferenceService",
        "imgserve.classifier.v1.Classifier",
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services
    files = ask(file_containing_symbol="inference.GRPCInferenceService")
    protos = [
        descriptor_pb2.FileDescriptorProto.FromString(raw)
        for raw in files.file_descriptor_response.file_descriptor_proto
    ]
    [service_file] = [p for p in protos if p.service]
    assert service_file.package == "inference"
    methods = {m.name: m for m in service_file.service[0].method}
    assert methods["ModelInfer"].input_type == ".inference.ModelInferRequest"
    config = next(p for p in protos if any(m.name == "ModelConfig" for m in p.message_type))
    assert config.package == "inference"  # the dependency is renamed consistently


def test_unload_and_load_a_new_version(
    client: triton.InferenceServerClient, channel: grpc.Channel, repository: Path
) -> None:
    """Runs last in this module: it changes what the server serves, then restores it."""
    health = health_pb2_grpc.HealthStub(channel)
    request = health_pb2.HealthCheckRequest(service="fashion_mnist")
    client.unload_model("fashion_mnist")
    assert not client.is_model_ready("fashion_mnist")
    assert health.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.NOT_SERVING
    with pytest.raises(InferenceServerException) as caught:
        _infer(client, "fashion_mnist", _images("fashion_mnist", 1))
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    states = {m.name: m.state for m in client.get_model_repository_index().models}
    assert states["fashion_mnist"] == "UNAVAILABLE"

    shutil.copytree(repository / "fashion_mnist" / "1", repository / "fashion_mnist" / "2")
    client.load_model("fashion_mnist")
    assert client.is_model_ready("fashion_mnist", "2")
    assert client.get_model_metadata("fashion_mnist").versions == ["2"]
    assert health.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
    result = _infer(client, "fashion_mnist", _images("fashion_mnist", 2))
    assert result.get_response().model_version == "2"
    assert client.is_server_ready()

    with pytest.raises(InferenceServerException) as caught:
        client.unload_model("no_such_model")
    assert caught.value.status() == "StatusCode.NOT_FOUND"
