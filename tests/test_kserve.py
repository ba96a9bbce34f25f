"""The KServe v2 protocol against a real server, with tritonclient and raw gRPC stubs, on
each gRPC transport.

Outputs are compared with onnxruntime run directly on the model files of the repository.
Tests that load and unload models have a server of their own, so the others see one that
never changes.
"""

from __future__ import annotations

import io
import queue
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as triton
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from PIL import Image
from server_process import ServerProcess, kserve_method, onnx_probabilities
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from modelrepo.layout import next_version, read_labels
from server.api.status import TRANSPORT_KEY
from wire import classifier_pb2, classifier_pb2_grpc
from wire import grpc_service_pb2 as pb

pytestmark = pytest.mark.both_transports
SHAPES = {"fashion_mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve()


@pytest.fixture(scope="module")
def repository(server: ServerProcess) -> Path:
    return server.repository


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


def test_live_and_ready(triton_client: triton.InferenceServerClient) -> None:
    assert triton_client.is_server_live()
    assert triton_client.is_server_ready()
    for model in ("fashion_mnist", "fashion_mnist_ts", "cifar10"):
        assert triton_client.is_model_ready(model)
        assert triton_client.is_model_ready(model, "1")
    assert not triton_client.is_model_ready("fashion_mnist", "9")
    assert not triton_client.is_model_ready("no_such_model")


def test_the_transport_asked_for_answers(
    server: ServerProcess, channel: grpc.Channel, grpc_transport: str
) -> None:
    """On native, pygrpc-native's front itself (not the grpcio server behind it) answers
    ModelInfer and Classify; bidirectional streams go to that grpcio server."""
    assert f"gRPC transport: {grpc_transport}" in server.log
    pixels = _images("fashion_mnist", 1)
    request = pb.ModelInferRequest(model_name="fashion_mnist")
    request.inputs.add(name="input", datatype="FP32", shape=list(pixels.shape))
    request.raw_input_contents.append(pixels.tobytes())
    _, infer = kserve_method(channel, "ModelInfer").with_call(request, timeout=10)
    tensor = classifier_pb2.Tensor(shape=pixels.shape[1:], datatype="FP32", data=pixels.tobytes())
    _, classify = classifier_pb2_grpc.ClassifierStub(channel).Classify.with_call(
        classifier_pb2.ClassifyRequest(
            model="fashion_mnist", images=[classifier_pb2.Image(tensor=tensor)]
        ),
        timeout=10,
    )
    stream = kserve_method(channel, "ModelStreamInfer")(iter([request]), timeout=10)
    assert [answer.error_message for answer in stream] == [""]
    answered = {
        name: dict(call.trailing_metadata())[TRANSPORT_KEY]
        for name, call in (("ModelInfer", infer), ("Classify", classify), ("stream", stream))
    }
    front = "native" if grpc_transport == "native" else "grpcio"
    assert answered == {"ModelInfer": front, "Classify": front, "stream": "grpcio"}


def test_server_metadata(triton_client: triton.InferenceServerClient) -> None:
    metadata = triton_client.get_server_metadata()
    assert metadata.name == "imgserve"
    assert metadata.version
    assert {"classification", "model_repository", "statistics"} <= set(metadata.extensions)


@pytest.mark.parametrize("model", ["fashion_mnist", "cifar10"])
def test_model_metadata(triton_client: triton.InferenceServerClient, model: str) -> None:
    metadata = triton_client.get_model_metadata(model)
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


def test_model_config(triton_client: triton.InferenceServerClient) -> None:
    config = triton_client.get_model_config("cifar10").config
    assert config.name == "cifar10"
    assert config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 64
    assert list(config.input[0].dims) == [3, 32, 32]
    assert config.input[0].name == "input"
    assert list(config.output[0].dims) == [10]
    assert config.output[0].label_filename == "labels.txt"
    assert config.HasField("dynamic_batching")  # the server always batches dynamically
    assert config.dynamic_batching.max_queue_delay_microseconds == 0  # export's default


@pytest.mark.parametrize("model", ["fashion_mnist", "cifar10"])
@pytest.mark.parametrize("batch", [1, 37])
def test_infer_raw_matches_onnxruntime(
    triton_client: triton.InferenceServerClient, repository: Path, model: str, batch: int
) -> None:
    images = _images(model, batch, seed=batch)
    result = _infer(triton_client, model, images, request_id=f"req-{batch}")
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
    """Typed fp32_contents in; out in raw_output_contents, as Triton always answers."""
    images = _images(model, batch, seed=100 + batch)
    request = pb.ModelInferRequest(model_name=model, id="typed")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    tensor.contents.fp32_contents.extend(images.ravel().tolist())
    response = kserve_method(channel, "ModelInfer")(request, timeout=30)
    [output] = response.outputs
    assert not output.HasField("contents")
    assert (output.name, output.datatype, list(output.shape)) == (
        "probabilities",
        "FP32",
        [batch, 10],
    )
    [raw] = response.raw_output_contents
    probabilities = np.frombuffer(raw, np.float32).reshape(batch, 10)
    np.testing.assert_allclose(
        probabilities, _reference(repository, model, images), rtol=0, atol=1e-6
    )


def test_uint8_input_raw_and_typed(
    triton_client: triton.InferenceServerClient, channel: grpc.Channel, repository: Path
) -> None:
    pixels = np.random.default_rng(7).integers(0, 256, (5, 3, 32, 32), dtype=np.uint8)
    expected = _reference(repository, "cifar10", pixels.astype(np.float32) / np.float32(255))
    raw = _infer(triton_client, "cifar10", pixels).as_numpy("probabilities")
    np.testing.assert_allclose(raw, expected, rtol=0, atol=1e-6)

    request = pb.ModelInferRequest(model_name="cifar10")
    tensor = request.inputs.add(name="input", datatype="UINT8", shape=pixels.shape)
    tensor.contents.uint_contents.extend(pixels.ravel().tolist())
    response = kserve_method(channel, "ModelInfer")(request, timeout=30)
    typed = np.frombuffer(response.raw_output_contents[0], np.float32).reshape(5, 10)
    np.testing.assert_array_equal(typed, raw)


def test_classification_extension(
    triton_client: triton.InferenceServerClient, channel: grpc.Channel, repository: Path
) -> None:
    images = _images("fashion_mnist", 4, seed=3)
    expected = _reference(repository, "fashion_mnist", images)
    labels = read_labels(repository / "fashion_mnist" / "labels.txt")
    wanted = triton.InferRequestedOutput("probabilities", class_count=3)
    result = _infer(triton_client, "fashion_mnist", images, outputs=[wanted])
    top = result.as_numpy("probabilities")
    assert top.shape == (4, 3)
    for row, entries in zip(expected, top, strict=True):
        order = np.argsort(-row, kind="stable")[:3]
        parsed = [entry.decode().split(":", 2) for entry in entries]
        assert [int(index) for _, index, _ in parsed] == order.tolist()
        assert [label for _, _, label in parsed] == [labels[i] for i in order]
        for (probability, _, _), i in zip(parsed, order, strict=True):
            assert abs(float(probability) - row[i]) <= 1e-6

    # A typed request gets the same strings, in raw_output_contents as Triton sends them.
    request = pb.ModelInferRequest(model_name="fashion_mnist")
    tensor = request.inputs.add(name="input", datatype="FP32", shape=images.shape)
    tensor.contents.fp32_contents.extend(images.ravel().tolist())
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    response = kserve_method(channel, "ModelInfer")(request, timeout=30)
    [output] = response.outputs
    assert (output.datatype, list(output.shape)) == ("BYTES", [4, 3])
    [raw] = response.raw_output_contents
    assert deserialize_bytes_tensor(raw).tolist() == top.ravel().tolist()


def test_torchscript_matches_onnx(triton_client: triton.InferenceServerClient) -> None:
    images = _images("fashion_mnist", 9, seed=11)
    onnx = _infer(triton_client, "fashion_mnist", images).as_numpy("probabilities")
    torchscript = _infer(triton_client, "fashion_mnist_ts", images).as_numpy("probabilities")
    np.testing.assert_allclose(torchscript, onnx, rtol=0, atol=1e-5)


def test_stream_infer_answers_every_request(
    triton_client: triton.InferenceServerClient, repository: Path
) -> None:
    answers: queue.Queue[tuple[object, object]] = queue.Queue()
    triton_client.start_stream(callback=lambda result, error: answers.put((result, error)))
    try:
        images = {f"s{i}": _images("fashion_mnist", 1 + i, seed=20 + i) for i in range(5)}
        for request_id, batch in images.items():
            tensor = triton.InferInput("input", list(batch.shape), "FP32")
            tensor.set_data_from_numpy(batch)
            triton_client.async_stream_infer("fashion_mnist", [tensor], request_id=request_id)
        bad = triton.InferInput("input", [1, 1, 28, 28], "FP32")
        bad.set_data_from_numpy(images["s0"])
        triton_client.async_stream_infer("no_such_model", [bad], request_id="bad")
        results, errors = {}, []
        for _ in range(len(images) + 1):
            result, error = answers.get(timeout=30)
            if error is not None:
                errors.append(error)
            else:
                results[result.get_response().id] = result.as_numpy("probabilities")
    finally:
        triton_client.stop_stream()
    assert len(errors) == 1 and "no_such_model" in str(errors[0])
    assert set(results) == set(images)
    for request_id, batch in images.items():
        expected = _reference(repository, "fashion_mnist", batch)
        np.testing.assert_allclose(results[request_id], expected, rtol=0, atol=1e-6)


def test_statistics_count_inferences(triton_client: triton.InferenceServerClient) -> None:
    def stats() -> pb.ModelStatistics:
        [model] = triton_client.get_inference_statistics("cifar10").model_stats
        return model

    before = stats()
    for seed in range(2):
        _infer(triton_client, "cifar10", _images("cifar10", 3, seed=seed))
    after = stats()
    assert (after.name, after.version) == ("cifar10", "1")
    assert after.inference_count - before.inference_count == 6
    assert after.inference_stats.success.count - before.inference_stats.success.count == 2
    assert 1 <= after.execution_count - before.execution_count <= 2
    assert after.inference_stats.success.ns > before.inference_stats.success.ns
    assert after.last_inference >= before.last_inference > 0
    every = triton_client.get_inference_statistics().model_stats
    assert {s.name for s in every} == {"fashion_mnist", "fashion_mnist_ts", "cifar10"}


def test_repository_index(triton_client: triton.InferenceServerClient) -> None:
    index = triton_client.get_model_repository_index().models
    assert {(m.name, m.version, m.state) for m in index} == {
        ("fashion_mnist", "1", "READY"),
        ("fashion_mnist_ts", "1", "READY"),
        ("cifar10", "1", "READY"),
    }


def test_model_control_is_refused_by_default(triton_client: triton.InferenceServerClient) -> None:
    """Without --enable-model-control, load and unload are refused and nothing changes."""
    for call in (triton_client.unload_model, triton_client.load_model):
        with pytest.raises(InferenceServerException) as caught:
            call("fashion_mnist")
        assert caught.value.status() == "StatusCode.FAILED_PRECONDITION"
        assert "start the server with --enable-model-control" in caught.value.message()
    assert triton_client.is_model_ready("fashion_mnist")
    assert len(triton_client.get_model_repository_index().models) == 3  # the index stays open


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


# --- the model repository extension, on a server of its own: it changes what is served ---
# Each test adds the next version of `fashion_mnist` and leaves it loaded, so they pass in
# any order.


@pytest.fixture(scope="module")
def reload_server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve("--enable-model-control", models=["fashion_mnist"])


def _add_version(server: ServerProcess) -> str:
    """Copy version 1 of fashion_mnist to the next version number; returns that number."""
    model_dir = server.repository / "fashion_mnist"
    version = next_version(model_dir)
    shutil.copytree(model_dir / "1", model_dir / str(version))
    return str(version)


def test_unload_and_load_a_new_version(reload_server: ServerProcess) -> None:
    target = reload_server.target
    with triton.InferenceServerClient(target) as client, grpc.insecure_channel(target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        request = health_pb2.HealthCheckRequest(service="fashion_mnist")
        client.unload_model("fashion_mnist")
        assert not client.is_model_ready("fashion_mnist")
        not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
        assert health.Check(request, timeout=10).status == not_serving
        with pytest.raises(InferenceServerException) as caught:
            _infer(client, "fashion_mnist", _images("fashion_mnist", 1))
        assert caught.value.status() == "StatusCode.UNAVAILABLE"
        states = {m.name: m.state for m in client.get_model_repository_index().models}
        assert states["fashion_mnist"] == "UNAVAILABLE"

        version = _add_version(reload_server)
        client.load_model("fashion_mnist")
        assert client.is_model_ready("fashion_mnist", version)
        assert client.get_model_metadata("fashion_mnist").versions == [version]
        assert health.Check(request, timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        result = _infer(client, "fashion_mnist", _images("fashion_mnist", 2))
        assert result.get_response().model_version == version
        assert client.is_server_ready()

        with pytest.raises(InferenceServerException) as caught:
            client.unload_model("no_such_model")
        assert caught.value.status() == "StatusCode.NOT_FOUND"


# About 1 s to decode (in a server thread) against tens of milliseconds to load the model.
DECODE_SIDE = 6000
DECODE_IMAGES = 8


def test_reload_while_native_images_decode(reload_server: ServerProcess) -> None:
    """A native request still decoding its images when a reload replaces the version it was
    resolved to is answered by the new version, not refused."""
    buffer = io.BytesIO()
    Image.new("L", (DECODE_SIDE, DECODE_SIDE), 120).save(buffer, format="PNG", compress_level=1)
    image = classifier_pb2.Image(encoded=buffer.getvalue())
    request = classifier_pb2.ClassifyRequest(model="fashion_mnist", images=[image] * DECODE_IMAGES)
    target = reload_server.target
    with triton.InferenceServerClient(target) as client, grpc.insecure_channel(target) as channel:
        pending = classifier_pb2_grpc.ClassifierStub(channel).Classify.future(request, timeout=60)
        deadline = time.monotonic() + 10
        # In flight = bound to the current version; decoding follows at once.
        while reload_server.metric("imgserve_inflight_requests", model="fashion_mnist") < 1:
            assert not pending.done(), pending.exception()
            assert time.monotonic() < deadline, "the request never reached the server"
            time.sleep(0.02)
        version = _add_version(reload_server)
        client.load_model("fashion_mnist")  # returns once the old version is closed
        assert not pending.done(), "the images decoded before the reload ended: nothing tested"
        response = pending.result(timeout=60)
    assert (response.model, response.version) == ("fashion_mnist", version)
    assert len(response.results) == DECODE_IMAGES
