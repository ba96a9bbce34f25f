"""Every error code from a real request, against one server on a repository built to fail.

The repository holds, next to a good `fashion_mnist` (the server runs with --max-queue-size 1):
- `slow`: the same model with a 600 ms batching window, for deadlines;
- `queued`: the same model with a 5 s window, for a full queue (room to be sure the next
  request arrives while the first still waits, even on a slow, loaded machine);
- `tampered`: the same model whose reference.npz no longer matches it (fails to load);
- `poisoned`: the same model with a Gather appended whose index is the batch's largest pixel,
  truncated: any batch holding a pixel of exactly 1.0 makes onnxruntime raise at run time.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import TensorProto, helper, numpy_helper
from server_process import (
    ServerProcess,
    clone_model,
    kserve_method,
    onnx_probabilities,
    set_batching,
)
from tritonclient.utils import InferenceServerException

from modelrepo.layout import ONNX_FILE, REFERENCE_FILE
from wire import classifier_pb2, classifier_pb2_grpc
from wire import grpc_service_pb2 as pb

pytestmark = pytest.mark.both_transports
SHAPE = (1, 28, 28)
INTERNAL_MESSAGE = "internal error while serving the request (details are in the server log)"


def _poison(model_file: Path) -> None:
    """Rewrite the graph so that a pixel of 1.0 anywhere in the batch makes it raise."""
    model = onnx.load(model_file)
    graph = model.graph
    output = graph.output[0].name
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == output:
                node.output[i] = "clean"
    graph.initializer.append(numpy_helper.from_array(np.zeros(1, np.float32), "table"))
    graph.node.extend(
        [
            helper.make_node("ReduceMax", ["input"], ["largest"], keepdims=0),
            helper.make_node("Cast", ["largest"], ["index"], to=TensorProto.INT64),
            helper.make_node("Gather", ["table", "index"], ["zero"]),
            helper.make_node("Add", ["clean", "zero"], [output]),
        ]
    )
    onnx.save(model, model_file)
    # Its own reference, from pixels below 1.0 (the load-time check must pass).
    inputs = np.random.default_rng(0).random((4, *SHAPE), dtype=np.float32) * 0.9
    outputs = onnx_probabilities(model_file, inputs)
    np.savez(model_file.parent / REFERENCE_FILE, inputs=inputs, outputs=outputs)


QUEUE_WINDOW_US = 5_000_000


def _build(repo: Path) -> None:
    source = repo / "fashion_mnist"
    set_batching(clone_model(source, repo, "slow"), max_queue_delay_us=600_000)
    set_batching(clone_model(source, repo, "queued"), max_queue_delay_us=QUEUE_WINDOW_US)

    tampered = clone_model(source, repo, "tampered") / "1" / REFERENCE_FILE
    with np.load(tampered) as data:
        inputs, outputs = data["inputs"], data["outputs"]
    np.savez(tampered, inputs=inputs, outputs=outputs[:, ::-1].copy())

    poisoned = clone_model(source, repo, "poisoned")
    _poison(poisoned / "1" / ONNX_FILE)
    # Four instances: room for four queued requests despite --max-queue-size 1.
    set_batching(poisoned, max_queue_delay_us=300_000, instances=4)


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve(
        "--max-queue-size", "1", "--enable-model-control", models=["fashion_mnist"], prepare=_build
    )


def _images(n: int = 1, seed: int = 0, top: float = 0.9) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32) * top


def _infer(
    client: triton.InferenceServerClient, model: str, images: np.ndarray, **kwargs: object
) -> np.ndarray:
    tensor = triton.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    return client.infer(model, [tensor], **kwargs).as_numpy("probabilities")


def _raw_request() -> pb.ModelInferRequest:
    """A valid one-image request; tests break one thing in it."""
    request = pb.ModelInferRequest(model_name="fashion_mnist")
    request.inputs.add(name="input", datatype="FP32", shape=[1, *SHAPE])
    request.raw_input_contents.append(_images().tobytes())
    return request


def _code_of(call: Callable[[], object]) -> tuple[grpc.StatusCode, str]:
    try:
        call()
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    raise AssertionError("the call succeeded")


def test_not_found(triton_client: triton.InferenceServerClient, channel: grpc.Channel) -> None:
    for model, version, expected in (
        ("no_such_model", "", "Request for unknown model: 'no_such_model' is not found"),
        ("fashion_mnist", "7", "Request for unknown model: 'fashion_mnist' version 7 is not found"),
    ):
        with pytest.raises(InferenceServerException) as caught:
            _infer(triton_client, model, _images(), model_version=version)
        assert caught.value.status() == "StatusCode.NOT_FOUND"
        assert expected in caught.value.message()
    classify = classifier_pb2_grpc.ClassifierStub(channel).Classify
    request = classifier_pb2.ClassifyRequest(model="nope", images=[classifier_pb2.Image()])
    code, _ = _code_of(lambda: classify(request, timeout=10))
    assert code == grpc.StatusCode.NOT_FOUND
    with pytest.raises(InferenceServerException) as caught:
        triton_client.get_model_metadata("no_such_model")
    assert caught.value.status() == "StatusCode.NOT_FOUND"


def _rename_input(request: pb.ModelInferRequest) -> None:
    request.inputs[0].name = "pixels"


def _reshape(request: pb.ModelInferRequest) -> None:
    del request.inputs[0].shape[:]
    request.inputs[0].shape.extend([2, 3, 28, 28])


def _retype(request: pb.ModelInferRequest) -> None:
    request.inputs[0].datatype = "INT32"


def _truncate(request: pb.ModelInferRequest) -> None:
    request.raw_input_contents[0] = request.raw_input_contents[0][:-4]


def _second_input(request: pb.ModelInferRequest) -> None:
    request.inputs.add(name="mask", datatype="FP32", shape=[1])


def _unknown_output(request: pb.ModelInferRequest) -> None:
    request.outputs.add(name="logits")


def _bad_class_count(request: pb.ModelInferRequest) -> None:
    request.outputs.add(name="probabilities").parameters["classification"].string_param = "x"


def _no_data(request: pb.ModelInferRequest) -> None:
    del request.raw_input_contents[:]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (_rename_input, "unexpected inference input 'pixels' for model 'fashion_mnist'"),
        (
            _reshape,
            "unexpected shape for input 'input' for model 'fashion_mnist'. "
            "Expected [-1,1,28,28], got [2,3,28,28]",
        ),
        (
            _retype,
            "inference input 'input' data-type is 'INT32', "
            "but model 'fashion_mnist' expects 'FP32'",
        ),
        (
            _truncate,
            "input byte size mismatch for input 'input' for model 'fashion_mnist'. "
            "Expected 3136, got 3132",
        ),
        (
            _second_input,
            "unexpected inference input 'mask' for model 'fashion_mnist', "
            "allowed inputs are: input",
        ),
        (_unknown_output, "unexpected inference output 'logits' for model 'fashion_mnist'"),
        (_bad_class_count, "'classification' must be an int64 class count >= 1"),
        (_no_data, "needs 784 values in contents.fp32_contents"),
    ],
)
def test_invalid_argument_says_what_was_expected(
    channel: grpc.Channel, change: Callable[[pb.ModelInferRequest], None], expected: str
) -> None:
    request = _raw_request()
    change(request)
    code, details = _code_of(lambda: kserve_method(channel, "ModelInfer")(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert expected in details


def test_undecodable_image_is_invalid_argument(channel: grpc.Channel) -> None:
    classify = classifier_pb2_grpc.ClassifierStub(channel).Classify
    request = classifier_pb2.ClassifyRequest(
        model="fashion_mnist", images=[classifier_pb2.Image(encoded=b"\x89PNG\r\n\x1a\n broken")]
    )
    code, details = _code_of(lambda: classify(request, timeout=10))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "image 0: not a decodable PNG or JPEG" in details


def test_unsupported_features_are_unimplemented(channel: grpc.Channel) -> None:
    request = _raw_request()
    request.parameters["sequence_id"].int64_param = 5
    code, details = _code_of(lambda: kserve_method(channel, "ModelInfer")(request, timeout=10))
    assert code == grpc.StatusCode.UNIMPLEMENTED and "sequence" in details


def test_model_that_failed_to_load_is_unavailable(
    triton_client: triton.InferenceServerClient, channel: grpc.Channel
) -> None:
    assert not triton_client.is_model_ready("tampered")
    with pytest.raises(InferenceServerException) as caught:
        _infer(triton_client, "tampered", _images())
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    assert "reference check failed" in caught.value.message()
    [state] = [m for m in triton_client.get_model_repository_index().models if m.name == "tampered"]
    assert state.state == "UNAVAILABLE" and "reference check failed" in state.reason
    health = health_pb2_grpc.HealthStub(channel)
    check = health_pb2.HealthCheckRequest
    assert health.Check(check(service="tampered"), timeout=10).status == 2  # NOT_SERVING
    assert health.Check(check(service="fashion_mnist"), timeout=10).status == 1  # SERVING
    # Honest readiness: a model asked for at start is not serving.
    assert health.Check(check(service=""), timeout=10).status == 2
    assert not triton_client.is_server_ready()
    assert triton_client.is_server_live()
    # The other models are untouched.
    assert _infer(triton_client, "fashion_mnist", _images()).shape == (1, 10)


def test_deadline_exceeded(
    triton_client: triton.InferenceServerClient, server: ServerProcess
) -> None:
    before = server.metric("imgserve_requests_total", model="slow", code="DEADLINE_EXCEEDED")
    dropped = server.metric("imgserve_requests_dropped_total", model="slow", reason="deadline")
    started = time.monotonic()
    # Triton's server-side `timeout` parameter (microseconds): 20 ms against a 600 ms window.
    with pytest.raises(InferenceServerException) as caught:
        _infer(triton_client, "slow", _images(), timeout=20_000)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    assert time.monotonic() - started < 5
    assert (
        server.metric("imgserve_requests_total", model="slow", code="DEADLINE_EXCEEDED")
        == before + 1
    )
    assert (
        server.metric("imgserve_requests_dropped_total", model="slow", reason="deadline")
        == dropped + 1
    )
    # A gRPC deadline shorter than the window: the caller gets DEADLINE_EXCEEDED too, and the
    # server drops the abandoned request from the queue at once (never computed), freeing
    # the one queue slot without waiting for the window to close.
    cancelled = server.metric("imgserve_requests_dropped_total", model="slow", reason="cancelled")
    with pytest.raises(InferenceServerException) as caught:
        _infer(triton_client, "slow", _images(), client_timeout=0.1)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    _wait_until(
        lambda: (
            server.metric("imgserve_requests_dropped_total", model="slow", reason="cancelled")
            == cancelled + 1
        )
    )
    assert server.metric("imgserve_queue_depth", model="slow") == 0
    assert _infer(triton_client, "slow", _images()).shape == (1, 10)


def _wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_full_queue_is_resource_exhausted(
    triton_client: triton.InferenceServerClient, server: ServerProcess
) -> None:
    """--max-queue-size 1: while one request waits out the 5 s window, the next is refused.

    Unloading the model then answers the waiting request at once (accepted requests are
    finished, never dropped), so the test does not sit out the window.
    """
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(_infer, triton_client, "queued", _images(seed=1))
        _wait_until(lambda: server.metric("imgserve_queue_depth", model="queued") == 1)
        with pytest.raises(InferenceServerException) as caught:
            _infer(triton_client, "queued", _images(seed=2))
        assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
        assert "queue full" in caught.value.message()
        assert not first.done()  # still inside the window
        started = time.monotonic()
        triton_client.unload_model("queued")
        assert first.result(timeout=30).shape == (1, 10)
        assert time.monotonic() - started < QUEUE_WINDOW_US / 1e6 / 2


def test_made_up_versions_add_no_metric_series(
    triton_client: triton.InferenceServerClient, channel: grpc.Channel, server: ServerProcess
) -> None:
    """A model the server knows but cannot serve is counted under version "", whatever
    version string the caller sent: clients cannot grow /metrics without bound."""
    classify = classifier_pb2_grpc.ClassifierStub(channel).Classify

    def ask(version: str, native: bool) -> None:
        if native:
            request = classifier_pb2.ClassifyRequest(
                model="tampered", version=version, images=[classifier_pb2.Image()]
            )
            code, _ = _code_of(lambda: classify(request, timeout=10))
            assert code == grpc.StatusCode.UNAVAILABLE
        else:
            with pytest.raises(InferenceServerException) as caught:
                _infer(triton_client, "tampered", _images(), model_version=version)
            assert caught.value.status() == "StatusCode.UNAVAILABLE"

    counted = server.metric("imgserve_requests_total", model="tampered", version="")
    for native in (False, True):  # the series each API has for the model, made once
        ask("first-made-up", native)
    series = set(server.metrics())
    versions = [*(f"bogus-{i}" for i in range(20)), *(str(100 + i) for i in range(10))]
    for i, version in enumerate(versions):
        ask(version, native=i % 3 == 0)
    samples = server.metrics()
    assert set(samples) == series  # not one new series
    for _, labels in samples:
        assert not {value for _, value in labels} & {"first-made-up", *versions}, labels
    assert server.metric(
        "imgserve_requests_total", model="tampered", version=""
    ) == counted + 2 + len(versions)


def test_runtime_failure_fails_only_its_batch(
    triton_client: triton.InferenceServerClient, server: ServerProcess
) -> None:
    failures_before = server.metric("imgserve_batches_total", model="poisoned", outcome="failure")
    poison = _images(seed=3)
    poison[0, 0, 0, 0] = 1.0
    batch = [_images(seed=10 + i) for i in range(3)] + [poison]
    barrier = threading.Barrier(len(batch) + 1)

    def call(model: str, images: np.ndarray) -> object:
        barrier.wait(10)
        try:
            return _infer(triton_client, model, images)
        except InferenceServerException as exc:
            return exc

    with ThreadPoolExecutor(len(batch) + 1) as pool:
        futures = [pool.submit(call, "poisoned", images) for images in batch]
        other = pool.submit(call, "fashion_mnist", _images(seed=4))  # same time, other model
        outcomes = [f.result(timeout=30) for f in futures]
        assert isinstance(other.result(timeout=30), np.ndarray)

    failed = [o for o in outcomes if isinstance(o, InferenceServerException)]
    assert isinstance(outcomes[-1], InferenceServerException)  # the poisoned request
    for error in failed:
        assert error.status() == "StatusCode.INTERNAL"
        assert error.message() == INTERNAL_MESSAGE  # nothing of onnxruntime leaks
    for images, outcome in zip(batch, outcomes, strict=True):
        if not isinstance(outcome, InferenceServerException):  # batched apart from the poison
            model_file = server.repository / "poisoned" / "1" / ONNX_FILE
            expected = onnx_probabilities(model_file, images)
            np.testing.assert_allclose(outcome, expected, rtol=0, atol=1e-6)
    assert (
        server.metric("imgserve_batches_total", model="poisoned", outcome="failure")
        >= failures_before + 1
    )
    assert server.metric("imgserve_requests_total", model="poisoned", code="INTERNAL") == len(
        failed
    )
    # The failure was logged with its cause, and the model serves the next request.
    assert "Gather" in server.log
    later = _infer(triton_client, "poisoned", _images(seed=5))
    assert later.shape == (1, 10)
    assert triton_client.is_server_live()
