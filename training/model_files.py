"""Model files written elsewhere, ONNX or TorchScript: their tensors, and a way to run them.

An ONNX graph names and types its inputs and outputs; TorchScript records neither, so a probe
input of the shape the user gives is run and the outputs are read off the answer, under the
positional names Triton's pytorch backend uses. Both run on the CPU, on the copy that will be
served.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from modelrepo import layout
from training.errors import TrainingError

PROBE_SEED = 0
# Steps that took this long say so.
SLOW_STEP_S = 1.0
# Triton's pytorch backend names TorchScript tensors by position.
TORCHSCRIPT_INPUT = "INPUT__{}"
TORCHSCRIPT_OUTPUT = "OUTPUT__{}"

# Datatypes the server serves (KServe v2 spelling) and their numpy types; STRING is BYTES.
NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "STRING": np.object_,
}
TORCHSCRIPT_DATATYPES = tuple(k for k in NUMPY_TYPES if k not in ("STRING", "UINT16", "UINT32"))


@dataclass(frozen=True)
class Tensor:
    name: str
    datatype: str  # KServe v2 spelling: FP32, INT64, STRING...
    shape: tuple[int, ...]  # the model's own, batch dim included where it has one; -1 variable


Runner = Callable[[list[np.ndarray]], list[np.ndarray]]


@dataclass
class ModelFile:
    """What import needs of a model file: its tensors, a runner, the files beside it."""

    platform: str
    inputs: list[Tensor]
    outputs: list[Tensor]
    run: Runner
    files: list[str] = field(default_factory=list)  # external data beside model.onnx


# --- reading the model ------------------------------------------------------------------------


def open_onnx(path: Path, staging: Path, log: Callable[[str], None]) -> ModelFile:
    """Inputs and outputs from the graph (initializers are optional inputs and are left out, as
    Triton leaves them out), then an onnxruntime session on the copy that will be served."""
    import onnx
    import onnxruntime as ort

    try:
        graph_model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf's DecodeError and friends: not an ONNX file
        raise TrainingError(
            f"{path.name} is not a readable ONNX model: {first_line(exc)}"
        ) from None
    files = _external_files(graph_model, path)
    target = staging / layout.ONNX_FILE
    with step(log, f"copying it into {staging.parent.name}/"):
        shutil.copyfile(path, target)
        for relative in files:
            (staging / relative).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path.parent / relative, staging / relative)
    graph = graph_model.graph
    if not all(_has_shape(v) for v in graph.output):
        with contextlib.suppress(Exception):
            graph = onnx.shape_inference.infer_shapes(graph_model).graph
    optional = {t.name for t in graph.initializer}
    inputs = [_onnx_tensor(v, "input") for v in graph.input if v.name not in optional]
    outputs = [_onnx_tensor(v, "output") for v in graph.output]
    if not inputs or not outputs:
        raise TrainingError(f"{path.name} has no {'inputs' if not inputs else 'outputs'} to serve")
    with step(log, "loading it into onnxruntime (CPU)"):
        session_options = ort.SessionOptions()
        session_options.log_severity_level = 3
        try:
            session = ort.InferenceSession(
                str(target), session_options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:
            raise TrainingError(f"onnxruntime cannot load {path.name}: {first_line(exc)}") from None
    names = [t.name for t in inputs]
    wanted = [t.name for t in outputs]

    def run(feeds: list[np.ndarray]) -> list[np.ndarray]:
        return list(session.run(wanted, dict(zip(names, feeds, strict=True))))

    return ModelFile(layout.PLATFORM_ONNX, inputs, outputs, run, files)


def _onnx_tensor(value: Any, kind: str) -> Tensor:
    from onnx import TensorProto

    what = f"{kind} {value.name!r}"
    which = value.type.WhichOneof("value")
    if which != "tensor_type":
        raise TrainingError(
            f"{what} is a {which or 'value of no type'}: only tensors can be served"
        )
    element = value.type.tensor_type.elem_type
    datatype = _ONNX_DATATYPES.get(element)
    if datatype is None:
        raise TrainingError(
            f"{what} is {TensorProto.DataType.Name(element)}, a type the server cannot serve "
            f"(supported: {', '.join(sorted(_ONNX_DATATYPES.values()))})"
        )
    if not _has_shape(value):
        raise TrainingError(f"{what} declares no shape: export the model with its shapes")
    shape = tuple(
        int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else -1
        for d in value.type.tensor_type.shape.dim
    )
    return Tensor(value.name, datatype, shape)


def _has_shape(value: Any) -> bool:
    return value.type.HasField("tensor_type") and value.type.tensor_type.HasField("shape")


def _onnx_datatypes() -> dict[int, str]:
    from onnx import TensorProto as T

    return {
        T.BOOL: "BOOL",
        T.UINT8: "UINT8",
        T.UINT16: "UINT16",
        T.UINT32: "UINT32",
        T.UINT64: "UINT64",
        T.INT8: "INT8",
        T.INT16: "INT16",
        T.INT32: "INT32",
        T.INT64: "INT64",
        T.FLOAT16: "FP16",
        T.FLOAT: "FP32",
        T.DOUBLE: "FP64",
        T.STRING: "STRING",
    }


_ONNX_DATATYPES = _onnx_datatypes()


def _external_files(model: Any, path: Path) -> list[str]:
    """Files of weights stored outside model.onnx (relative to it): copied beside the copy."""
    from onnx import TensorProto

    found: set[str] = set()
    for tensor in _tensors(model.graph):
        if tensor.data_location != TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        relative = PurePosixPath(location)
        if not location or relative.is_absolute() or ".." in relative.parts:
            raise TrainingError(
                f"{path.name} keeps weights in {location!r}, which is not a file beside it"
            )
        if not (path.parent / relative).is_file():
            raise TrainingError(f"{path.name} keeps weights in {location}, which is missing")
        found.add(str(relative))
    return sorted(found)


def _tensors(graph: Any) -> Iterator[Any]:
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.HasField("t"):
                yield attribute.t
            yield from attribute.tensors
            if attribute.HasField("g"):
                yield from _tensors(attribute.g)
            for subgraph in attribute.graphs:
                yield from _tensors(subgraph)


def open_torchscript(
    path: Path,
    staging: Path,
    shape: tuple[int, ...],
    datatype: str,
    batching: bool,
    log: Callable[[str], None],
) -> ModelFile:
    """One input of `shape` (without the batch dim when `batching`) and `datatype`; the outputs
    are those seen on a probe input (at batch 2 and 1 when batching, to check that they follow
    the batch dim)."""
    import torch

    from training.export import torchscript_deprecation_silenced as quiet

    if datatype not in TORCHSCRIPT_DATATYPES:
        raise TrainingError(
            f"--input-datatype {datatype}: TorchScript inputs can be "
            f"{', '.join(TORCHSCRIPT_DATATYPES)}"
        )
    target = staging / layout.TORCHSCRIPT_FILE
    shutil.copyfile(path, target)
    with step(log, "loading it with TorchScript (CPU)"), quiet():
        try:
            module = torch.jit.load(str(target), map_location="cpu").eval()
        except Exception as exc:
            raise TrainingError(
                f"{path.name} is not a loadable TorchScript file: {first_line(exc)}"
            ) from None
    arguments = _forward_arguments(module)
    if arguments is not None and arguments != 1:
        raise TrainingError(
            f"{path.name}: forward() takes {arguments} tensors; import handles TorchScript "
            "models with one input"
        )

    def run(feeds: list[np.ndarray]) -> list[np.ndarray]:
        with torch.inference_mode(), quiet():
            result = module(*(torch.from_numpy(np.ascontiguousarray(x)) for x in feeds))
        tensors = list(result) if isinstance(result, (tuple, list)) else [result]
        if not tensors or not all(isinstance(t, torch.Tensor) for t in tensors):
            raise TrainingError(
                f"{path.name} returns {type(result).__name__}: only a tensor, or a tuple or "
                "list of tensors, can be served"
            )
        return [t.detach().cpu().numpy() for t in tensors]

    rng = np.random.default_rng(PROBE_SEED)
    probe_rows = 2 if batching else None
    probe = random_values(rng, datatype, (probe_rows, *shape) if probe_rows else shape)
    with step(log, f"probing it with a {datatype} input shaped {list(probe.shape)}"):
        try:
            seen = run([probe])
            if batching:
                alone = run([probe[:1]])
        except TrainingError:
            raise
        except Exception as exc:
            raise TrainingError(
                f"{path.name} does not run on a {datatype} input shaped {list(probe.shape)}: "
                f"{first_line(exc)} (check --input-shape, --input-datatype, --max-batch-size)"
            ) from None
    outputs = []
    for i, array in enumerate(seen):
        out = _TORCH_DATATYPES.get(str(array.dtype))
        if out is None:
            raise TrainingError(f"output {i} is {array.dtype}, a type the server cannot serve")
        if batching and (array.ndim < 1 or array.shape[0] != 2 or alone[i].shape[0] != 1):
            raise TrainingError(
                f"output {i} has shape {list(array.shape)} for a batch of 2 and "
                f"{list(alone[i].shape)} for 1: it does not follow the batch dim; import with "
                "--max-batch-size 0 and the full input shape"
            )
        dims = (-1, *array.shape[1:]) if batching else array.shape
        outputs.append(Tensor(TORCHSCRIPT_OUTPUT.format(i), out, tuple(dims)))
    inputs = [Tensor(TORCHSCRIPT_INPUT.format(0), datatype, (-1, *shape) if batching else shape)]
    return ModelFile(layout.PLATFORM_TORCHSCRIPT, inputs, outputs, run)


_TORCH_DATATYPES = {str(np.dtype(v)): k for k, v in NUMPY_TYPES.items() if k != "STRING"}


def _forward_arguments(module: Any) -> int | None:
    """Tensors forward() needs (arguments without defaults, `self` left out); None if unknown."""
    try:
        arguments = module.forward.schema.arguments[1:]
    except (AttributeError, RuntimeError):
        return None
    return sum(1 for a in arguments if not a.has_default_value())


def random_values(rng: np.random.Generator, datatype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Values any model of the type can take: [0, 1) floats, small whole numbers (indices
    stay in range), random booleans, short byte strings."""
    if datatype in ("FP16", "FP32", "FP64"):
        return rng.random(shape).astype(NUMPY_TYPES[datatype])
    if datatype == "BOOL":
        return rng.integers(0, 2, shape).astype(np.bool_)
    if datatype == "STRING":
        values = rng.integers(0, 10, shape)
        return np.vectorize(lambda v: str(v).encode(), otypes=[object])(values)
    return rng.integers(0, 10, shape).astype(NUMPY_TYPES[datatype])


@contextlib.contextmanager
def step(log: Callable[[str], None], what: str) -> Iterator[None]:
    """A step says what it does before, and how long it took after when that was long."""
    log(f"{what} ...")
    began = time.perf_counter()
    yield
    took = time.perf_counter() - began
    if took >= SLOW_STEP_S:
        log(f"  done in {took:.1f} s")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line[:300]
