"""Models with the interfaces of Triton's example repository, built with onnx.helper.

None of them looks like our own exports: several inputs and outputs, integer, string and
every other datatype, no batch dimension, `reshape`, label files on other outputs, NHWC
images, variable dims. Each writes its folder (config.pbtxt, version 1, labels) into a
repository.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from modelrepo.config import ModelConfig, write_config
from modelrepo.layout import CONFIG_FILE, ONNX_FILE, PLATFORM_ONNX
from wire import model_config_pb2 as mc

# Every datatype: (config type, ONNX type, numpy dtype); BYTES as object arrays of bytes.
DATATYPES = {
    "BOOL": (mc.TYPE_BOOL, TensorProto.BOOL, np.bool_),
    "UINT8": (mc.TYPE_UINT8, TensorProto.UINT8, np.uint8),
    "UINT16": (mc.TYPE_UINT16, TensorProto.UINT16, np.uint16),
    "UINT32": (mc.TYPE_UINT32, TensorProto.UINT32, np.uint32),
    "UINT64": (mc.TYPE_UINT64, TensorProto.UINT64, np.uint64),
    "INT8": (mc.TYPE_INT8, TensorProto.INT8, np.int8),
    "INT16": (mc.TYPE_INT16, TensorProto.INT16, np.int16),
    "INT32": (mc.TYPE_INT32, TensorProto.INT32, np.int32),
    "INT64": (mc.TYPE_INT64, TensorProto.INT64, np.int64),
    "FP16": (mc.TYPE_FP16, TensorProto.FLOAT16, np.float16),
    "FP32": (mc.TYPE_FP32, TensorProto.FLOAT, np.float32),
    "FP64": (mc.TYPE_FP64, TensorProto.DOUBLE, np.float64),
    "BYTES": (mc.TYPE_STRING, TensorProto.STRING, np.object_),
}


def _save(
    repository: Path, name: str, graph: onnx.GraphProto, config: ModelConfig, opset: int = 17
) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    folder = repository / name
    (folder / "1").mkdir(parents=True)
    onnx.save(model, folder / "1" / ONNX_FILE)
    config.name, config.platform = name, PLATFORM_ONNX
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    write_config(folder / CONFIG_FILE, config)
    return folder


def _tensor(
    tensors: Sequence[mc.ModelInput] | Sequence[mc.ModelOutput],
    name: str,
    datatype: str,
    dims: Sequence[int],
) -> None:
    tensors.add(name=name, data_type=DATATYPES[datatype][0], dims=dims)  # type: ignore[attr-defined]


def write_simple(repository: Path, name: str = "simple", datatype: str = "INT32") -> Path:
    """Triton's `simple`: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, [16] each,
    max_batch_size 8. BYTES (`simple_string`): the strings are numbers, added as int32."""
    onnx_type = DATATYPES[datatype][1]
    batch = ["N", 16]
    if datatype == "BYTES":
        nodes = [
            helper.make_node("Cast", ["INPUT0"], ["a"], to=TensorProto.INT32),
            helper.make_node("Cast", ["INPUT1"], ["b"], to=TensorProto.INT32),
            helper.make_node("Add", ["a", "b"], ["sum"]),
            helper.make_node("Sub", ["a", "b"], ["diff"]),
            helper.make_node("Cast", ["sum"], ["OUTPUT0"], to=TensorProto.STRING),
            helper.make_node("Cast", ["diff"], ["OUTPUT1"], to=TensorProto.STRING),
        ]
    else:
        nodes = [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ]
    graph = helper.make_graph(
        nodes,
        name,
        [helper.make_tensor_value_info(n, onnx_type, batch) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, onnx_type, batch) for n in ("OUTPUT0", "OUTPUT1")],
    )
    config = ModelConfig(max_batch_size=8)
    for n in ("INPUT0", "INPUT1"):
        _tensor(config.input, n, datatype, [16])
    for n in ("OUTPUT0", "OUTPUT1"):
        _tensor(config.output, n, datatype, [16])
    return _save(repository, name, graph, config)


DENSENET_CLASSES = 1000


def write_densenet_like(repository: Path, name: str = "densenet_onnx") -> Path:
    """densenet_onnx's interface: `data_0` FP32 [3,224,224] NCHW reshaped to [1,3,224,224],
    max_batch_size 0, output `fc6_1` [1000] from the model's [1,1000,1,1], a label file.
    Its scores are a fixed linear map of the channel means (logits, like densenet's)."""
    weights = np.random.default_rng(7).standard_normal((DENSENET_CLASSES, 3, 1, 1))
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["data_0"], ["pooled"]),
            helper.make_node("Conv", ["pooled", "w"], ["fc6_1"]),
        ],
        name,
        [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, [1, 3, 224, 224])],
        [helper.make_tensor_value_info("fc6_1", TensorProto.FLOAT, [1, DENSENET_CLASSES, 1, 1])],
        initializer=[numpy_helper.from_array(weights.astype(np.float32), "w")],
    )
    config = ModelConfig(max_batch_size=0)
    config.input.add(
        name="data_0",
        data_type=mc.TYPE_FP32,
        format=mc.ModelInput.FORMAT_NCHW,
        dims=[3, 224, 224],
        reshape=mc.ModelTensorReshape(shape=[1, 3, 224, 224]),
    )
    config.output.add(
        name="fc6_1",
        data_type=mc.TYPE_FP32,
        dims=[DENSENET_CLASSES],
        reshape=mc.ModelTensorReshape(shape=[1, DENSENET_CLASSES, 1, 1]),
        label_filename="densenet_labels.txt",
    )
    config.parameters["image_output"].string_value = "logits"
    folder = _save(repository, name, graph, config)
    labels = "".join(f"class-{i}\n" for i in range(DENSENET_CLASSES))
    (folder / "densenet_labels.txt").write_text(labels)
    return folder


def densenet_scores(model_dir: Path, image: np.ndarray) -> np.ndarray:
    """What the model computes for one float32 [3,224,224] input: its 1000 logits."""
    weights = np.random.default_rng(7).standard_normal((DENSENET_CLASSES, 3, 1, 1))
    means = image.reshape(3, -1).mean(axis=1)
    return (weights.reshape(DENSENET_CLASSES, 3).astype(np.float32) @ means).astype(np.float32)


def write_nhwc_classifier(repository: Path, name: str = "nhwc_classifier") -> Path:
    """A Keras-style classifier: `image` FP32 [32,32,3] FORMAT_NHWC with pixels 0..255
    (image_scaling NONE), softmax over 10 classes in `scores`, max_batch_size 8."""
    weights = np.random.default_rng(3).standard_normal((3, 10)) / 255.0
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["image", "axes"], ["means"], keepdims=0),
            helper.make_node("MatMul", ["means", "w"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["scores"], axis=1),
        ],
        name,
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 10])],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "w"),
            numpy_helper.from_array(np.array([1, 2], np.int64), "axes"),
        ],
    )
    config = ModelConfig(max_batch_size=8)
    config.input.add(
        name="image", data_type=mc.TYPE_FP32, format=mc.ModelInput.FORMAT_NHWC, dims=[32, 32, 3]
    )
    config.output.add(name="scores", data_type=mc.TYPE_FP32, dims=[10])
    config.parameters["image_scaling"].string_value = "NONE"
    return _save(repository, name, graph, config, opset=18)


def nhwc_scores(pixels: np.ndarray) -> np.ndarray:
    """The NHWC classifier's softmax for float32 N x 32 x 32 x 3 pixels (0..255)."""
    weights = (np.random.default_rng(3).standard_normal((3, 10)) / 255.0).astype(np.float32)
    logits = pixels.mean(axis=(1, 2)) @ weights
    exp = np.exp(logits - logits.max(axis=1, keepdims=True))
    return exp / exp.sum(axis=1, keepdims=True)


def write_variable_length(repository: Path, name: str = "varlen") -> Path:
    """`x` FP32 [-1] (max_batch_size 8): TOTAL [1] its sum, DOUBLED [-1] twice it."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceSum", ["x", "axes"], ["TOTAL"], keepdims=1),
            helper.make_node("Add", ["x", "x"], ["DOUBLED"]),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "L"])],
        [
            helper.make_tensor_value_info("TOTAL", TensorProto.FLOAT, ["N", 1]),
            helper.make_tensor_value_info("DOUBLED", TensorProto.FLOAT, ["N", "L"]),
        ],
        initializer=[numpy_helper.from_array(np.array([1], np.int64), "axes")],
    )
    config = ModelConfig(max_batch_size=8)
    config.dynamic_batching.max_queue_delay_microseconds = 20_000
    _tensor(config.input, "x", "FP32", [-1])
    _tensor(config.output, "TOTAL", "FP32", [1])
    _tensor(config.output, "DOUBLED", "FP32", [-1])
    return _save(repository, name, graph, config)


def write_identity_all(
    repository: Path, name: str = "identity_all", datatypes: Sequence[str] = tuple(DATATYPES)
) -> Path:
    """One Identity per datatype: IN_<TYPE> [3] -> OUT_<TYPE> [3], max_batch_size 4."""
    nodes, inputs, outputs = [], [], []
    config = ModelConfig(max_batch_size=4)
    for datatype in datatypes:
        onnx_type = DATATYPES[datatype][1]
        nodes.append(helper.make_node("Identity", [f"IN_{datatype}"], [f"OUT_{datatype}"]))
        inputs.append(helper.make_tensor_value_info(f"IN_{datatype}", onnx_type, ["N", 3]))
        outputs.append(helper.make_tensor_value_info(f"OUT_{datatype}", onnx_type, ["N", 3]))
        _tensor(config.input, f"IN_{datatype}", datatype, [3])
        _tensor(config.output, f"OUT_{datatype}", datatype, [3])
    graph = helper.make_graph(nodes, name, inputs, outputs)
    return _save(repository, name, graph, config)


def write_mistyped(repository: Path, name: str = "mistyped") -> Path:
    """A config that says INT32 for a graph's FP32 input: refused at load, with the reason."""
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    config = ModelConfig(max_batch_size=4)
    _tensor(config.input, "x", "INT32", [4])
    _tensor(config.output, "y", "INT32", [4])
    return _save(repository, name, graph, config)


def sample(datatype: str, rows: int, seed: int = 0) -> np.ndarray:
    """rows x 3 values of a datatype, spanning its range (BYTES: arbitrary UTF-8 strings)."""
    rng = np.random.default_rng(seed)
    dtype = DATATYPES[datatype][2]
    if datatype == "BYTES":
        words = [b"", b"a", "\u00e9t\u00e9".encode(), b"x" * 40, b"12", b"-7"]
        return np.array([[words[(r + c) % 6] for c in range(3)] for r in range(rows)], object)
    if datatype == "BOOL":
        return rng.random((rows, 3)) > 0.5
    if np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        values = rng.integers(info.min, info.max, (rows, 3), dtype=dtype, endpoint=True)
        values[0, :2] = (info.min, info.max)
        return values
    return (rng.standard_normal((rows, 3)) * 1e3).astype(dtype)
