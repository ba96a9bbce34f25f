"""Auto-complete (server.core.autocomplete): configs completed from the ONNX graph as Triton's
server core and onnxruntime backend complete them, the given fields checked against the graph
with that backend's messages; and a real server serving a config-less model folder."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as triton
from http_calls import http_get
from onnx import TensorProto, helper, numpy_helper
from server_process import ServerProcess, kserve_method, onnx_probabilities

from modelrepo.config import ModelConfig, parse_config
from modelrepo.layout import CONFIG_FILE, ONNX_FILE, TORCHSCRIPT_FILE
from server.config import parse_settings
from server.core.autocomplete import (
    DEFAULT_MAX_BATCH_SIZE,
    AutoCompleteError,
    complete_config,
    folder_platform,
)
from server.core.repository import RepositoryError, read_model
from wire import grpc_service_pb2 as pb
from wire import model_config_pb2

T = model_config_pb2
ValueInfo = onnx.ValueInfoProto


def _write_model(
    repository: Path,
    name: str,
    inputs: Sequence[ValueInfo],
    outputs: Sequence[ValueInfo],
    nodes: Sequence[onnx.NodeProto],
    initializers: Sequence[onnx.TensorProto] = (),
    opset: int = 17,
) -> Path:
    """`name/1/model.onnx` in `repository`, and no config.pbtxt: the model's folder."""
    graph = helper.make_graph(list(nodes), name, list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 21 else 10
    onnx.checker.check_model(model)
    directory = repository / name
    (directory / "1").mkdir(parents=True)
    onnx.save(model, directory / "1" / ONNX_FILE)
    return directory


def _tensor(name: str, elem: int, shape: Sequence[int | str | None] | None) -> ValueInfo:
    return helper.make_tensor_value_info(name, elem, shape)


def simple_model(repository: Path, name: str = "simple", elem: int = TensorProto.INT32) -> Path:
    """Triton's `simple`: INPUT0 + INPUT1 -> OUTPUT0, INPUT0 - INPUT1 -> OUTPUT1, [N, 16]."""
    return _write_model(
        repository,
        name,
        [_tensor("INPUT0", elem, ["N", 16]), _tensor("INPUT1", elem, ["N", 16])],
        [_tensor("OUTPUT0", elem, ["N", 16]), _tensor("OUTPUT1", elem, ["N", 16])],
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
    )


def identity_model(
    repository: Path,
    name: str,
    elem: int,
    shape: Sequence[int | str | None] | None,
    opset: int = 17,
) -> Path:
    """y = x, both of `shape` and type `elem`."""
    return _write_model(
        repository,
        name,
        [_tensor("x", elem, shape)],
        [_tensor("y", elem, shape)],
        [helper.make_node("Identity", ["x"], ["y"])],
        opset=opset,
    )


def complete(directory: Path, config: ModelConfig | None = None) -> ModelConfig:
    config = config if config is not None else ModelConfig()
    return complete_config(config, directory, folder_platform(config, directory))


def io(entries: Sequence[T.ModelInput] | Sequence[T.ModelOutput]) -> list[tuple[str, str, list]]:
    return [(e.name, T.DataType.Name(e.data_type), list(e.dims)) for e in entries]


# --- completion ---


def test_a_config_less_two_input_model_is_completed_with_triton_default_batching(
    tmp_path: Path,
) -> None:
    directory = simple_model(tmp_path)
    given = ModelConfig()
    config = complete(directory, given)
    assert config.name == "simple"
    assert (config.platform, config.backend) == ("onnxruntime_onnx", "onnxruntime")
    assert config.default_model_filename == ONNX_FILE
    assert config.max_batch_size == DEFAULT_MAX_BATCH_SIZE == 4
    assert config.HasField("dynamic_batching")
    assert io(config.input) == [
        ("INPUT0", "TYPE_INT32", [16]),
        ("INPUT1", "TYPE_INT32", [16]),
    ]
    assert io(config.output) == [
        ("OUTPUT0", "TYPE_INT32", [16]),
        ("OUTPUT1", "TYPE_INT32", [16]),
    ]
    assert given == ModelConfig()  # the caller's config is left as it was


def test_a_fixed_shape_model_gets_max_batch_size_0_and_its_whole_shape(tmp_path: Path) -> None:
    directory = identity_model(tmp_path, "fixed", TensorProto.FLOAT, [3, 4])
    config = complete(directory)
    assert config.max_batch_size == 0
    assert not config.HasField("dynamic_batching")
    assert io(config.input) == [("x", "TYPE_FP32", [3, 4])]
    assert io(config.output) == [("y", "TYPE_FP32", [3, 4])]


def test_open_dims_after_the_batch_dimension_are_minus_one(tmp_path: Path) -> None:
    directory = identity_model(tmp_path, "ragged", TensorProto.FLOAT, ["N", "H", None, 3])
    config = complete(directory)
    assert config.max_batch_size == 4
    assert io(config.input) == [("x", "TYPE_FP32", [-1, -1, 3])]


def test_one_input_without_a_batch_dimension_means_no_batching(tmp_path: Path) -> None:
    directory = _write_model(
        tmp_path,
        "mixed",
        [_tensor("a", TensorProto.FLOAT, ["N", 4]), _tensor("b", TensorProto.FLOAT, [1, 4])],
        [_tensor("c", TensorProto.FLOAT, ["N", 4])],
        [helper.make_node("Add", ["a", "b"], ["c"])],
    )
    config = complete(directory)
    assert config.max_batch_size == 0
    assert io(config.input) == [("a", "TYPE_FP32", [-1, 4]), ("b", "TYPE_FP32", [1, 4])]


@pytest.mark.parametrize(
    ("elem", "expected"),
    [
        (TensorProto.BOOL, "TYPE_BOOL"),
        (TensorProto.UINT8, "TYPE_UINT8"),
        (TensorProto.UINT16, "TYPE_UINT16"),
        (TensorProto.UINT32, "TYPE_UINT32"),
        (TensorProto.UINT64, "TYPE_UINT64"),
        (TensorProto.INT8, "TYPE_INT8"),
        (TensorProto.INT16, "TYPE_INT16"),
        (TensorProto.INT32, "TYPE_INT32"),
        (TensorProto.INT64, "TYPE_INT64"),
        (TensorProto.FLOAT16, "TYPE_FP16"),
        (TensorProto.FLOAT, "TYPE_FP32"),
        (TensorProto.DOUBLE, "TYPE_FP64"),
        (TensorProto.STRING, "TYPE_STRING"),
        (TensorProto.BFLOAT16, "TYPE_BF16"),
    ],
)
def test_every_onnx_tensor_type_gets_its_triton_datatype(
    tmp_path: Path, elem: int, expected: str
) -> None:
    config = complete(identity_model(tmp_path, "typed", elem, ["N", 2]))
    assert io(config.input) == [("x", expected, [2])]
    assert io(config.output) == [("y", expected, [2])]


def test_a_type_triton_has_no_datatype_for_is_refused_with_triton_message(tmp_path: Path) -> None:
    directory = identity_model(tmp_path, "fp8", TensorProto.FLOAT8E4M3FN, ["N", 2], opset=21)
    with pytest.raises(AutoCompleteError) as caught:
        complete(directory)
    assert str(caught.value) == (
        "unsupported datatype TYPE_INVALID for input 'x' for model 'fp8' "
        "(the model's is tensor(float8e4m3fn))"
    )


def test_a_batch_only_tensor_gets_dims_1_and_an_empty_reshape(tmp_path: Path) -> None:
    directory = identity_model(tmp_path, "vector", TensorProto.INT64, ["N"])
    config = complete(directory)
    assert config.max_batch_size == 4
    (entry,) = config.input
    assert list(entry.dims) == [1]
    assert entry.HasField("reshape") and list(entry.reshape.shape) == []
    assert "reshape {" in str(config.output[0])


def test_a_scalar_model_gets_dims_1_without_reshape_and_no_batching(tmp_path: Path) -> None:
    directory = identity_model(tmp_path, "scalar", TensorProto.FLOAT, [])
    config = complete(directory)
    assert config.max_batch_size == 0
    (entry,) = config.input
    assert list(entry.dims) == [1]
    assert not entry.HasField("reshape")


def test_a_config_naming_only_the_platform_is_completed(tmp_path: Path) -> None:
    directory = simple_model(tmp_path, "platform_only")
    config = complete(directory, parse_config('platform: "onnxruntime_onnx"'))
    assert config.platform == "onnxruntime_onnx" and config.backend == "onnxruntime"
    assert config.max_batch_size == 4
    assert [e.name for e in config.input] == ["INPUT0", "INPUT1"]


def test_a_config_naming_only_the_backend_is_completed(tmp_path: Path) -> None:
    directory = simple_model(tmp_path, "backend_only")
    config = complete(directory, parse_config('backend: "onnxruntime"'))
    assert config.platform == "onnxruntime_onnx"
    assert [e.name for e in config.output] == ["OUTPUT0", "OUTPUT1"]


def test_fields_the_config_sets_are_kept(tmp_path: Path) -> None:
    directory = simple_model(tmp_path, "partial")
    given = parse_config(
        """
        platform: "onnxruntime_onnx"
        max_batch_size: 16
        input [
          { name: "INPUT1" data_type: TYPE_INT32 dims: [ 16 ] },
          { name: "INPUT0" data_type: TYPE_INT32 format: FORMAT_NONE dims: [ 16 ] }
        ]
        dynamic_batching { max_queue_delay_microseconds: 300 }
        instance_group [ { count: 2 kind: KIND_CPU } ]
        parameters { key: "intra_op_thread_count" value { string_value: "2" } }
        """
    )
    config = complete(directory, given)
    assert config.max_batch_size == 16
    assert io(config.input) == [("INPUT1", "TYPE_INT32", [16]), ("INPUT0", "TYPE_INT32", [16])]
    assert io(config.output) == [("OUTPUT0", "TYPE_INT32", [16]), ("OUTPUT1", "TYPE_INT32", [16])]
    assert config.dynamic_batching.max_queue_delay_microseconds == 300
    assert config.instance_group[0].count == 2
    assert config.parameters["intra_op_thread_count"].string_value == "2"


def test_a_max_batch_size_of_1_turns_no_dynamic_batching_on(tmp_path: Path) -> None:
    directory = simple_model(tmp_path, "one")
    config = complete(directory, parse_config("max_batch_size: 1"))
    assert config.max_batch_size == 1
    assert not config.HasField("dynamic_batching")


def test_a_config_with_inputs_and_outputs_is_kept_without_reading_the_graph(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "listed"
    (directory / "1").mkdir(parents=True)
    (directory / "1" / ONNX_FILE).write_bytes(b"not a model")  # never read
    given = parse_config(
        """
        platform: "onnxruntime_onnx"
        input [ { name: "a" data_type: TYPE_FP32 dims: [ 2 ] } ]
        output [ { name: "b" data_type: TYPE_FP32 dims: [ 2 ] } ]
        """
    )
    config = complete(directory, given)
    assert config.max_batch_size == 0
    assert io(config.input) == [("a", "TYPE_FP32", [2])]
    assert config.backend == "onnxruntime" and config.default_model_filename == ONNX_FILE


def test_the_latest_version_graph_is_read(tmp_path: Path) -> None:
    directory = identity_model(tmp_path, "versions", TensorProto.FLOAT, ["N", 2])
    newer = identity_model(tmp_path / "v2", "versions", TensorProto.INT8, [5])
    shutil.move(newer / "1", directory / "2")
    config = complete(directory)
    assert config.max_batch_size == 0
    assert io(config.input) == [("x", "TYPE_INT8", [5])]


def test_overridable_initializers_are_allowed_as_inputs_but_not_counted(tmp_path: Path) -> None:
    directory = _write_model(
        tmp_path,
        "bias",
        [_tensor("x", TensorProto.FLOAT, [2]), _tensor("bias", TensorProto.FLOAT, [2])],
        [_tensor("y", TensorProto.FLOAT, [2])],
        [helper.make_node("Add", ["x", "bias"], ["y"])],
        [numpy_helper.from_array(np.ones(2, np.float32), "bias")],
    )
    config = complete(directory)
    assert [e.name for e in config.input] == ["x"]  # onnxruntime lists only real inputs
    given = parse_config(
        """
        input [ { name: "x" data_type: TYPE_FP32 dims: [ 2 ] },
                { name: "bias" data_type: TYPE_FP32 dims: [ 2 ] optional: true } ]
        """
    )
    assert [e.name for e in complete(directory, given).input] == ["x", "bias"]


# --- the given fields against the graph: Triton's messages ---


def _refusal(directory: Path, text: str) -> str:
    with pytest.raises(AutoCompleteError) as caught:
        complete(directory, parse_config(text))
    return str(caught.value)


def test_a_wrong_input_datatype_is_refused(tmp_path: Path) -> None:
    directory = simple_model(tmp_path, "m")
    assert _refusal(
        directory,
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [16] },'
        ' { name: "INPUT1" data_type: TYPE_INT32 dims: [16] } ]',
    ) == (
        "unable to load model 'm', configuration expects datatype TYPE_FP32 for input "
        "'INPUT0', model provides TYPE_INT32"
    )


def test_a_wrong_string_output_datatype_names_bytes(tmp_path: Path) -> None:
    directory = identity_model(tmp_path, "s", TensorProto.STRING, ["N", 2])
    assert _refusal(directory, 'output [ { name: "y" data_type: TYPE_INT8 dims: [2] } ]') == (
        "unable to load model 's', configuration expects datatype TYPE_INT8 for output 'y', "
        "model provides TYPE_BYTES"
    )


def test_a_misnamed_input_is_refused_with_the_allowed_names(tmp_path: Path) -> None:
    directory = simple_model(tmp_path, "m")
    assert _refusal(
        directory,
        'input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [16] },'
        ' { name: "input1" data_type: TYPE_INT32 dims: [16] } ]',
    ) == ("unexpected inference input 'input1', allowed inputs are: INPUT0, INPUT1")


def test_a_misnamed_output_is_refused_with_the_allowed_names(tmp_path: Path) -> None:
    directory = simple_model(tmp_path, "m")
    assert _refusal(directory, 'output [ { name: "OUT" data_type: TYPE_INT32 dims: [16] } ]') == (
        "unexpected inference output 'OUT', allowed outputs are: OUTPUT0, OUTPUT1"
    )


def test_a_missing_input_is_refused_with_the_counts(tmp_path: Path) -> None:
    directory = simple_model(tmp_path, "m")
    assert _refusal(directory, 'input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [16] } ]') == (
        "unable to load model 'm', configuration expects 1 inputs, model provides 2"
    )


def test_wrong_input_dims_are_refused_with_the_complete_shape(tmp_path: Path) -> None:
    directory = simple_model(tmp_path, "m")
    # A config may not open a dimension the model fixes.
    assert "making complete shape [-1,-1])" in _refusal(
        directory,
        'input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [-1] },'
        ' { name: "INPUT1" data_type: TYPE_INT32 dims: [16] } ]',
    )
    assert _refusal(
        directory,
        'input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [4, 4] },'
        ' { name: "INPUT1" data_type: TYPE_INT32 dims: [16] } ]',
    ) == (
        "model 'm', tensor 'INPUT0': the model expects 2 dimensions (shape [-1,16]) but the "
        "model configuration specifies 3 dimensions (an initial batch dimension because "
        "max_batch_size > 0 followed by the explicit tensor shape, making complete shape "
        "[-1,4,4])"
    )


def test_output_dims_must_match_open_dims_exactly(tmp_path: Path) -> None:
    directory = identity_model(tmp_path, "open", TensorProto.FLOAT, ["N", "W"])
    # An input may narrow an open dimension; an output may not.
    config = complete(
        directory, parse_config('input [ { name: "x" data_type: TYPE_FP32 dims: [8] } ]')
    )
    assert io(config.input) == [("x", "TYPE_FP32", [8])]
    assert _refusal(directory, 'output [ { name: "y" data_type: TYPE_FP32 dims: [8] } ]') == (
        "model 'open', tensor 'y': the model expects 2 dimensions (shape [-1,-1]) but the model "
        "configuration specifies 2 dimensions (an initial batch dimension because max_batch_size"
        " > 0 followed by the explicit tensor shape, making complete shape [-1,8])"
    )


def test_dims_without_batching_are_compared_whole(tmp_path: Path) -> None:
    directory = identity_model(tmp_path, "fixed", TensorProto.FLOAT, [3, 4])
    assert _refusal(directory, 'input [ { name: "x" data_type: TYPE_FP32 dims: [4, 3] } ]') == (
        "model 'fixed', tensor 'x': the model expects 2 dimensions (shape [3,4]) but the model "
        "configuration specifies 2 dimensions (shape [4,3])"
    )


def test_max_batch_size_on_a_model_that_cannot_batch_is_refused(tmp_path: Path) -> None:
    directory = identity_model(tmp_path, "fixed", TensorProto.FLOAT, [3, 4])
    assert _refusal(directory, "max_batch_size: 8") == (
        "autofill failed for model 'fixed': model does not support batching while non-zero "
        "max_batch_size is specified"
    )


def test_a_scalar_tensor_takes_only_dims_of_1(tmp_path: Path) -> None:
    directory = identity_model(tmp_path, "scalar", TensorProto.FLOAT, [])
    assert _refusal(directory, 'input [ { name: "x" data_type: TYPE_FP32 dims: [2] } ]') == (
        "unable to load model 'scalar', scalar tensor 'x', should only provide 1 in the model "
        "configuration when the model doesn't support batching. Model configuration "
        "provided: [2]."
    )


def test_an_optional_input_of_a_batching_model_is_refused(tmp_path: Path) -> None:
    directory = simple_model(tmp_path, "m")
    assert _refusal(
        directory,
        'input [ { name: "INPUT0" data_type: TYPE_INT32 dims: [16] },'
        ' { name: "INPUT1" data_type: TYPE_INT32 dims: [16] },'
        ' { name: "INPUT2" data_type: TYPE_INT32 dims: [16] optional: true } ]',
    ) == (
        "unable to load model 'm', optional input 'INPUT2' is not supported for models that "
        "support batching"
    )


def test_a_sequence_output_is_refused_as_triton_refuses_it(tmp_path: Path) -> None:
    seq = helper.make_tensor_sequence_value_info("s", TensorProto.FLOAT, None)
    directory = _write_model(
        tmp_path,
        "seq",
        [_tensor("x", TensorProto.FLOAT, ["N", 2])],
        [seq],
        [helper.make_node("SequenceConstruct", ["x"], ["s"])],
    )
    with pytest.raises(AutoCompleteError) as caught:
        complete(directory)
    assert str(caught.value) == (
        "Unsupported ONNX Type 'ONNX_TYPE_SEQUENCE' for I/O 's', expected 'ONNX_TYPE_TENSOR'."
    )


# --- platforms and files ---


def test_a_config_less_torchscript_folder_is_refused_with_one_reason(tmp_path: Path) -> None:
    directory = tmp_path / "ts"
    (directory / "1").mkdir(parents=True)
    (directory / "1" / TORCHSCRIPT_FILE).write_bytes(b"PK")
    assert folder_platform(ModelConfig(), directory) == "pytorch_libtorch"
    with pytest.raises(AutoCompleteError) as caught:
        complete(directory)
    assert str(caught.value) == (
        "cannot auto-complete the config of model 'ts': a TorchScript file does not record its "
        "inputs and outputs, so config.pbtxt must list them (name, data_type, dims) and "
        "max_batch_size, as Triton's pytorch backend requires"
    )
    listed = parse_config(
        'backend: "pytorch" input [ { name: "INPUT__0" data_type: TYPE_FP32 dims: [2] } ]'
        ' output [ { name: "OUTPUT__0" data_type: TYPE_FP32 dims: [2] } ]'
    )
    config = complete(directory, listed)  # listed: nothing to complete, nothing read
    assert (config.platform, config.default_model_filename) == ("pytorch_libtorch", "model.pt")


def test_a_folder_without_a_model_file_names_what_is_missing(tmp_path: Path) -> None:
    directory = tmp_path / "empty"
    (directory / "1").mkdir(parents=True)
    with pytest.raises(AutoCompleteError) as caught:
        complete(directory)
    assert str(caught.value) == (
        "cannot tell the platform of model 'empty': its config names no platform or backend, "
        "and its latest version folder holds no model.onnx or model.pt"
    )


def test_an_unreadable_graph_is_refused_without_the_server_path(tmp_path: Path) -> None:
    directory = tmp_path / "broken"
    (directory / "1").mkdir(parents=True)
    (directory / "1" / ONNX_FILE).write_bytes(b"not a model")
    with pytest.raises(AutoCompleteError) as caught:
        complete(directory)
    assert str(caught.value).startswith("cannot read broken/1/model.onnx: ")
    assert str(tmp_path) not in str(caught.value)


def test_read_model_refuses_a_config_less_folder_when_auto_complete_is_off(
    tmp_path: Path,
) -> None:
    simple_model(tmp_path, "simple")
    settings = parse_settings(["--model-repository", str(tmp_path)], env={})
    assert not settings.disable_auto_complete_config
    off = parse_settings(
        ["--model-repository", str(tmp_path)], env={"SERVER_DISABLE_AUTO_COMPLETE_CONFIG": "1"}
    )
    assert off.disable_auto_complete_config
    with pytest.raises(RepositoryError) as caught:
        read_model(tmp_path, "simple", off)
    assert str(caught.value) == (
        "bad config: simple/config.pbtxt: cannot read (No such file or directory) "
        "(auto-complete is off: --disable-auto-complete-config)"
    )
    (tmp_path / "simple" / CONFIG_FILE).write_text("max_batch_size: [")
    with pytest.raises(RepositoryError) as caught:
        read_model(tmp_path, "simple", off)
    assert "auto-complete" not in str(caught.value)  # a config that is there: its own error


def test_read_model_serves_the_completed_config(tmp_path: Path) -> None:
    simple_model(tmp_path, "simple")
    settings = parse_settings(["--model-repository", str(tmp_path)], env={})
    spec = read_model(tmp_path, "simple", settings)
    assert (spec.platform, spec.max_batch_size) == ("onnxruntime_onnx", 4)
    assert io(spec.config.input) == [("INPUT0", "TYPE_INT32", [16]), ("INPUT1", "TYPE_INT32", [16])]
    assert not (tmp_path / "simple" / CONFIG_FILE).exists()  # completed in memory only


# --- a real server ---

AUTO = "fashion_auto"


def _config_less_copy(repository: Path) -> None:
    """The seed fashion model once more, as a folder with only its versions (no config.pbtxt,
    no labels): its graph takes `input` [N,1,28,28] FP32 and gives `probabilities` [N,10]."""
    shutil.copytree(repository / "fashion_mnist", repository / AUTO)
    for path in (repository / AUTO).iterdir():
        if path.is_file():
            path.unlink()


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    return serve(models=["fashion_mnist"], prepare=_config_less_copy)


def _expect_completed(config: dict) -> None:
    """The seed model's config as auto-complete gives it (ModelConfig as JSON)."""
    assert config["name"] == AUTO
    assert (config["platform"], config["backend"]) == ("onnxruntime_onnx", "onnxruntime")
    assert config["max_batch_size"] == 4
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["input"]] == [
        ("input", "TYPE_FP32", [1, 28, 28])
    ]
    assert [(t["name"], t["data_type"], [int(d) for d in t["dims"]]) for t in config["output"]] == [
        ("probabilities", "TYPE_FP32", [10])
    ]


def test_a_config_less_model_serves_and_answers_its_completed_config(
    server: ServerProcess, triton_client: triton.InferenceServerClient
) -> None:
    assert not (server.repository / AUTO / CONFIG_FILE).exists()
    assert triton_client.is_model_ready(AUTO)
    assert f"autofilled max_batch_size to 4 for model '{AUTO}'" in server.log
    answer = triton_client.get_model_config(AUTO, as_json=True)
    _expect_completed(answer["config"])
    status, _, body = http_get(server, f"/v2/models/{AUTO}/config")
    assert status == 200
    _expect_completed(json.loads(body))

    images = np.random.default_rng(7).random((3, 1, 28, 28), dtype=np.float32)
    tensor = triton.InferInput("input", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = triton_client.infer(
        AUTO, [tensor], outputs=[triton.InferRequestedOutput("probabilities")]
    )
    expected = onnx_probabilities(server.repository / AUTO / "1" / ONNX_FILE, images)
    np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=0, atol=1e-6)


def test_with_auto_complete_off_the_config_less_model_is_refused_and_the_others_serve(
    serve: Callable[..., ServerProcess],
) -> None:
    off = serve(
        "--disable-auto-complete-config", models=["fashion_mnist"], prepare=_config_less_copy
    )
    with grpc.insecure_channel(off.target) as channel:
        index = kserve_method(channel, "RepositoryIndex")(pb.RepositoryIndexRequest(), timeout=30)
        states = {m.name: (m.state, m.reason) for m in index.models}
        assert states[AUTO] == (
            "UNAVAILABLE",
            f"bad config: {AUTO}/config.pbtxt: cannot read (No such file or directory) "
            "(auto-complete is off: --disable-auto-complete-config)",
        )
        assert states["fashion_mnist"] == ("READY", "")
        config = kserve_method(channel, "ModelConfig")(
            pb.ModelConfigRequest(name="fashion_mnist"), timeout=30
        ).config
        assert config.max_batch_size > 0 and config.input[0].name == "input"
    client = triton.InferenceServerClient(off.target)
    try:
        images = np.random.default_rng(8).random((2, 1, 28, 28), dtype=np.float32)
        tensor = triton.InferInput("input", list(images.shape), "FP32")
        tensor.set_data_from_numpy(images)
        result = client.infer("fashion_mnist", [tensor])
        expected = onnx_probabilities(off.repository / "fashion_mnist" / "1" / ONNX_FILE, images)
        np.testing.assert_allclose(result.as_numpy("probabilities"), expected, rtol=0, atol=1e-6)
    finally:
        client.close()
