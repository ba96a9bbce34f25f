"""Errors over HTTP/REST: the core's table as HTTP statuses with Triton's `{"error": ...}` body,
the same message as gRPC for the same request, and bodies that only HTTP can get wrong.

One server with a small queue and a slow model, as in test_errors.py; every refused request
is followed by a good one, which must still get the reference answer.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc
import numpy as np
import pytest
from generated_models import SHAPE, write_slow_model
from http_calls import http_get, http_post
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_process import ServerProcess, kserve_method, onnx_probabilities, set_batching

from wire import grpc_service_pb2 as pb

MODEL = "fashion_mnist"
INFER = f"/v2/models/{MODEL}/infer"


def _build(repo: Any) -> None:
    # One instance, 16-image batches of a deep network, requests wait up to 2 s for companions.
    set_batching(write_slow_model(repo, "slow", instances=1), max_queue_delay_us=2_000_000)


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve("--max-queue-size", "2", models=[MODEL], prepare=_build)


def _error(answer: bytes) -> str:
    document = json.loads(answer)
    assert set(document) == {"error"}  # Triton's error body, nothing else
    return document["error"]


def _images(n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32)


def _json_body(images: np.ndarray, **extra: Any) -> dict[str, Any]:
    tensor = {"name": "input", "datatype": "FP32", "shape": list(images.shape)}
    return {"inputs": [{**tensor, "data": images.ravel().tolist()}], **extra}


def _check_still_serving(server: ServerProcess) -> None:
    images = _images(2, seed=42)
    status, _, answer = http_post(server, INFER, _json_body(images))
    assert status == 200, answer
    data = np.array(json.loads(answer)["outputs"][0]["data"], np.float32).reshape(2, 10)
    expected = onnx_probabilities(server.repository / MODEL / "1" / "model.onnx", images)
    np.testing.assert_allclose(data, expected, atol=1e-6)


def _grpc_request(body: dict[str, Any]) -> pb.ModelInferRequest:
    """The same request as a ModelInferRequest with raw contents (tritonclient's way)."""
    request = pb.ModelInferRequest(model_name=MODEL)
    for tensor in body["inputs"]:
        request.inputs.add(name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"])
        dtype = "<f4" if tensor["datatype"] == "FP32" else "u1"
        request.raw_input_contents.append(np.asarray(tensor["data"], dtype).tobytes())
    for output in body.get("outputs", []):
        added = request.outputs.add(name=output["name"])
        for key, value in output.get("parameters", {}).items():
            added.parameters[key].int64_param = value
    return request


CASES = {
    "unknown input": (lambda b: b["inputs"][0].update(name="pixels"), 400),
    "wrong shape": (lambda b: b["inputs"][0].update(shape=[1, 3, 28, 28]), 400),
    "wrong datatype": (lambda b: b["inputs"][0].update(datatype="INT32"), 400),
    "too few values": (lambda b: b["inputs"][0].update(data=b["inputs"][0]["data"][:-1]), 400),
    "unknown output": (lambda b: b.update(outputs=[{"name": "logits"}]), 400),
    "output twice": (
        lambda b: b.update(outputs=[{"name": "probabilities"}, {"name": "probabilities"}]),
        400,
    ),
    "class count 0": (
        lambda b: b.update(
            outputs=[{"name": "probabilities", "parameters": {"classification": 0}}]
        ),
        400,
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_invalid_requests_get_400_and_the_grpc_message(server: ServerProcess, case: str) -> None:
    change, status = CASES[case]
    body = _json_body(_images())
    change(body)
    got, _, answer = http_post(server, INFER, body)
    assert got == status
    message = _error(answer)
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as caught:
        kserve_method(channel, "ModelInfer")(_grpc_request(body), timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message == caught.value.details()
    _check_still_serving(server)


def _binary_request(
    images: np.ndarray, size: int | None = None, tail: bytes = b""
) -> tuple[bytes, bytes]:
    header = {
        "inputs": [
            {
                "name": "input",
                "datatype": "FP32",
                "shape": list(images.shape),
                "parameters": {"binary_data_size": images.nbytes if size is None else size},
            }
        ]
    }
    return json.dumps(header).encode(), images.tobytes() + tail


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("data and binary", "must set exactly one of 'data' and the 'binary_data_size'"),
        ("neither", "must set exactly one of 'data' and the 'binary_data_size'"),
        ("bytes left over", "unexpected additional input data: 4 bytes"),
        ("too few bytes", "expected 3140 bytes of binary data, the body has 3136 left"),
        ("no header length", "needs the Inference-Header-Content-Length header"),
        ("header past the body", "Inference-Header-Content-Length must be in [0,"),
        ("header not a number", "unable to parse Inference-Header-Content-Length"),
        ("not json", "the body is not valid JSON"),
        ("not an object", "the inference request must be a JSON object"),
        ("deep json", "nested too deeply"),
        ("string data", "'data' must be a list of numbers"),
        ("ragged data", "'data' must be a list of numbers, flat or nested evenly"),
        ("bad priority", "parameter 'priority' must be an unsigned integer"),
        ("reserved parameter", "names starting with 'triton_' are reserved"),
        ("list parameter", "parameter 'tags' must be an integer, a number, a boolean or a string"),
        ("binary_data not bool", "'binary_data' must be a boolean"),
    ],
)
def test_bodies_only_http_can_get_wrong_are_400(
    server: ServerProcess, case: str, expected: str
) -> None:
    images = _images()
    header, data = _binary_request(images)
    headers = {"Inference-Header-Content-Length": str(len(header))}
    body = header + data
    document = _json_body(images)
    match case:
        case "data and binary":
            document["inputs"][0]["parameters"] = {"binary_data_size": images.nbytes}
            body, headers = json.dumps(document).encode(), {}
        case "neither":
            del document["inputs"][0]["data"]
            body, headers = json.dumps(document).encode(), {}
        case "bytes left over":
            body += b"\0" * 4
        case "too few bytes":
            header, data = _binary_request(images, size=images.nbytes + 4)
            body, headers = header + data, {"Inference-Header-Content-Length": str(len(header))}
        case "no header length":  # a JSON body whose input says its data is binary
            body, headers = header, {}
        case "header past the body":
            headers = {"Inference-Header-Content-Length": str(len(body) + 1)}
        case "header not a number":
            headers = {"Inference-Header-Content-Length": "many"}
        case "not json":
            body, headers = b"{not json", {}
        case "not an object":
            body, headers = b"[1, 2]", {}
        case "deep json":
            body, headers = b"[" * 100_000 + b"]" * 100_000, {}
        case "string data":
            document["inputs"][0]["data"] = ["a"] * 784
            body, headers = json.dumps(document).encode(), {}
        case "ragged data":
            document["inputs"][0]["data"] = [[0.5] * 783, [0.5]]
            body, headers = json.dumps(document).encode(), {}
        case "bad priority":
            document["parameters"] = {"priority": -1}
            body, headers = json.dumps(document).encode(), {}
        case "reserved parameter":
            document["parameters"] = {"triton_anything": 1}
            body, headers = json.dumps(document).encode(), {}
        case "list parameter":
            document["parameters"] = {"tags": [1, 2]}
            body, headers = json.dumps(document).encode(), {}
        case "binary_data not bool":
            document["outputs"] = [{"name": "probabilities", "parameters": {"binary_data": 1}}]
            body, headers = json.dumps(document).encode(), {}
    status, _, answer = http_post(server, INFER, body, headers)
    assert status == 400, answer
    assert expected in _error(answer)
    _check_still_serving(server)


def test_not_found_unimplemented_and_routing(server: ServerProcess) -> None:
    body = _json_body(_images())
    for path, expected in [
        ("/v2/models/nope/infer", "Request for unknown model: 'nope' is not found"),
        (f"/v2/models/{MODEL}/versions/7/infer", f"model: '{MODEL}' version 7 is not found"),
    ]:
        status, _, answer = http_post(server, path, body)
        assert status == 404 and expected in _error(answer)
    status, _, answer = http_get(server, "/v2/models/nope")
    assert status == 404 and _error(answer) == "Request for unknown model: 'nope' is not found"
    body["inputs"][0]["parameters"] = {"shared_memory_region": "r"}
    del body["inputs"][0]["data"]
    status, _, answer = http_post(server, INFER, body)
    assert status == 501 and "shared-memory" in _error(answer)
    status, _, answer = http_post(
        server, INFER, _json_body(_images(), parameters={"sequence_id": 7})
    )
    assert status == 501 and "sequence batching is not supported" in _error(answer)
    status, _, answer = http_get(server, INFER)  # inference is a POST
    assert status == 405 and _error(answer)
    status, _, answer = http_get(server, "/v2/nothing/here")
    assert status == 404 and _error(answer)
    status, _, answer = http_post(server, f"/v2/repository/models/{MODEL}/unload", b"")
    assert status == 400 and "--enable-model-control" in _error(answer)
    status, _, answer = http_post(server, "/v2/repository/index", b'{"ready": "yes"}')
    assert status == 400 and "'ready' must be a boolean" in _error(answer)
    status, _, _ = http_get(server, "/v2/models/nope/ready")
    assert status == 400  # Triton's answer for "not ready"
    _check_still_serving(server)


def test_a_body_past_the_limit_is_413(server: ServerProcess) -> None:
    status, _, answer = http_post(server, INFER, b"\0" * (64 * 1024 * 1024 + 1))
    assert status == 413 and "Maximum request body size" in _error(answer)
    _check_still_serving(server)


def test_timeout_and_full_queue_match_the_grpc_codes(server: ServerProcess) -> None:
    """The slow model waits 2 s for companions: a 50 ms `timeout` passes in the queue
    (DEADLINE_EXCEEDED, 504); with its two places taken the queue refuses (429)."""
    images = _images(1)
    body = _json_body(images, parameters={"timeout": 50_000})
    began = time.monotonic()
    status, _, answer = http_post(server, "/v2/models/slow/infer", body)
    assert status == 504 and "timeout passed while it was queued" in _error(answer)
    assert time.monotonic() - began < 10
    args = (server, "/v2/models/slow/infer", _json_body(images))
    waiting = [threading.Thread(target=http_post, args=args) for _ in range(2)]
    for thread in waiting:
        thread.start()
    deadline = time.monotonic() + 10
    while server.metric("imgserve_queue_depth", model="slow") < 2:
        assert time.monotonic() < deadline, "the two requests never queued"
        time.sleep(0.02)
    status, _, answer = http_post(server, "/v2/models/slow/infer", _json_body(images))
    assert status == 429 and "queue full" in _error(answer)
    for thread in waiting:
        thread.join(30)
    assert server.metric("imgserve_requests_total", api="http", code="RESOURCE_EXHAUSTED") >= 1
    assert server.metric("imgserve_requests_total", api="http", code="DEADLINE_EXCEEDED") >= 1


# Generated bodies: whatever they hold, the answer is a JSON error or a result, never a 500.
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "id": JSON_VALUES,
        "parameters": JSON_VALUES,
        "inputs": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "name": st.sampled_from(["input", "x"]) | JSON_VALUES,
                    "datatype": st.sampled_from(["FP32", "UINT8", "BYTES"]) | JSON_VALUES,
                    "shape": st.lists(st.integers(-2, 30), max_size=5) | JSON_VALUES,
                    "data": st.lists(st.floats(0, 1), max_size=4) | JSON_VALUES,
                    "parameters": JSON_VALUES,
                },
            ),
            max_size=3,
        )
        | JSON_VALUES,
        "outputs": JSON_VALUES,
    },
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=FIELDS, tail=st.binary(max_size=16), header=st.booleans())
def test_generated_bodies_never_get_a_server_error(
    server: ServerProcess, document: dict[str, Any], tail: bytes, header: bool
) -> None:
    head = json.dumps(document).encode()
    headers = {"Inference-Header-Content-Length": str(len(head))} if header else {}
    status, _, answer = http_post(server, INFER, head + tail, headers)
    assert status in (200, 400, 404, 501), answer
    if status != 200:
        _error(answer)


def test_the_server_is_unhurt_after_generated_bodies(server: ServerProcess) -> None:
    _check_still_serving(server)
    assert server.process is not None and server.process.poll() is None
    assert "Traceback" not in server.log
