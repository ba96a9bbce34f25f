"""Models shaped like Triton's examples, not like our exports, served as Triton serves them.

The models (tests/triton_models.py) are built here with onnx.helper beside the seed models;
tritonclient (gRPC and HTTP), raw protocol messages and our own client talk to one real
server. Every answer is compared with what the model computes.
"""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as grpcaio
import tritonclient.http as httpclient
from PIL import Image
from server_process import ServerProcess, classifier_method, kserve_method
from triton_models import (
    DATATYPES,
    densenet_scores,
    nhwc_scores,
    sample,
    write_densenet_like,
    write_identity_all,
    write_mistyped,
    write_nhwc_classifier,
    write_simple,
    write_variable_length,
)
from tritonclient.utils import InferenceServerException

from server.api.codecs import parse_bytes_tensor
from wire import classifier_pb2
from wire import grpc_service_pb2 as pb

pytestmark = pytest.mark.both_transports

MODULES = {"grpc": grpcclient, "http": httpclient}


def _add_models(repository: Path) -> None:
    write_simple(repository)
    write_simple(repository, "simple_int8", "INT8")
    write_simple(repository, "simple_string", "BYTES")
    write_densenet_like(repository)
    write_nhwc_classifier(repository)
    write_variable_length(repository)
    write_identity_all(repository)
    write_identity_all(repository, "identity_typed", [d for d in DATATYPES if d != "FP16"])
    write_mistyped(repository)
    sequence = write_simple(repository, "simple_sequence")  # Triton's stateful example's config
    with (sequence / "config.pbtxt").open("a") as config:
        config.write("sequence_batching {\n  max_sequence_idle_microseconds: 5000000\n}\n")


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve(models=["fashion_mnist"], prepare=_add_models)


@pytest.fixture(scope="module", params=sorted(MODULES))
def client(request: pytest.FixtureRequest, server: ServerProcess):  # type: ignore[no-untyped-def]
    module = MODULES[request.param]
    target = server.target if request.param == "grpc" else server.http_target
    made = module.InferenceServerClient(target)
    made.module = module  # type: ignore[attr-defined]
    yield made
    made.close()


def _input(module, name: str, array: np.ndarray, datatype: str):  # type: ignore[no-untyped-def]
    tensor = module.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array)
    return tensor


def _simple_inputs(module, datatype: str, rows: int = 2):  # type: ignore[no-untyped-def]
    a = np.arange(16 * rows).reshape(rows, 16) % 50
    b = np.full((rows, 16), 3)
    if datatype == "BYTES":
        as_bytes = np.vectorize(lambda v: str(v).encode(), otypes=[object])
        arrays = as_bytes(a), as_bytes(b)
    else:
        arrays = a.astype(DATATYPES[datatype][2]), b.astype(DATATYPES[datatype][2])
    tensors = [_input(module, f"INPUT{i}", x, datatype) for i, x in enumerate(arrays)]
    return tensors, a, b


@pytest.mark.parametrize(
    ("model", "datatype"),
    [("simple", "INT32"), ("simple_int8", "INT8"), ("simple_string", "BYTES")],
)
def test_simple_models_add_and_subtract(client, model: str, datatype: str) -> None:  # type: ignore[no-untyped-def]
    tensors, a, b = _simple_inputs(client.module, datatype)
    result = client.infer(model, tensors)
    total, difference = result.as_numpy("OUTPUT0"), result.as_numpy("OUTPUT1")
    if datatype == "BYTES":
        total, difference = (np.vectorize(int)(x) for x in (total, difference))
    np.testing.assert_array_equal(total, a + b)
    np.testing.assert_array_equal(difference, a - b)
    wanted = [client.module.InferRequestedOutput("OUTPUT1")]
    only = client.infer(model, tensors, outputs=wanted)
    assert only.as_numpy("OUTPUT0") is None and only.as_numpy("OUTPUT1") is not None


def test_metadata_and_config_describe_the_models_own_tensors(client) -> None:  # type: ignore[no-untyped-def]
    grpc_side = client.module is grpcclient
    metadata = client.get_model_metadata("simple")
    inputs = metadata.inputs if grpc_side else metadata["inputs"]
    described = [
        (t.name, t.datatype, list(t.shape)) if grpc_side else (t["name"], t["datatype"], t["shape"])
        for t in inputs
    ]
    assert described == [("INPUT0", "INT32", [-1, 16]), ("INPUT1", "INT32", [-1, 16])]
    config = client.get_model_config("densenet_onnx")
    config = config.config if grpc_side else config
    data_input = config.input[0] if grpc_side else config["input"][0]
    if grpc_side:
        assert data_input.format == pb.ModelConfigResponse().config.input.add().FORMAT_NCHW
        assert list(data_input.reshape.shape) == [1, 3, 224, 224]
        assert config.max_batch_size == 0
    else:
        assert data_input["format"] == "FORMAT_NCHW"
        assert [int(d) for d in data_input["reshape"]["shape"]] == [1, 3, 224, 224]
        assert config.get("max_batch_size", 0) == 0


def test_densenet_interface_answers_with_classification_strings(client) -> None:  # type: ignore[no-untyped-def]
    image = np.random.default_rng(1).random((3, 224, 224), dtype=np.float32)
    module = client.module
    tensor = _input(module, "data_0", image, "FP32")
    full = client.infer("densenet_onnx", [tensor]).as_numpy("fc6_1")
    expected = densenet_scores(Path(), image)
    assert full.shape == (1000,)
    np.testing.assert_allclose(full, expected, rtol=1e-4, atol=1e-4)
    wanted = [module.InferRequestedOutput("fc6_1", class_count=3)]
    top = client.infer("densenet_onnx", [tensor], outputs=wanted).as_numpy("fc6_1")
    assert top.shape == (3,)
    best = np.argsort(-expected, kind="stable")[:3]
    for item, index in zip(top, best, strict=True):
        score, position, label = item.decode().split(":")
        assert (int(position), label) == (int(index), f"class-{index}")
        assert float(score) == pytest.approx(float(expected[index]), abs=1e-3)


def test_every_datatype_round_trips_exactly(client) -> None:  # type: ignore[no-untyped-def]
    module = client.module
    sent = {d: sample(d, rows=2, seed=5) for d in DATATYPES}
    tensors = [_input(module, f"IN_{d}", sent[d], d) for d in DATATYPES]
    result = client.infer("identity_all", tensors)
    for datatype, array in sent.items():
        got = result.as_numpy(f"OUT_{datatype}")
        assert got.shape == array.shape, datatype
        if datatype == "BYTES":
            assert got.tolist() == array.tolist()
        else:
            assert got.dtype == array.dtype, datatype
            np.testing.assert_array_equal(got, array, err_msg=datatype)


def test_every_datatype_round_trips_as_http_json(server: ServerProcess) -> None:
    """JSON `data` in and out (no binary extension), every datatype JSON can carry: FP16 is
    refused by tritonclient's JSON encoding, as by Triton's, so it travels binary here."""
    client = httpclient.InferenceServerClient(server.http_target)
    sent = {d: sample(d, rows=2, seed=11) for d in DATATYPES}
    tensors = []
    for datatype, array in sent.items():
        tensor = httpclient.InferInput(f"IN_{datatype}", list(array.shape), datatype)
        tensor.set_data_from_numpy(array, binary_data=datatype == "FP16")
        tensors.append(tensor)
    wanted = [
        httpclient.InferRequestedOutput(f"OUT_{d}", binary_data=d == "FP16") for d in DATATYPES
    ]
    result = client.infer("identity_all", tensors, outputs=wanted)
    for datatype, array in sent.items():
        got = result.as_numpy(f"OUT_{datatype}")
        if datatype == "BYTES":  # JSON strings: UTF-8 text comes back as it went
            as_bytes = [[v.encode() if isinstance(v, str) else v for v in row] for row in got]
            assert as_bytes == array.tolist()
        elif datatype in ("FP32", "FP64"):
            np.testing.assert_allclose(got, array, rtol=1e-6, err_msg=datatype)
        else:
            np.testing.assert_array_equal(got, array, err_msg=datatype)
    client.close()


def test_streaming_serves_any_model(server: ServerProcess) -> None:
    answers: list[object] = []
    client = grpcclient.InferenceServerClient(server.target)
    client.start_stream(callback=lambda result, error: answers.append(error or result))
    tensors, a, b = _simple_inputs(grpcclient, "INT32", rows=1)
    for request_id in ("s-1", "s-2"):
        client.async_stream_infer("simple", tensors, request_id=request_id)
    client.stop_stream()
    client.close()
    assert len(answers) == 2
    for answer in answers:
        assert not isinstance(answer, Exception), answer
        np.testing.assert_array_equal(answer.as_numpy("OUTPUT0"), a + b)  # type: ignore[union-attr]


TYPED_FIELDS = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _typed_request(model: str, sent: dict[str, np.ndarray]) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model)
    for datatype, array in sent.items():
        tensor = request.inputs.add(name=f"IN_{datatype}", datatype=datatype, shape=[1, 3])
        if datatype in TYPED_FIELDS:
            getattr(tensor.contents, TYPED_FIELDS[datatype]).extend(array.ravel().tolist())
    return request


def test_every_datatype_round_trips_in_typed_contents_too(server: ServerProcess) -> None:
    """Typed contents (not raw bytes) in: the protocol's other encoding. FP16 has no typed
    field: it travels only as raw bytes."""
    sent = {d: sample(d, rows=1, seed=9) for d in TYPED_FIELDS}
    with grpc.insecure_channel(server.target) as channel:
        infer = kserve_method(channel, "ModelInfer")
        with_fp16 = {**sent, "FP16": sample("FP16", rows=1)}
        with pytest.raises(grpc.RpcError) as refused:
            infer(_typed_request("identity_all", with_fp16), timeout=30)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "FP16 data goes in raw_input_contents" in refused.value.details()
        answer = infer(_typed_request("identity_typed", sent), timeout=30)
    # Answers travel in raw_output_contents whatever the request used, as Triton answers.
    raw = dict(zip((t.name for t in answer.outputs), answer.raw_output_contents, strict=True))
    for tensor in answer.outputs:
        datatype = tensor.name.removeprefix("OUT_")
        assert tensor.datatype == datatype and list(tensor.shape) == [1, 3]
        if datatype == "BYTES":
            got = parse_bytes_tensor(raw[tensor.name])
        else:
            got = np.frombuffer(raw[tensor.name], DATATYPES[datatype][2]).tolist()
        assert got == sent[datatype].ravel().tolist(), datatype


def test_bad_inputs_get_invalid_argument_and_the_server_keeps_serving(
    server: ServerProcess,
) -> None:
    good_a, good_b = np.ones((1, 16), np.int32), np.ones((1, 16), np.int32)

    def request(*tensors: tuple[str, str, list[int], bytes]) -> pb.ModelInferRequest:
        message = pb.ModelInferRequest(model_name="simple")
        for name, datatype, shape, data in tensors:
            message.inputs.add(name=name, datatype=datatype, shape=shape)
            message.raw_input_contents.append(data)
        return message

    a = ("INPUT0", "INT32", [1, 16], good_a.tobytes())
    b = ("INPUT1", "INT32", [1, 16], good_b.tobytes())
    cases = {
        "missing": (
            request(a),
            "expected 2 inputs but got 1 inputs for model 'simple'. Got input(s) ['INPUT0'], "
            "but missing required input(s) ['INPUT1']",
        ),
        "extra": (
            request(a, b, ("INPUT2", "INT32", [1, 16], good_a.tobytes())),
            "unexpected inference input 'INPUT2' for model 'simple', allowed inputs are: "
            "INPUT0, INPUT1",
        ),
        "misnamed": (
            request(a, ("input1", "INT32", [1, 16], good_b.tobytes())),
            "unexpected inference input 'input1' for model 'simple'",
        ),
        "datatype": (
            request(a, ("INPUT1", "FP32", [1, 16], good_b.astype(np.float32).tobytes())),
            "inference input 'INPUT1' data-type is 'FP32', but model 'simple' expects 'INT32'",
        ),
        "shape": (
            request(a, ("INPUT1", "INT32", [1, 8], good_b[:, :8].tobytes())),
            "unexpected shape for input 'INPUT1' for model 'simple'. Expected [-1,16], got [1,8]",
        ),
        "byte size": (
            request(a, ("INPUT1", "INT32", [1, 16], good_b.tobytes()[:-4])),
            "input byte size mismatch for input 'INPUT1' for model 'simple'. Expected 64, got 60",
        ),
    }
    with grpc.insecure_channel(server.target) as channel:
        infer = kserve_method(channel, "ModelInfer")
        for what, (message, expected) in cases.items():
            with pytest.raises(grpc.RpcError) as refused:
                infer(message, timeout=30)
            assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
            assert expected in refused.value.details(), (what, refused.value.details())
        answer = infer(request(a, b), timeout=30)
    total = np.frombuffer(answer.raw_output_contents[0], np.int32)
    np.testing.assert_array_equal(total, np.full(16, 2))


def test_variable_dims_batch_only_requests_of_equal_shape(server: ServerProcess) -> None:
    """Concurrent requests of three lengths: each answered from its own row, whatever batch
    it rode in, and batches were formed (the model waits 20 ms for companions). As in
    Triton, a request of another shape ends the batch that is forming, so requests of one
    shape are sent together here."""
    lengths = [3, 3, 3, 3, 5, 5, 7, 7]

    async def main() -> list[tuple[np.ndarray, np.ndarray]]:
        client = grpcaio.InferenceServerClient(server.target)
        try:

            async def one(i: int, length: int) -> tuple[np.ndarray, np.ndarray]:
                x = np.arange(length, dtype=np.float32)[None] + i
                result = await client.infer("varlen", [_input(grpcaio, "x", x, "FP32")])
                return result.as_numpy("TOTAL"), result.as_numpy("DOUBLED")

            return await asyncio.gather(*(one(i, n) for i, n in enumerate(lengths)))
        finally:
            await client.close()

    answers = asyncio.run(main())
    for i, (length, (total, doubled)) in enumerate(zip(lengths, answers, strict=True)):
        x = np.arange(length, dtype=np.float32) + i
        np.testing.assert_allclose(total, [[x.sum()]])
        np.testing.assert_allclose(doubled, [2 * x])
    stats = grpcclient.InferenceServerClient(server.target).get_inference_statistics("varlen")
    model = stats.model_stats[0]
    assert model.inference_count == len(lengths)
    assert model.execution_count < len(lengths)  # some requests shared a batch


def test_an_nhwc_classifier_gets_the_native_api(server: ServerProcess) -> None:
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    expected = nhwc_scores(pixels[None].astype(np.float32))[0]
    with grpc.insecure_channel(server.target) as channel:
        classify = classifier_method(channel, "Classify")
        request = classifier_pb2.ClassifyRequest(model="nhwc_classifier", top_k=3)
        request.images.add(encoded=png.getvalue())
        answer = classify(request, timeout=30)
    got = np.array(answer.results[0].probabilities)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
    assert [t.index for t in answer.results[0].top] == list(np.argsort(-expected)[:3])
    # The same pixels through KServe, in the model's own layout and scaling.
    client = grpcclient.InferenceServerClient(server.target)
    tensor = _input(grpcclient, "image", pixels[None].astype(np.float32), "FP32")
    np.testing.assert_allclose(
        client.infer("nhwc_classifier", [tensor]).as_numpy("scores")[0], expected, rtol=1e-4
    )


def test_the_native_api_softmaxes_a_logits_classifier(server: ServerProcess) -> None:
    pixels = np.random.default_rng(4).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    logits = densenet_scores(Path(), (pixels.transpose(2, 0, 1) / np.float32(255.0)))
    expected = np.exp(logits - logits.max())
    expected /= expected.sum()
    with grpc.insecure_channel(server.target) as channel:
        request = classifier_pb2.ClassifyRequest(model="densenet_onnx", top_k=2)
        request.images.add(encoded=png.getvalue())
        answer = classifier_method(channel, "Classify")(request, timeout=30)
    got = np.array(answer.results[0].probabilities)
    assert got.sum() == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert answer.results[0].top[0].label == f"class-{int(np.argmax(expected))}"


def test_a_model_the_runtime_cannot_run_is_refused_with_its_reason(
    server: ServerProcess,
) -> None:
    client = grpcclient.InferenceServerClient(server.target)
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["mistyped"].state == "UNAVAILABLE"
    assert index["mistyped"].reason == (
        "input 'x' is tensor(float) in model.onnx, but the config says TYPE_INT32"
    )
    assert index["simple_sequence"].state == "UNAVAILABLE"
    assert index["simple_sequence"].reason.startswith(
        "stateful (sequence_batching) models are not served"
    )
    assert index["simple"].state == "READY" and index["fashion_mnist"].state == "READY"
    with pytest.raises(InferenceServerException, match=r"not ready|unavailable|UNAVAILABLE"):
        client.infer("mistyped", [_input(grpcclient, "x", np.zeros((1, 4), np.int32), "INT32")])
