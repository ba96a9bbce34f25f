"""Our protobuf files against tritonclient's own descriptors: same numbers, types, labels.

Names never travel on the wire, numbers and types do; a drift here would make standard
KServe/Triton clients misread our answers silently, so every field is compared.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf.descriptor import Descriptor, FieldDescriptor, FileDescriptor
from tritonclient.grpc import model_config_pb2 as triton_model_config
from tritonclient.grpc import service_pb2 as triton_service

from wire import classifier_pb2, grpc_service_pb2, model_config_pb2

OURS = "imgserve.inference"
THEIRS = "inference"


def _messages(file: FileDescriptor) -> Iterator[Descriptor]:
    def walk(message: Descriptor) -> Iterator[Descriptor]:
        yield message
        for nested in message.nested_types:
            yield from walk(nested)

    for message in file.message_types_by_name.values():
        yield from walk(message)


def _relative(full_name: str, package: str) -> str:
    assert full_name.startswith(package + "."), full_name
    return full_name[len(package) + 1 :]


def _their_message(relative: str) -> Descriptor:
    for file in (triton_service.DESCRIPTOR, triton_model_config.DESCRIPTOR):
        try:
            return file.pool.FindMessageTypeByName(f"{THEIRS}.{relative}")
        except KeyError:
            continue
    raise AssertionError(f"tritonclient has no message inference.{relative}")


def _type_of(field: FieldDescriptor, package: str) -> str:
    """The field's type; message and enum types by their name relative to the package."""
    if field.message_type is not None:
        return _relative(field.message_type.full_name, package)
    if field.enum_type is not None:
        return _relative(field.enum_type.full_name, package)
    return str(field.type)


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)  # the field's label: repeated or singular (proto3)


@pytest.mark.parametrize(
    "file", [grpc_service_pb2.DESCRIPTOR, model_config_pb2.DESCRIPTOR], ids=lambda f: f.name
)
def test_every_field_matches_tritonclient(file: FileDescriptor) -> None:
    assert file.package == OURS  # never `inference`: that would clash with tritonclient
    compared = 0
    for message in _messages(file):
        theirs = _their_message(_relative(message.full_name, OURS))
        for field in message.fields:
            assert field.name in theirs.fields_by_name, f"{message.full_name}.{field.name}"
            their = theirs.fields_by_name[field.name]
            where = f"{message.full_name}.{field.name}"
            assert field.number == their.number, where
            assert field.type == their.type, where
            assert _is_repeated(field) == _is_repeated(their), where
            assert _type_of(field, OURS) == _type_of(their, THEIRS), where
            ours_oneof = field.containing_oneof.name if field.containing_oneof else None
            their_oneof = their.containing_oneof.name if their.containing_oneof else None
            assert ours_oneof == their_oneof, where
            compared += 1
    assert compared > 20


def test_enum_values_match_tritonclient() -> None:
    for enum in model_config_pb2.DESCRIPTOR.enum_types_by_name.values():
        theirs = triton_model_config.DESCRIPTOR.enum_types_by_name[enum.name]
        assert {v.name: v.number for v in enum.values} == {
            v.name: v.number for v in enum.values if v.name in theirs.values_by_name
        }
        for value in enum.values:
            assert theirs.values_by_name[value.name].number == value.number


def test_service_methods_match_tritonclient() -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert theirs.full_name == "inference.GRPCInferenceService"
    required = {
        "ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata",
        "ModelInfer", "ModelStreamInfer", "ModelConfig", "ModelStatistics",
        "RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload",
    }  # fmt: skip
    assert required <= set(ours.methods_by_name)
    for method in ours.methods:
        their = theirs.methods_by_name[method.name]
        assert _relative(method.input_type.full_name, OURS) == _relative(
            their.input_type.full_name, THEIRS
        )
        assert _relative(method.output_type.full_name, OURS) == _relative(
            their.output_type.full_name, THEIRS
        )
        assert (method.client_streaming, method.server_streaming) == (
            their.client_streaming,
            their.server_streaming,
        ), method.name


def test_messages_round_trip_between_the_two_definitions() -> None:
    """Bytes written by tritonclient's classes parse into ours with the same values, and back."""
    request = triton_service.ModelInferRequest(model_name="m", model_version="2", id="x")
    tensor = request.inputs.add(name="input", datatype="UINT8", shape=[1, 2])
    tensor.contents.uint_contents.extend([3, 4])
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 3
    request.parameters["timeout"].int64_param = 1000
    request.raw_input_contents.append(b"\x01\x02")

    ours = grpc_service_pb2.ModelInferRequest.FromString(request.SerializeToString())
    assert ours.model_name == "m" and ours.model_version == "2" and ours.id == "x"
    assert list(ours.inputs[0].shape) == [1, 2] and ours.inputs[0].datatype == "UINT8"
    assert list(ours.inputs[0].contents.uint_contents) == [3, 4]
    assert ours.outputs[0].parameters["classification"].int64_param == 3
    assert ours.parameters["timeout"].int64_param == 1000
    assert list(ours.raw_input_contents) == [b"\x01\x02"]

    config = model_config_pb2.ModelConfig(name="m", max_batch_size=8)
    config.input.add(name="input", data_type=model_config_pb2.TYPE_FP32, dims=[1, 28, 28])
    config.dynamic_batching.max_queue_delay_microseconds = 500
    response = grpc_service_pb2.ModelConfigResponse(config=config)
    back = triton_service.ModelConfigResponse.FromString(response.SerializeToString())
    assert back.config.name == "m" and back.config.max_batch_size == 8
    assert list(back.config.input[0].dims) == [1, 28, 28]
    assert back.config.input[0].data_type == triton_model_config.TYPE_FP32
    assert back.config.dynamic_batching.max_queue_delay_microseconds == 500


def test_native_api_has_its_own_package() -> None:
    assert classifier_pb2.DESCRIPTOR.package == "imgserve.classifier.v1"
    assert set(classifier_pb2.DESCRIPTOR.services_by_name["Classifier"].methods_by_name) == {
        "Classify",
        "ClassifyStream",
        "ListModels",
    }
