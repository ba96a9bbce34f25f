"""What tritonclient's example clients rely on, against a real server on models with the
interfaces of Triton's example repository (built here with onnx.helper):

- ModelInfer answers in `raw_output_contents`, as Triton always does, also when the inputs
  came in typed contents (clients that build requests with the raw gRPC stub read only it);
- an unknown model or version is refused with Triton's words, which clients match;
- Triton's shared-memory endpoints over HTTP answer 501 with a reason, not a bare 404.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from server_process import ServerProcess
from triton_models import write_simple
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    repository = tmp_path_factory.mktemp("triton_examples")
    write_simple(repository, "simple")
    write_simple(repository, "simple_string", "BYTES")
    with ServerProcess(repository) as started:
        yield started


@pytest.fixture(scope="module")
def stub(server: ServerProcess) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(server.target) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def _typed_request(model: str) -> service_pb2.ModelInferRequest:
    """As tritonclient's grpc_explicit_*_content_client examples build it: typed contents."""
    request = service_pb2.ModelInferRequest(model_name=model)
    for name, values in (("INPUT0", list(range(16))), ("INPUT1", [1] * 16)):
        tensor = request.inputs.add(name=name, shape=[1, 16])
        if model == "simple":
            tensor.datatype = "INT32"
            tensor.contents.int_contents[:] = values
        else:
            tensor.datatype = "BYTES"
            tensor.contents.bytes_contents[:] = [str(v).encode() for v in values]
    for name in ("OUTPUT0", "OUTPUT1"):
        request.outputs.add(name=name)
    return request


def _decoded(response: service_pb2.ModelInferResponse) -> list[list[int]]:
    assert len(response.raw_output_contents) == len(response.outputs) == 2
    answers = []
    for tensor, raw in zip(response.outputs, response.raw_output_contents, strict=True):
        assert not tensor.HasField("contents")  # nothing typed besides the raw bytes
        if tensor.datatype == "BYTES":
            answers.append([int(v) for v in deserialize_bytes_tensor(raw)])
        else:
            assert tensor.datatype == "INT32"
            answers.append(np.frombuffer(raw, np.int32).tolist())
    return answers


@pytest.mark.parametrize("model", ["simple", "simple_string"])
def test_typed_contents_are_answered_in_raw_output_contents(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, model: str
) -> None:
    expected = [[i + 1 for i in range(16)], [i - 1 for i in range(16)]]
    assert _decoded(stub.ModelInfer(_typed_request(model), timeout=30)) == expected
    [streamed] = stub.ModelStreamInfer(iter([_typed_request(model)]), timeout=30)
    assert not streamed.error_message
    assert _decoded(streamed.infer_response) == expected


def _grpc(server: ServerProcess) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(server.target)


def _http(server: ServerProcess) -> httpclient.InferenceServerClient:
    return httpclient.InferenceServerClient(server.http_target)


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unknown_model_and_version_in_tritons_words(server: ServerProcess, protocol: str) -> None:
    module = grpcclient if protocol == "grpc" else httpclient
    client = _grpc(server) if protocol == "grpc" else _http(server)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = module.InferInput(name, [1, 16], "INT32")
        tensor.set_data_from_numpy(np.ones((1, 16), np.int32))
        inputs.append(tensor)
    for model, version, message in (
        ("wrong_model_name", "", "Request for unknown model: 'wrong_model_name' is not found"),
        ("simple", "7", "Request for unknown model: 'simple' version 7 is not found"),
    ):
        with pytest.raises(InferenceServerException) as caught:
            client.infer(model, inputs, model_version=version)
        assert caught.value.message().startswith(message), caught.value.message()
    assert client.infer("simple", inputs).as_numpy("OUTPUT0").tolist() == [[2] * 16]


def test_shared_memory_over_http_is_501_with_a_reason(server: ServerProcess) -> None:
    client = _http(server)
    for call in (
        client.get_system_shared_memory_status,
        client.unregister_system_shared_memory,
        client.get_cuda_shared_memory_status,
        client.unregister_cuda_shared_memory,
    ):
        with pytest.raises(InferenceServerException) as caught:
            call()
        assert caught.value.status() == "501", (call, caught.value)
        assert "shared memory is not supported" in caught.value.message()
    assert client.is_server_live()
