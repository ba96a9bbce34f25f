"""The model repository contract: config.pbtxt as Triton writes it (read, and edited as text),
version folders, labels, and the parameters the server reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2 as triton_config

from modelrepo.config import (
    ConfigError,
    data_type_name,
    load_config,
    parse_config,
    parse_json_config,
    write_config,
)
from modelrepo.config_edit import ConfigEditError, set_instance_count, set_parameter, set_value
from modelrepo.layout import list_versions, next_version, read_labels, write_labels
from server.config import Settings
from server.core.repository import RepositoryError, read_model

# A config as a Triton user writes it: fields this server does not use are mixed in.
TRITON_CONFIG = """
name: "fashion_mnist"
platform: "onnxruntime_onnx"
max_batch_size: 32
version_policy: { specific: { versions: [1, 3] } }
input [
  { name: "input" data_type: TYPE_FP32 format: FORMAT_NCHW dims: [1, 28, 28]
    reshape: { shape: [1, 28, 28] } }
]
output [ { name: "probabilities" data_type: TYPE_FP32 dims: [10] label_filename: "labels.txt" } ]
dynamic_batching { max_queue_delay_microseconds: 500 preferred_batch_size: [8, 16]
                   priority_levels: 2 default_queue_policy { max_queue_size: 10 } }
instance_group [ { count: 2 kind: KIND_CPU rate_limiter { priority: 1 } } ]
optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" } ] } }
model_warmup [ { name: "zeros" batch_size: 1 } ]
parameters { key: "training_dataset" value { string_value: "fashion-mnist" } }
parameters { key: "note" value { string_value: "kept as written: a [b] # c" } }  # a [comment]
"""


def test_reads_the_fields_it_uses_and_ignores_the_rest() -> None:
    config = parse_config(TRITON_CONFIG)
    assert (config.name, config.platform, config.max_batch_size) == (
        "fashion_mnist",
        "onnxruntime_onnx",
        32,
    )
    assert list(config.version_policy.specific.versions) == [1, 3]
    assert list(config.input[0].dims) == [1, 28, 28]
    assert data_type_name(config.input[0].data_type) == "FP32"
    assert config.output[0].label_filename == "labels.txt"
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert list(config.dynamic_batching.preferred_batch_size) == [8, 16]
    assert config.instance_group[0].count == 2
    assert config.parameters["training_dataset"].string_value == "fashion-mnist"
    assert config.parameters["note"].string_value == "kept as written: a [b] # c"


def test_what_it_writes_reads_back_here_and_in_tritons_own_schema(tmp_path: Path) -> None:
    config = parse_config(TRITON_CONFIG)
    path = tmp_path / "config.pbtxt"
    write_config(path, config)
    assert load_config(path) == config
    # Same field numbers as Triton: the bytes parse with Triton's message to the same values.
    theirs = triton_config.ModelConfig.FromString(config.SerializeToString())
    assert theirs.name == "fashion_mnist" and theirs.max_batch_size == 32
    assert list(theirs.input[0].dims) == [1, 28, 28]
    assert theirs.input[0].data_type == triton_config.TYPE_FP32
    assert theirs.dynamic_batching.max_queue_delay_microseconds == 500
    assert theirs.instance_group[0].kind == triton_config.ModelInstanceGroup.KIND_CPU


def test_unreadable_configs_name_the_file_and_the_problem(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^cfg: .*max_batch_size"):
        parse_config("max_batch_size: many", "cfg")
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.pbtxt")


def test_version_folders_and_labels(tmp_path: Path) -> None:
    model = tmp_path / "m"
    assert list_versions(model) == [] and next_version(model) == 1
    for name in ("1", "10", "2", "0", "notes", ".tmp-3"):
        (model / name).mkdir(parents=True)
    (model / "7").write_text("a file, not a version folder")
    assert list_versions(model) == [1, 2, 10]
    assert next_version(model) == 11
    write_labels(model / "labels.txt", ["T-shirt/top", "Trouser"])
    (model / "labels.txt").write_text((model / "labels.txt").read_text() + "\n\n")
    assert read_labels(model / "labels.txt") == ["T-shirt/top", "Trouser"]


# --- editing config.pbtxt as text (modelrepo.config_edit) ------------------------------------


def test_edits_change_only_the_values_asked_for() -> None:
    """Comments, fields this server does not read, their order and spelling stay as written."""
    edited = set_value(TRITON_CONFIG, ("max_batch_size",), "16")
    edited = set_value(edited, ("dynamic_batching", "max_queue_delay_microseconds"), "100")
    edited = set_instance_count(edited, 3)
    edited = set_parameter(edited, "note", 'new "value"')
    edited = set_parameter(edited, "intra_op_thread_count", "2")
    expected = parse_config(TRITON_CONFIG)
    expected.max_batch_size = 16
    expected.dynamic_batching.max_queue_delay_microseconds = 100
    expected.instance_group[0].count = 3
    expected.parameters["note"].string_value = 'new "value"'
    expected.parameters["intra_op_thread_count"].string_value = "2"
    assert parse_config(edited) == expected
    for kept in (
        "priority_levels: 2 default_queue_policy { max_queue_size: 10 }",
        'optimization { execution_accelerators { gpu_execution_accelerator: [ { name: "tensorrt" '
        "} ] } }",
        'model_warmup [ { name: "zeros" batch_size: 1 } ]',
        "kind: KIND_CPU rate_limiter { priority: 1 }",
        "# a [comment]",
        "reshape: { shape: [1, 28, 28] } }",
    ):
        assert kept in edited
    # Line by line, only the edited lines differ, and the new parameter is added after the last.
    lines = TRITON_CONFIG.splitlines()
    changed = [b for a, b in zip(lines, edited.splitlines()[: len(lines)], strict=True) if a != b]
    assert changed == [
        "max_batch_size: 16",
        "dynamic_batching { max_queue_delay_microseconds: 100 preferred_batch_size: [8, 16]",
        "instance_group [ { count: 3 kind: KIND_CPU rate_limiter { priority: 1 } } ]",
        'parameters { key: "note" value { string_value: "new \\"value\\"" } }  # a [comment]',
    ]
    assert edited.splitlines()[len(lines) :][:2] == [
        "parameters {",
        '  key: "intra_op_thread_count"',
    ]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "# nothing but a comment",
        'name: "m"\ndynamic_batching { }\n',
        'name: "m" instance_group [ { kind: KIND_CPU } ]',
        'name: "m"\ninstance_group [\n  {\n    kind: KIND_CPU\n  }\n]\n'
        'parameters [ { key: "a" value: { string_value: "b" } } ]\n',
    ],
)
def test_edits_add_what_is_missing(text: str) -> None:
    edited = set_value(text, ("dynamic_batching", "max_queue_delay_microseconds"), "100")
    edited = set_instance_count(edited, 2)
    edited = set_value(edited, ("max_batch_size",), "8")
    edited = set_parameter(edited, "intra_op_thread_count", "1")
    expected = parse_config(text)
    expected.dynamic_batching.max_queue_delay_microseconds = 100
    if expected.instance_group:
        expected.instance_group[0].count = 2
    else:
        expected.instance_group.add(count=2)
    expected.max_batch_size = 8
    expected.parameters["intra_op_thread_count"].string_value = "1"
    assert parse_config(edited) == expected


def test_edits_refuse_what_they_cannot_do_safely() -> None:
    with pytest.raises(ConfigEditError, match="2 instance groups"):
        set_instance_count("instance_group { count: 1 }\ninstance_group { count: 1 }", 4)
    with pytest.raises(ConfigEditError, match="line 2"):
        set_value('name: "m"\ninput [ { name: "x" ', ("max_batch_size",), "8")
    with pytest.raises(ConfigEditError, match="not a message"):
        set_value("dynamic_batching: 3", ("dynamic_batching", "max_queue_delay_microseconds"), "1")


# --- intra_op_thread_count: Triton's onnxruntime backend parameter ---------------------------


def _model_folder(repository: Path, name: str, platform: str, threads: str | None) -> None:
    model = repository / name
    (model / "1").mkdir(parents=True)
    text = (
        f'platform: "{platform}" max_batch_size: 8\n'
        'input [ { name: "input" data_type: TYPE_FP32 dims: [1, 28, 28] } ]\n'
        'output [ { name: "probabilities" data_type: TYPE_FP32 dims: [10] } ]\n'
    )
    if threads is not None:
        text += (
            f'parameters {{ key: "intra_op_thread_count" value {{ string_value: "{threads}" }} }}\n'
        )
    (model / "config.pbtxt").write_text(text)


def test_the_config_sets_onnxruntime_threads_per_model(tmp_path: Path) -> None:
    settings = Settings(model_repository=tmp_path, intra_op_threads=1)
    _model_folder(tmp_path, "own", "onnxruntime_onnx", "3")
    _model_folder(tmp_path, "default", "onnxruntime_onnx", None)
    # torch's threads belong to the process: a TorchScript model keeps the server's.
    _model_folder(tmp_path, "torch", "pytorch_libtorch", "3")
    assert read_model(tmp_path, "own", settings).intra_op_threads == 3
    assert read_model(tmp_path, "default", settings).intra_op_threads == 1
    assert read_model(tmp_path, "torch", settings).intra_op_threads == 1
    for bad in ("two", "-1", "1.5", "100000"):
        _model_folder(tmp_path, f"bad{bad}", "onnxruntime_onnx", bad)
        with pytest.raises(RepositoryError, match="intra_op_thread_count must be a number"):
            read_model(tmp_path, f"bad{bad}", settings)


@pytest.mark.parametrize("proto_names", [True, False], ids=["field_names", "json_names"])
def test_a_json_config_from_tritons_schema_reads_as_its_text_does(proto_names: bool) -> None:
    """The `config` load parameter: protobuf's JSON of Triton's own ModelConfig, fields this
    server does not use included, reads as config.pbtxt does; enums in any case, as in Triton."""
    triton = text_format.Parse(TRITON_CONFIG, triton_config.ModelConfig())
    document = json_format.MessageToDict(triton, preserving_proto_field_name=proto_names)
    assert {"optimization", "model_warmup" if proto_names else "modelWarmup"} <= set(document)
    document["input"][0]["data_type" if proto_names else "dataType"] = "type_fp32"
    assert parse_json_config(json.dumps(document)) == parse_config(TRITON_CONFIG)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{max_batch_size: 2}", "not valid JSON: Expecting property name"),
        ('"max_batch_size"', "expected a JSON object, got str"),
        ('{"max_batch_size": 2.5}', "Failed to parse max_batch_size field"),
        ('{"input": [{"data_type": "TYPE_FLOAT"}]}', "Invalid enum value TYPE_FLOAT"),
        ('{"version_policy": {"specific": {"versions": "1"}}}', "must be in []"),
    ],
)
def test_a_malformed_json_config_is_refused_with_the_reason(text: str, reason: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_json_config(text)
    assert reason in str(caught.value)
