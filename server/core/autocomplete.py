"""Triton's auto-completed model configuration: what config.pbtxt leaves out, read from the graph.

Triton completes a missing or partial config by default (`--disable-auto-complete-config`
turns it off), so a folder holding only `1/model.onnx` serves there; it must serve here too.
The rules are those of Triton's server core (the platform, backend and model file name, from
the files of a version folder) and of its onnxruntime backend (inputs, outputs, datatypes,
dims, max_batch_size and dynamic batching, from the ONNX graph), and the kept fields of a
partial config are checked against the graph with the messages that backend gives at load.
TorchScript files record no tensor names or shapes, so, as in Triton, a `model.pt` needs
its inputs and outputs in config.pbtxt.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modelrepo.config import ModelConfig
from modelrepo.datatypes import DATATYPES
from modelrepo.layout import (
    MODEL_FILES,
    ONNX_FILE,
    PLATFORM_ONNX,
    PLATFORM_TORCHSCRIPT,
    TORCHSCRIPT_FILE,
    list_versions,
)
from wire import model_config_pb2

log = logging.getLogger(__name__)

# Triton's `--backend-config=default-max-batch-size`, for graphs that can batch and configs
# that set no max_batch_size.
DEFAULT_MAX_BATCH_SIZE = 4
BACKENDS = {PLATFORM_ONNX: "onnxruntime", PLATFORM_TORCHSCRIPT: "pytorch"}

_T = model_config_pb2
# onnxruntime's tensor types by config datatype, as Triton's onnxruntime backend maps them
# (BF16 too, which it maps and this server cannot hold in numpy).
ONNX_TYPES: dict[int, str] = {d.config_type: d.onnx_type for d in DATATYPES.values()} | {
    _T.TYPE_BF16: "tensor(bfloat16)"
}
CONFIG_TYPES: dict[str, int] = {onnx: config for config, onnx in ONNX_TYPES.items()}
# The non-tensor ONNX types by their spelling in onnxruntime's Python API, named as Triton
# names them in its refusal.
_NOT_TENSORS = {
    "seq(": "ONNX_TYPE_SEQUENCE",
    "map(": "ONNX_TYPE_MAP",
    "sparse_tensor(": "ONNX_TYPE_SPARSETENSOR",
    "opaque(": "ONNX_TYPE_OPAQUE",
}


class AutoCompleteError(ValueError):
    """A config that cannot be completed, or whose given fields the graph contradicts."""


@dataclass(frozen=True)
class GraphTensor:
    name: str
    onnx_type: str  # onnxruntime's spelling: "tensor(float)"
    shape: tuple[int, ...]  # -1 for a dimension the graph leaves open (symbolic or unknown)

    @property
    def config_type(self) -> int:
        """The config datatype (TYPE_INVALID where Triton has none, e.g. complex64)."""
        return CONFIG_TYPES.get(self.onnx_type, _T.TYPE_INVALID)


@dataclass(frozen=True)
class Graph:
    """An ONNX graph's interface, as onnxruntime reports it."""

    inputs: tuple[GraphTensor, ...]
    outputs: tuple[GraphTensor, ...]
    initializers: tuple[GraphTensor, ...] = ()  # overridable initializers, allowed as inputs

    @property
    def can_batch(self) -> bool:
        """Triton's rule: every input and output has a first dimension, left open."""
        return all(t.shape[:1] == (-1,) for t in (*self.inputs, *self.outputs))


def read_graph(path: Path, shown: str | None = None) -> Graph:
    """The inputs and outputs of the ONNX model at `path` (messages name it `shown`)."""
    import onnxruntime as ort  # the server's runtime; imported here, only when a graph is read

    shown = shown or str(path)
    options = ort.SessionOptions()
    # Only the interface is read: nothing to optimise, and no thread pool worth its start.
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own classes, and names the path
        reason = str(exc).replace(str(path), shown).strip().splitlines()[0]
        raise AutoCompleteError(f"cannot read {shown}: {reason}") from None
    return Graph(
        inputs=_tensors(session.get_inputs()),
        outputs=_tensors(session.get_outputs()),
        initializers=_tensors(session.get_overridable_initializers()),
    )


def _tensors(args: Sequence[Any]) -> tuple[GraphTensor, ...]:
    """onnxruntime's NodeArgs: `type` "tensor(float)", `shape` with str or None where open."""
    found = []
    for arg in args:
        name, kind = str(arg.name), str(arg.type)
        if not kind.startswith("tensor("):
            shown = next((v for k, v in _NOT_TENSORS.items() if kind.startswith(k)), None)
            raise AutoCompleteError(
                f"Unsupported ONNX Type '{shown or 'ONNX_TYPE_UNKNOWN'}' for I/O '{name}', "
                "expected 'ONNX_TYPE_TENSOR'."
            )
        shape = arg.shape or ()
        dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in shape)
        found.append(GraphTensor(name, kind, dims))
    return tuple(found)


def folder_platform(config: ModelConfig, directory: Path) -> str:
    """The platform of a model, as Triton's server core fills it: the config's platform, else
    its backend's, else its default_model_filename's, else the model file found in the
    latest version folder (model.onnx before model.pt, Triton's order); "" when none says."""
    by_backend = {backend: platform for platform, backend in BACKENDS.items()}
    by_file = {file: platform for platform, file in MODEL_FILES.items()}
    if config.platform:
        return config.platform
    if config.backend:
        return by_backend.get(config.backend, "")
    if config.default_model_filename:
        return by_file.get(config.default_model_filename, "")
    versions = list_versions(directory)
    for file in (ONNX_FILE, TORCHSCRIPT_FILE):
        if versions and (directory / str(versions[-1]) / file).is_file():
            return by_file[file]
    return ""


def complete_config(config: ModelConfig, directory: Path, platform: str) -> ModelConfig:
    """`config` completed as Triton completes it (a copy; `config` is left as it is).

    A config that lists inputs and outputs is kept as it is (Triton's backend skips it too,
    and reads no graph). Otherwise the ONNX graph of the latest version fills max_batch_size,
    dynamic batching and the missing side, and the fields the config gave are checked
    against the graph. Raises AutoCompleteError with the reason.
    """
    name = config.name or directory.name
    completed = ModelConfig()
    completed.CopyFrom(config)
    completed.name = name  # Triton names a config-less model after its folder
    if not platform and not (config.platform or config.backend):
        raise AutoCompleteError(
            f"cannot tell the platform of model '{name}': its config names no platform or "
            f"backend, and its latest version folder holds no {ONNX_FILE} or {TORCHSCRIPT_FILE}"
        )
    if platform in BACKENDS:
        _fill_backend_fields(completed, platform)
    if (completed.input and completed.output) or platform not in BACKENDS:
        return completed
    if platform == PLATFORM_TORCHSCRIPT:
        raise AutoCompleteError(
            f"cannot auto-complete the config of model '{name}': a TorchScript file does not "
            "record its inputs and outputs, so config.pbtxt must list them (name, data_type, "
            "dims) and max_batch_size, as Triton's pytorch backend requires"
        )
    versions = list_versions(directory)
    if not versions:
        raise AutoCompleteError(f"no version folders (1, 2, ...) in {name}/")
    relative = f"{versions[-1]}/{completed.default_model_filename}"
    path = directory / relative
    if not path.is_file():
        raise AutoCompleteError(f"cannot auto-complete model '{name}': no {name}/{relative}")
    graph = read_graph(path, f"{name}/{relative}")
    _complete_max_batch(completed, graph, name)
    if not completed.input:
        _complete_io(completed.input, graph.inputs, completed.max_batch_size)
    if not completed.output:
        _complete_io(completed.output, graph.outputs, completed.max_batch_size)
    check_against_graph(completed, graph)
    return completed


def _fill_backend_fields(config: ModelConfig, platform: str) -> None:
    """Triton's server-side fill: backend, platform and default_model_filename."""
    if platform == PLATFORM_TORCHSCRIPT and config.platform:
        config.backend = config.backend or BACKENDS[platform]
        return  # Triton names the file only where it filled the platform
    config.platform = config.platform or platform
    config.backend = config.backend or BACKENDS[platform]
    config.default_model_filename = config.default_model_filename or MODEL_FILES[platform]


def _complete_max_batch(config: ModelConfig, graph: Graph, name: str) -> None:
    """Triton's onnxruntime backend: a graph whose inputs and outputs all lead with an open
    dimension batches (max_batch_size DEFAULT_MAX_BATCH_SIZE unless the config sets one, and
    dynamic batching above 1); one that cannot batch refuses a non-zero max_batch_size."""
    if not graph.can_batch:
        if config.max_batch_size != 0:
            raise AutoCompleteError(
                f"autofill failed for model '{name}': model does not support batching while "
                "non-zero max_batch_size is specified"
            )
        return
    if config.max_batch_size == 0:
        config.max_batch_size = DEFAULT_MAX_BATCH_SIZE
        log.warning(
            "autofilled max_batch_size to %d for model '%s' since batching is supported but "
            "no max_batch_size is specified in model configuration; set max_batch_size in "
            "config.pbtxt for larger batches",
            DEFAULT_MAX_BATCH_SIZE,
            name,
        )
    if config.max_batch_size > 1 and not config.HasField("dynamic_batching"):
        config.dynamic_batching.SetInParent()


def _complete_io(target: Any, tensors: Sequence[GraphTensor], max_batch_size: int) -> None:
    """One config entry per graph tensor, in the graph's order: dims without the batch
    dimension; a tensor left with no dims is `dims: [1]`, with an empty reshape when batched
    (a config may not declare a scalar)."""
    for tensor in tensors:
        entry = target.add()
        entry.name = tensor.name
        entry.data_type = tensor.config_type
        dims = tensor.shape[1:] if max_batch_size > 0 else tensor.shape
        entry.dims.extend(dims or (1,))
        if not dims and max_batch_size > 0:
            entry.reshape.SetInParent()


def check_against_graph(config: ModelConfig, graph: Graph) -> None:
    """The checks of Triton's onnxruntime backend at load, with its messages: the number of
    inputs, each input's and output's name, datatype and dims (or reshape) against the graph.
    """
    name = config.name
    required = sum(1 for spec in config.input if not spec.optional)
    if len(graph.inputs) != required:
        raise AutoCompleteError(
            f"unable to load model '{name}', configuration expects {required} inputs, "
            f"model provides {len(graph.inputs)}"
        )
    inputs = {t.name: t for t in (*graph.inputs, *graph.initializers)}
    for spec in config.input:
        if spec.optional and config.max_batch_size != 0:
            raise AutoCompleteError(
                f"unable to load model '{name}', optional input '{spec.name}' is not supported "
                "for models that support batching"
            )
        _check_tensor(config, spec, inputs, "input", exact=False)
    outputs = {t.name: t for t in graph.outputs}
    for spec in config.output:
        _check_tensor(config, spec, outputs, "output", exact=True)


def _check_tensor(
    config: ModelConfig,
    spec: model_config_pb2.ModelInput | model_config_pb2.ModelOutput,
    tensors: dict[str, GraphTensor],
    kind: str,
    exact: bool,
) -> None:
    name = config.name
    tensor = tensors.get(spec.name)
    if tensor is None:
        raise AutoCompleteError(
            f"unexpected inference {kind} '{spec.name}', allowed {kind}s are: "
            + ", ".join(sorted(tensors))
        )
    type_name = model_config_pb2.DataType.Name(spec.data_type)
    if spec.data_type not in ONNX_TYPES:
        raise AutoCompleteError(
            f"unsupported datatype {type_name} for {kind} '{spec.name}' for model '{name}' "
            f"(the model's is {tensor.onnx_type})"
        )
    if ONNX_TYPES[spec.data_type] != tensor.onnx_type:
        raise AutoCompleteError(
            f"unable to load model '{name}', configuration expects datatype {type_name} for "
            f"{kind} '{spec.name}', model provides TYPE_{_api_name(tensor)}"
        )
    dims = list(spec.reshape.shape) if spec.HasField("reshape") else list(spec.dims)
    if not tensor.shape:
        if any(d != 1 for d in dims):
            raise AutoCompleteError(
                f"unable to load model '{name}', scalar tensor '{spec.name}', should only "
                "provide 1 in the model configuration when the model doesn't support batching. "
                f"Model configuration provided: {_shape(dims)}."
            )
        return
    _compare_dims(name, spec.name, list(tensor.shape), dims, config.max_batch_size, exact)


def _api_name(tensor: GraphTensor) -> str:
    """The datatype Triton says a model provides: its API name (BYTES for strings)."""
    if tensor.config_type == _T.TYPE_STRING:
        return "BYTES"
    return model_config_pb2.DataType.Name(tensor.config_type).removeprefix("TYPE_")


def _compare_dims(
    model: str, tensor: str, shape: list[int], dims: list[int], max_batch_size: int, exact: bool
) -> None:
    """Triton's comparison: the config's dims (after the implicit batch dimension) against
    the graph's; an open graph dimension takes any size unless `exact` (outputs)."""
    if max_batch_size > 0:
        if not shape or shape[0] != -1:
            raise AutoCompleteError(
                f"model '{model}', tensor '{tensor}': for the model to support batching the "
                "shape should have at least 1 dimension and the first dimension must be -1; "
                f"but shape expected by the model is {_shape(shape)}"
            )
        full = [-1, *dims]
        if not _same(shape, full, exact):
            raise AutoCompleteError(
                f"model '{model}', tensor '{tensor}': the model expects {len(shape)} dimensions "
                f"(shape {_shape(shape)}) but the model configuration specifies {len(full)} "
                "dimensions (an initial batch dimension because max_batch_size > 0 followed by "
                f"the explicit tensor shape, making complete shape {_shape(full)})"
            )
    elif not _same(shape, dims, exact):
        raise AutoCompleteError(
            f"model '{model}', tensor '{tensor}': the model expects {len(shape)} dimensions "
            f"(shape {_shape(shape)}) but the model configuration specifies {len(dims)} "
            f"dimensions (shape {_shape(dims)})"
        )


def _same(shape: list[int], dims: list[int], exact: bool) -> bool:
    return len(shape) == len(dims) and all(
        m == d for m, d in zip(shape, dims, strict=True) if exact or m != -1
    )


def _shape(dims: Sequence[int]) -> str:
    return "[" + ",".join(str(d) for d in dims) + "]"
