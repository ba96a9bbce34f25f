"""`python -m training import`: a model trained elsewhere -> a complete repository entry.

What Triton would need a person to write by hand comes from the file itself: config.pbtxt from
the ONNX graph (names, datatypes, dims; a dynamic first dim everywhere means batching) or, for
TorchScript, which has no typed signature, from running a probe input of the shape the user
gives under Triton's `INPUT__0`/`OUTPUT__0` names. A model with one image input and one vector
of class scores also gets the image-preparation keys (modelrepo.imageprep), so the native API
classifies encoded images with it. The model then runs once on seeded inputs (prepared images
for a classifier), and its own outputs become reference.npz, which the server checks at load.

Everything is staged in a hidden folder and renamed into place last: a refused import leaves
nothing behind.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from modelrepo import imageprep, layout
from modelrepo.config import ConfigError, ModelConfig, format_config, load_config
from modelrepo.imageprep import ImagePrep, ImagePrepError
from modelrepo.precision import REFERENCE_TOLERANCE_KEY
from training.errors import TrainingError
from training.model_files import (
    TORCHSCRIPT_DATATYPES,
    ModelFile,
    first_line,
    open_onnx,
    open_torchscript,
    random_values,
    step,
)
from wire import model_config_pb2

ONNX_SUFFIXES = (".onnx",)
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".torchscript")
# Triton's autocomplete gives a batchable model a default max_batch_size; ours is 8.
DEFAULT_MAX_BATCH_SIZE = 8
REFERENCE_ROWS = 4
REFERENCE_SEED = 0
# A variable dim other than the batch's takes this size in the reference inputs.
PROBE_DIM = 1
# Load-time tolerance per unit of output magnitude (logits are not bounded like probabilities);
# FP16 anywhere in the model gets the fp16 export's.
TOLERANCE = 1e-4
HALF_TOLERANCE = 1e-2
# Rows of probabilities sum to 1 within this.
SUM_TOLERANCE = 1e-3

# Command-line flags of the image-preparation keys, for messages.
_FLAGS = {
    imageprep.SCALING_PARAMETER: "--scaling",
    imageprep.MEAN_PARAMETER: "--mean",
    imageprep.STD_PARAMETER: "--std",
    imageprep.CHANNEL_ORDER_PARAMETER: "--channel-order",
    imageprep.OUTPUT_PARAMETER: "--output-kind",
}


@dataclass
class ImportOptions:
    """What the command line may say; None: found in the file, or the default."""

    labels: Path | None = None
    version: int | None = None
    max_batch_size: int | None = None
    input_shape: tuple[int, ...] | None = None  # the input's dims without the batch dim
    input_datatype: str | None = None  # TorchScript only (default FP32)
    format: str | None = None  # NCHW or NHWC
    scaling: str | None = None
    mean: str | None = None
    std: str | None = None
    channel_order: str | None = None
    output_kind: str | None = None  # probabilities or logits; None: seen in the outputs

    def image_flags(self) -> list[str]:
        """The image-preparation flags given, for messages."""
        given = {
            "--format": self.format,
            "--scaling": self.scaling,
            "--mean": self.mean,
            "--std": self.std,
            "--channel-order": self.channel_order,
            "--output-kind": self.output_kind,
        }
        return [flag for flag, value in given.items() if value is not None]


def import_model(
    model_file: Path | str,
    repository: Path | str,
    name: str,
    options: ImportOptions | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Import `model_file` as version `options.version` (default 1) of model `name`; returns
    the version folder. Raises TrainingError with a one-line reason for what cannot be served."""
    opts = options or ImportOptions()
    path = Path(model_file)
    platform = _check_request(path, name, opts)
    labels = _read_labels(opts.labels)
    model_dir = Path(repository) / name
    version = opts.version or 1
    existing = _existing_config(model_dir, name, opts.version)
    size = path.stat().st_size
    log(f"importing {path} ({size / 1e6:.1f} MB) as {name} version {version}")
    created = not model_dir.exists()
    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".import-{uuid.uuid4().hex[:12]}"
    written: list[Path] = []  # files beside the versions, removed again if the import fails
    try:
        staging.mkdir()
        if platform == layout.PLATFORM_ONNX:
            model = open_onnx(path, staging, log)
        else:
            assert opts.input_shape is not None
            batching = opts.max_batch_size is None or opts.max_batch_size > 0
            datatype = (opts.input_datatype or "FP32").upper()
            model = open_torchscript(path, staging, opts.input_shape, datatype, batching, log)
        config = _config(name, model, opts)
        prep = _image_prep(config, opts, log)
        _attach_labels(config, labels)
        inputs = _reference_inputs(config, prep)
        with step(log, f"running it on {REFERENCE_ROWS} seeded inputs"):
            outputs = _run_reference(config, model, inputs)
        if prep is not None:
            prep = _output_kind(prep, outputs[0], opts, log)
            config.parameters[imageprep.OUTPUT_PARAMETER].string_value = prep.output
        tolerance = _tolerance(model, outputs)
        _save_reference(staging / layout.REFERENCE_FILE, config, inputs, outputs, tolerance)
        if existing is not None:
            _check_same_model(existing, config, name)
            _check_same_labels(model_dir, labels, name)
        else:  # the config first: a version the server finds must have one
            written.append(model_dir / layout.CONFIG_FILE)
            _write_text(written[-1], format_config(config))
            if labels:
                written.append(model_dir / layout.LABELS_FILE)
                _write_text(written[-1], "".join(f"{label}\n" for label in labels))
        target = model_dir / str(version)
        try:
            os.rename(staging, target)
        except OSError as exc:
            raise TrainingError(f"cannot write {target}: {exc.strerror or exc}") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        for path_written in written:
            path_written.unlink(missing_ok=True)
        if created:
            shutil.rmtree(model_dir, ignore_errors=True)
        raise
    log(_summary(target, existing or config, prep, len(labels), tolerance))
    return target


def _check_request(path: Path, name: str, opts: ImportOptions) -> str:
    """The platform the file's suffix says; refuses what cannot be imported before any work."""
    if not name or name.startswith(".") or "/" in name or "\\" in name or name != name.strip():
        raise TrainingError(f"invalid model name {name!r}: use a plain folder name")
    if not path.is_file():
        raise TrainingError(f"model file {path} not found")
    suffix = path.suffix.lower()
    if suffix in ONNX_SUFFIXES:
        platform = layout.PLATFORM_ONNX
    elif suffix in TORCHSCRIPT_SUFFIXES:
        platform = layout.PLATFORM_TORCHSCRIPT
    else:
        known = ", ".join(ONNX_SUFFIXES + TORCHSCRIPT_SUFFIXES)
        raise TrainingError(
            f"{path.name}: unknown model file type {suffix or '(no suffix)'!r} (import takes "
            f"ONNX or TorchScript files: {known})"
        )
    if platform == layout.PLATFORM_TORCHSCRIPT and opts.input_shape is None:
        raise TrainingError(
            f"{path.name} is TorchScript, which records no input shape: give the input's dims "
            "with --input-shape (without the batch dim, e.g. 3,224,224)"
        )
    if platform == layout.PLATFORM_ONNX and opts.input_datatype is not None:
        raise TrainingError("--input-datatype is for TorchScript files: an ONNX graph types them")
    if opts.input_shape is not None and any(d < 1 for d in opts.input_shape):
        raise TrainingError(f"--input-shape {list(opts.input_shape)}: every dim must be >= 1")
    if opts.format is not None and opts.format.upper() not in imageprep.LAYOUTS:
        raise TrainingError(f"--format {opts.format}: expected one of {imageprep.LAYOUTS}")
    if opts.version is not None and opts.version < 1:
        raise TrainingError(f"--version must be at least 1, got {opts.version}")
    if opts.max_batch_size is not None and opts.max_batch_size < 0:
        raise TrainingError(f"--max-batch-size must not be negative, got {opts.max_batch_size}")
    return platform


def _read_labels(path: Path | None) -> list[str]:
    if path is None:
        return []
    if not path.is_file():
        raise TrainingError(f"labels file {path} not found")
    try:
        labels = layout.read_labels(path)
    except UnicodeDecodeError:
        raise TrainingError(f"labels file {path} is not UTF-8 text") from None
    if not labels:
        raise TrainingError(f"labels file {path} lists no class names (one per line)")
    return labels


def _existing_config(model_dir: Path, name: str, version: int | None) -> ModelConfig | None:
    """The config a new version must match (None: a new model). A model folder that exists
    takes another version only when asked for one by number."""
    if version is None:
        if model_dir.exists() and any(model_dir.iterdir()):
            raise TrainingError(
                f"{model_dir} already exists: pass --version N to add version N to it (its "
                "config.pbtxt must describe the same inputs and outputs), or choose another --name"
            )
        return None
    if (model_dir / str(version)).exists():
        raise TrainingError(f"{name} already has a version {version}: choose another --version")
    config_path = model_dir / layout.CONFIG_FILE
    if not config_path.exists():
        return None
    try:
        return load_config(config_path)
    except ConfigError as exc:
        raise TrainingError(f"cannot add a version to {name}: {exc}") from None


# --- the config ---------------------------------------------------------------------------------


def _config(name: str, model: ModelFile, opts: ImportOptions) -> ModelConfig:
    """config.pbtxt as Triton's autocomplete would write it: batching when every input and
    output has a variable first dim (their dims then leave it out)."""
    tensors = model.inputs + model.outputs
    fixed = next((t for t in tensors if not t.shape or t.shape[0] != -1), None)
    max_batch = opts.max_batch_size
    if max_batch is None:
        max_batch = DEFAULT_MAX_BATCH_SIZE if fixed is None else 0
    if max_batch > 0 and fixed is not None:
        first = f"its first dim is {fixed.shape[0]}" if fixed.shape else "it has no dims"
        raise TrainingError(
            f"the model cannot batch: {fixed.name!r} has shape {list(fixed.shape)} ({first}, "
            "not variable): import it with --max-batch-size 0"
        )
    if max_batch > 0:
        short = next((t for t in tensors if len(t.shape) < 2), None)
        if short is not None:
            raise TrainingError(
                f"{short.name!r} has only the batch dim; serving it batched needs a reshape in "
                "config.pbtxt, which import does not write: import it with --max-batch-size 0"
            )
    config = ModelConfig(name=name, platform=model.platform, max_batch_size=max_batch)
    cut = 1 if max_batch > 0 else 0
    for tensor in model.inputs:
        config.input.add(
            name=tensor.name, data_type=_type_enum(tensor.datatype), dims=tensor.shape[cut:]
        )
    for tensor in model.outputs:
        config.output.add(
            name=tensor.name, data_type=_type_enum(tensor.datatype), dims=tensor.shape[cut:]
        )
    if opts.input_shape is not None and model.platform == layout.PLATFORM_ONNX:
        _set_input_shape(config, opts.input_shape)
    if max_batch > 0:
        config.dynamic_batching.SetInParent()
    config.instance_group.add(count=1, kind=model_config_pb2.ModelInstanceGroup.KIND_AUTO)
    return config


def _set_input_shape(config: ModelConfig, shape: tuple[int, ...]) -> None:
    """--input-shape on an ONNX model fixes the variable dims of its one input."""
    if len(config.input) != 1:
        raise TrainingError(f"--input-shape needs a model with one input, not {len(config.input)}")
    model_input = config.input[0]
    dims = list(model_input.dims)
    fits = len(dims) == len(shape) and all(d in (-1, s) for d, s in zip(dims, shape, strict=True))
    if not fits:
        raise TrainingError(
            f"--input-shape {list(shape)} does not fit input {model_input.name!r}, whose graph "
            f"dims are {dims} (-1: variable; without the batch dim when batching)"
        )
    model_input.ClearField("dims")
    model_input.dims.extend(shape)


def _type_enum(datatype: str) -> int:
    return int(model_config_pb2.DataType.Value(f"TYPE_{datatype}"))


def _image_prep(
    config: ModelConfig, opts: ImportOptions, log: Callable[[str], None]
) -> ImagePrep | None:
    """The preparation of a model with one image input and one vector of class scores, written
    into `config` (input format, `image_*` keys); None, with a note, for other models. Asking
    for image preparation on a model that cannot have it is refused."""
    flags = opts.image_flags()
    base = _without_batch_of_one(config) or config
    problem = _classifier_problem(base)
    prep = None
    if problem is None:
        candidate = ModelConfig()
        candidate.CopyFrom(base)
        if opts.format is not None:
            candidate.input[0].format = imageprep.FORMATS[opts.format.upper()]
        given = {
            imageprep.SCALING_PARAMETER: opts.scaling,
            imageprep.MEAN_PARAMETER: opts.mean,
            imageprep.STD_PARAMETER: opts.std,
            imageprep.CHANNEL_ORDER_PARAMETER: opts.channel_order,
            imageprep.OUTPUT_PARAMETER: opts.output_kind,
        }
        for key, value in given.items():
            if value is not None:
                candidate.parameters[key].string_value = value
        try:
            prep = ImagePrep.from_config(candidate)
        except ImagePrepError as exc:
            problem = _as_flags(str(exc))
    if problem is not None:
        if flags:
            raise TrainingError(f"{', '.join(flags)}: cannot prepare images for it: {problem}")
        log(f"note: imported as a generic model, without image-preparation keys: {problem}")
        return None
    assert prep is not None
    config.CopyFrom(base)
    config.input[0].format = imageprep.FORMATS[prep.layout]
    for key, value in prep.to_parameters().items():
        config.parameters[key].string_value = value
    return prep


def _without_batch_of_one(config: ModelConfig) -> ModelConfig | None:
    """A model without batching whose one input is [1, C, H, W] and one output [1, ...] (an
    exporter's fixed batch of one) as Triton's densenet_onnx example configures one: dims
    without the 1, and a `reshape` to the model's own shapes. None for other models."""
    if config.max_batch_size != 0 or len(config.input) != 1 or len(config.output) != 1:
        return None
    if len(config.input[0].dims) != 4 or config.input[0].dims[0] != 1:
        return None
    if len(config.output[0].dims) < 2 or config.output[0].dims[0] != 1:
        return None
    reshaped = ModelConfig()
    reshaped.CopyFrom(config)
    for tensor in (reshaped.input[0], reshaped.output[0]):
        tensor.reshape.shape.extend(tensor.dims)
        del tensor.dims[0]
    return reshaped


def _classifier_problem(config: ModelConfig) -> str | None:
    """Why the model is not an image classifier as the native API serves one (None: it is):
    one input, one output of class scores (Triton's image_client asks the same)."""
    if len(config.input) != 1:
        names = ", ".join(repr(i.name) for i in config.input)
        return f"it has {len(config.input)} inputs ({names}), an image classifier one"
    if len(config.output) != 1:
        return f"it has {len(config.output)} outputs, an image classifier one"
    output = config.output[0]
    datatype = model_config_pb2.DataType.Name(output.data_type).removeprefix("TYPE_")
    if datatype not in ("FP16", "FP32", "FP64"):
        return f"its output {output.name!r} is {datatype}, not floating-point class scores"
    if _class_count(output) is None:
        return f"its output {output.name!r} (dims {list(output.dims)}) is not a vector of scores"
    return None


def _class_count(output: Any) -> int | None:
    """Classes of a score vector: dims all 1 but one (image_client's rule), fixed."""
    dims = list(output.dims)
    if not dims or any(d < 1 for d in dims) or sum(1 for d in dims if d > 1) > 1:
        return None
    return math.prod(dims)


def _as_flags(message: str) -> str:
    text = message.removeprefix("config.pbtxt parameters: ")
    for key, flag in _FLAGS.items():
        text = text.replace(key, flag)
    return text


def _attach_labels(config: ModelConfig, labels: list[str]) -> None:
    """labels.txt names the first output's classes (Triton's label_filename)."""
    if not labels:
        return
    output = config.output[0]
    dims = list(output.dims)
    numeric = output.data_type not in (model_config_pb2.TYPE_STRING, model_config_pb2.TYPE_BOOL)
    classes = math.prod(dims) if dims and all(d > 0 for d in dims) and numeric else None
    if classes != len(labels):
        has = f"has {classes} values" if classes is not None else f"has dims {dims}"
        raise TrainingError(
            f"--labels lists {len(labels)} classes, but output {output.name!r} {has}: give "
            "one class name per output value"
        )
    output.label_filename = layout.LABELS_FILE


# --- the reference run --------------------------------------------------------------------------


def _reference_inputs(config: ModelConfig, prep: ImagePrep | None) -> list[np.ndarray]:
    """REFERENCE_ROWS seeded rows per input, in its own datatype and layout: prepared random
    images for a classifier (what the native API feeds it), else random values of its type.
    The first axis is the batch dim of a batching model; without batching each row is one
    whole input tensor (the server's load-time check feeds them one at a time)."""
    rng = np.random.default_rng(REFERENCE_SEED)
    if prep is not None:
        shape = (prep.height, prep.width, prep.channels)
        images = [
            prep.prepare(rng.integers(0, 256, shape, np.uint8)) for _ in range(REFERENCE_ROWS)
        ]
        if prep.explicit_batch:  # dims [1 or -1, ...]: one image per run
            images = [image[np.newaxis] for image in images]
        return [np.stack(images)]
    inputs = []
    for model_input in config.input:
        dims = tuple(d if d > 0 else PROBE_DIM for d in model_input.dims)
        datatype = model_config_pb2.DataType.Name(model_input.data_type).removeprefix("TYPE_")
        inputs.append(random_values(rng, datatype, (REFERENCE_ROWS, *dims)))
    return inputs


def _run_reference(
    config: ModelConfig, model: ModelFile, inputs: list[np.ndarray]
) -> list[np.ndarray]:
    """The model's outputs on the reference rows, with the config's shapes; a batching model
    must also answer a row alone as it did within the batch."""
    batching = config.max_batch_size > 0
    try:
        if batching:
            outputs = model.run(inputs)
            alone = model.run([x[:1] for x in inputs])
        else:  # one row at a time, in the model's own shapes where a reshape says them
            pairs = list(zip(inputs, config.input, strict=True))
            runs = [
                model.run([_model_shaped(x[row], t) for x, t in pairs])
                for row in range(REFERENCE_ROWS)
            ]
            outputs = [
                np.stack([np.reshape(run[i], _config_shape(run[i], t)) for run in runs])
                for i, t in enumerate(config.output)
            ]
    except TrainingError:
        raise
    except Exception as exc:
        shapes = ", ".join(str(list(x.shape[0 if batching else 1 :])) for x in inputs)
        variable = any(d < 1 for i in config.input for d in i.dims)
        hint = f" (variable dims were {PROBE_DIM}: --input-shape fixes them)" if variable else ""
        raise TrainingError(
            f"the model fails on inputs shaped {shapes}: {first_line(exc)}{hint}"
        ) from None
    for output, array in zip(config.output, outputs, strict=True):
        expected = [REFERENCE_ROWS, *output.dims]
        if len(expected) != array.ndim or any(
            e >= 0 and e != got for e, got in zip(expected, array.shape, strict=False)
        ):
            raise TrainingError(
                f"output {output.name!r} has shape {list(array.shape[0 if batching else 1 :])} "
                f"on the reference inputs, but config dims {list(output.dims)} (-1: variable)"
            )
    if batching:
        tolerance = _tolerance(model, outputs)
        for output, batched, single in zip(config.output, outputs, alone, strict=True):
            diff = _max_diff(batched[:1], single)
            if not diff <= tolerance:
                raise TrainingError(
                    f"output {output.name!r} of a row alone differs from the same row in a "
                    f"batch of {REFERENCE_ROWS} by {diff:.3g}: rows are not independent, so "
                    "the model cannot be batched; import it with --max-batch-size 0"
                )
    return outputs


def _model_shaped(array: np.ndarray, tensor: Any) -> np.ndarray:
    return array.reshape(tuple(tensor.reshape.shape)) if tensor.HasField("reshape") else array


def _config_shape(array: np.ndarray, tensor: Any) -> tuple[int, ...]:
    """An output as config.pbtxt's dims say it (they differ from the model's by a reshape)."""
    return tuple(tensor.dims) if tensor.HasField("reshape") else array.shape


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if a.shape != b.shape:
        return math.inf
    if a.dtype == object or b.dtype == object:
        return 0.0 if np.array_equal(a, b) else math.inf
    return float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))


def _tolerance(model: ModelFile, outputs: list[np.ndarray]) -> float:
    """The load-time check's tolerance: relative to the outputs' magnitude (logits are not
    bounded), looser where FP16 computes."""
    half = any(t.datatype == "FP16" for t in model.inputs + model.outputs)
    numeric = [o for o in outputs if o.dtype != object and o.size]
    scale = max([1.0] + [float(np.max(np.abs(o.astype(np.float64)))) for o in numeric])
    return (HALF_TOLERANCE if half else TOLERANCE) * scale


def _output_kind(
    prep: ImagePrep, scores: np.ndarray, opts: ImportOptions, log: Callable[[str], None]
) -> ImagePrep:
    """Probabilities or logits: --output-kind, checked against what the model answered, else
    what the answers show (each image's scores in [0, 1] summing to 1: probabilities)."""
    rows = scores.astype(np.float64).reshape(len(scores), -1)  # one image's scores per row
    sums = rows.sum(axis=1)
    bounded = bool(np.all(rows >= -1e-6) and np.all(rows <= 1 + 1e-6))
    summing = bool(np.all(np.abs(sums - 1) <= SUM_TOLERANCE))
    seen = imageprep.PROBABILITIES if bounded and summing else imageprep.LOGITS
    asked = opts.output_kind.lower() if opts.output_kind is not None else None
    if asked == imageprep.PROBABILITIES and seen == imageprep.LOGITS:
        raise TrainingError(
            f"--output-kind probabilities, but the model's scores per image sum to "
            f"{_range(sums)} (not 1) on the reference inputs: they are logits; use "
            "--output-kind logits, and the native API applies softmax"
        )
    if asked == imageprep.LOGITS and seen == imageprep.PROBABILITIES:
        log("note: the scores already sum to 1 per image, yet softmax will be applied to them")
    if asked is None:
        how = "softmax applied by the native API" if seen == imageprep.LOGITS else "summing to 1"
        log(f"output: {seen}, seen in the model's scores ({how}; --output-kind overrides)")
    return replace(prep, output=asked or seen)


def _range(values: np.ndarray) -> str:
    low, high = float(values.min()), float(values.max())
    return f"{low:.3g}" if math.isclose(low, high, rel_tol=1e-3) else f"{low:.3g}..{high:.3g}"


def _save_reference(
    path: Path,
    config: ModelConfig,
    inputs: list[np.ndarray],
    outputs: list[np.ndarray],
    tolerance: float,
) -> None:
    """reference.npz: "inputs" and "outputs" are the first input and output, N rows of what the
    model takes and gives (its layout and datatype; the rows are the batch dim of a batching
    model, else each row is one whole tensor). Further ones follow as "inputs_1",
    "outputs_1"..., in config order, named in "input_names" and "output_names". Strings are
    stored as bytes, so the file loads without pickle."""
    arrays: dict[str, np.ndarray] = {}
    for key, tensors in (("inputs", inputs), ("outputs", outputs)):
        for i, tensor in enumerate(tensors):
            arrays[key if i == 0 else f"{key}_{i}"] = _storable(tensor)
    arrays["input_names"] = np.array([i.name for i in config.input])
    arrays["output_names"] = np.array([o.name for o in config.output])
    arrays[REFERENCE_TOLERANCE_KEY] = np.array(tolerance, dtype=np.float64)
    np.savez(path, **arrays)  # type: ignore[arg-type]


def _storable(array: np.ndarray) -> np.ndarray:
    if array.dtype != object:
        return array
    items = [x.encode() if isinstance(x, str) else bytes(x) for x in array.ravel()]
    return np.array(items, dtype=np.bytes_).reshape(array.shape)


# --- adding to an existing model, writing ------------------------------------------------------


def _check_same_model(existing: ModelConfig, config: ModelConfig, name: str) -> None:
    """A model's versions share one config.pbtxt (kept as it is: an operator may have tuned
    it), so the new version must have the interface it describes."""

    def interface(c: ModelConfig) -> list[tuple[str, object]]:
        image = {k: c.parameters[k].string_value for k in imageprep.PARAMETERS if k in c.parameters}
        return [
            ("platform", c.platform),
            ("max_batch_size", c.max_batch_size),
            ("inputs", [(i.name, i.data_type, i.format, *_dims(i)) for i in c.input]),
            ("outputs", [(o.name, o.data_type, *_dims(o), o.label_filename) for o in c.output]),
            ("image-preparation keys", image),
        ]

    for (what, old), (_, new) in zip(interface(existing), interface(config), strict=True):
        if old != new:
            raise TrainingError(
                f"{name}'s config.pbtxt has other {what} than this file gives ({_short(old)} "
                f"there, {_short(new)} here): import it under another --name"
            )


def _dims(tensor: Any) -> tuple[list[int], list[int]]:
    return list(tensor.dims), list(tensor.reshape.shape)


def _check_same_labels(model_dir: Path, labels: list[str], name: str) -> None:
    path = model_dir / layout.LABELS_FILE
    if labels and path.exists() and layout.read_labels(path) != labels:
        raise TrainingError(f"--labels lists other class names than {name}'s {path.name}")


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _summary(
    target: Path, config: ModelConfig, prep: ImagePrep | None, labels: int, tolerance: float
) -> str:
    def tensor(t: Any) -> str:
        datatype = model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_")
        return f"{t.name!r} {datatype} {list(t.dims)}"

    lines = [
        f"imported into {target} ({config.platform}, max_batch_size {config.max_batch_size})",
        f"  inputs:  {', '.join(tensor(t) for t in config.input)}",
        f"  outputs: {', '.join(tensor(t) for t in config.output)}"
        + (f", {labels} labels" if labels else ""),
        f"  images:  {prep.describe()}" if prep is not None else "  images:  (generic model)",
        f"  {layout.REFERENCE_FILE}: the model's own outputs, checked at load within "
        f"{tolerance:.3g}",
    ]
    return "\n".join(lines)


def parse_dims(text: str) -> tuple[int, ...]:
    """`3,224,224` (or `3x224x224`) -> (3, 224, 224), for --input-shape."""
    parts = text.replace("x", ",").split(",")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected dims such as 3,224,224, got {text!r}") from None
    return dims


def main(args: argparse.Namespace) -> int:
    """`python -m training import`: the parsed command line -> import_model()."""
    options = ImportOptions(
        labels=args.labels,
        version=args.version,
        max_batch_size=args.max_batch_size,
        input_shape=args.input_shape,
        input_datatype=args.input_datatype,
        format=args.format,
        scaling=args.scaling,
        mean=args.mean,
        std=args.std,
        channel_order=args.channel_order,
        output_kind=args.output_kind,
    )
    import_model(args.model, args.model_repository, args.name, options, log=_flushed)
    return 0


def _flushed(line: str) -> None:
    print(line, flush=True)


def add_parser(
    commands: Any, positive: Callable[[str], int], non_negative: Callable[[str], int]
) -> None:
    """The `import` subcommand's options (called by training.cli)."""
    parser = commands.add_parser(
        "import",
        help="import an ONNX or TorchScript model trained elsewhere into a model repository",
        description="Write MODEL_REPOSITORY/NAME as Triton would serve MODEL: config.pbtxt "
        "completed from the file (an ONNX graph's names, datatypes and dims, batching when its "
        "first dim is variable; TorchScript as INPUT__0/OUTPUT__<i>, shapes found by running "
        "an input of --input-shape), labels.txt from --labels, the image-preparation keys for a "
        "model with one image input and one vector of class scores (so the native API "
        "classifies encoded images with it), the model file as version 1 (or --version), and "
        "reference.npz: the model's own outputs on seeded inputs, which the server checks at "
        "load. Refused, with the reason, and nothing written: a file that cannot be read or "
        "run, types the server cannot serve, an existing model folder without --version.",
    )
    parser.add_argument(
        "model", type=Path, help="an .onnx file, or a TorchScript file (.pt, .pth, .torchscript)"
    )
    parser.add_argument(
        "--model-repository", type=Path, required=True, metavar="DIR", help="the repository folder"
    )
    parser.add_argument("--name", required=True, help="the model's folder (and served name)")
    parser.add_argument(
        "--labels",
        type=Path,
        metavar="FILE",
        help="class names, one per line, as many as the (first) output has values",
    )
    parser.add_argument(
        "--version",
        type=positive,
        metavar="N",
        help="the version number to write (default 1); needed to add a version to an existing "
        "model, whose config.pbtxt must describe the same inputs and outputs",
    )
    parser.add_argument(
        "--max-batch-size",
        type=non_negative,
        metavar="N",
        help=f"largest batch the server forms; 0: no batching, dims are the whole tensor "
        f"(default: {DEFAULT_MAX_BATCH_SIZE} when every input's and output's first dim is "
        "variable, else 0; TorchScript: 8)",
    )
    parser.add_argument(
        "--input-shape",
        type=parse_dims,
        metavar="DIMS",
        help="the input's dims without the batch dim, e.g. 3,224,224 (1,28,28 for a gray image, "
        "224,224,3 for NHWC). Required for TorchScript, which records none; for ONNX it fixes "
        "variable dims of a one-input model",
    )
    parser.add_argument(
        "--input-datatype",
        type=str.upper,
        choices=TORCHSCRIPT_DATATYPES,
        metavar="TYPE",
        help="TorchScript: the input's datatype (default FP32)",
    )
    images = parser.add_argument_group(
        "image preparation",
        "How the native API turns an encoded image into the model's input, written as "
        "config.pbtxt `parameters` (Triton ignores them). Default: RGB, pixels/255 (UNIT) for "
        "floating-point inputs, pixels as they are (NONE) for integer ones, layout from the "
        "dims, output kind from the model's answers. torchvision models: --mean "
        "0.485,0.456,0.406 --std 0.229,0.224,0.225.",
    )
    images.add_argument(
        "--format",
        type=str.upper,
        choices=imageprep.LAYOUTS,
        help="the input's layout (default: NCHW when the first image dim is 1 or 3, else NHWC "
        "when the last is)",
    )
    images.add_argument(
        "--scaling",
        type=str.upper,
        choices=imageprep.SCALINGS,
        help="UNIT pixels/255; NONE 0..255; INCEPTION pixels/127.5 - 1; VGG pixels - "
        "(123, 117, 104) per R, G, B (Triton image_client's --scaling)",
    )
    images.add_argument(
        "--mean",
        metavar="M[,M,M]",
        help="subtracted after scaling: one value, or one per channel in the model's order",
    )
    images.add_argument(
        "--std",
        metavar="S[,S,S]",
        help="divides after the mean: one value, or one per channel in the model's order",
    )
    images.add_argument(
        "--channel-order",
        type=str.upper,
        choices=imageprep.CHANNEL_ORDERS,
        help="the order of the model's channels (default RGB)",
    )
    images.add_argument(
        "--output-kind",
        type=str.lower,
        choices=imageprep.OUTPUTS,
        help="whether the output is probabilities or logits (the native API then applies "
        "softmax); default: seen in the model's outputs, and probabilities are refused for "
        "scores that do not sum to 1",
    )
