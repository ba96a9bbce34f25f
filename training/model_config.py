"""The config.pbtxt that export writes: Triton's field names, and an existing model's
settings respected (its shape, classes and platform must match; tuned serving options stay)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from modelrepo import layout
from modelrepo.config import ConfigError, ModelConfig, load_config
from modelrepo.imageprep import NCHW, PROBABILITIES, UNIT, ImagePrep
from modelrepo.imageprep import PARAMETERS as IMAGE_PARAMETERS
from modelrepo.precision import (
    ACCURACY_PARAMETER,
    FP32,
    FP32_ACCURACY_PARAMETER,
    PRECISION_PARAMETER,
    QUANTIZATION_PARAMETER,
    PrecisionError,
    precision_of,
)
from training.errors import TrainingError
from wire import model_config_pb2

# Serving options of a new model's config.pbtxt; a later export keeps what the config says.
DEFAULT_MAX_BATCH_SIZE = 64
DEFAULT_INSTANCE_COUNT = 1
# Triton's default: a batch starts as soon as an instance is free, with whatever has queued
# meanwhile; under load batches grow while the instance is busy, and a lone request never
# waits for companions that are not coming.
DEFAULT_QUEUE_DELAY_US = 0


def build_config(
    name: str,
    platform: str,
    shape: tuple[int, ...],
    num_classes: int,
    max_batch_size: int | None,
    instance_count: int | None,
    max_queue_delay_us: int | None,
    training_dataset: str = "",
    base: ModelConfig | None = None,
    precision: str = FP32,
    parameters: Mapping[str, str] | None = None,
) -> ModelConfig:
    """The config.pbtxt message: Triton's names, so Triton loads the same folder unchanged.

    The training dataset goes into `parameters` (Triton passes unknown ones through), so a
    model trained on synthetic images says so wherever it is served. With `base` (the model's
    current config) the fields export does not own, e.g. version_policy, are kept; a serving
    option left None keeps the base's value (instance groups included), else its default.
    The precision and `parameters` (what the accuracy gate measured, how int8 was quantized)
    go into `parameters` too, replacing what an earlier export recorded there, and so do the
    image-preparation keys (modelrepo.imageprep) that any classifier's config carries.
    """
    config = ModelConfig()
    if base is not None:
        config.CopyFrom(base)
        config.ClearField("input")
        config.ClearField("output")
    if instance_count is None and not config.instance_group:
        instance_count = DEFAULT_INSTANCE_COUNT
    if instance_count is not None:
        config.ClearField("instance_group")
        config.instance_group.add(
            count=instance_count, kind=model_config_pb2.ModelInstanceGroup.KIND_AUTO
        )
    config.name, config.platform = name, platform
    config.max_batch_size = max_batch_size or config.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    config.input.add(
        name=layout.INPUT_NAME,
        data_type=model_config_pb2.TYPE_FP32,
        format=model_config_pb2.ModelInput.FORMAT_NCHW,
        dims=list(shape),
    )
    config.output.add(
        name=layout.OUTPUT_NAME,
        data_type=model_config_pb2.TYPE_FP32,
        dims=[num_classes],
        label_filename=layout.LABELS_FILE,
    )
    batching = config.dynamic_batching
    batching.SetInParent()  # `dynamic_batching { }`: Triton batches only when it is present
    if max_queue_delay_us is not None:
        batching.max_queue_delay_microseconds = max_queue_delay_us
    elif not batching.max_queue_delay_microseconds:
        batching.max_queue_delay_microseconds = DEFAULT_QUEUE_DELAY_US
    if training_dataset:
        config.parameters[layout.TRAINING_DATASET_PARAMETER].string_value = training_dataset
    for key in (ACCURACY_PARAMETER, FP32_ACCURACY_PARAMETER, QUANTIZATION_PARAMETER):
        if key in config.parameters:
            del config.parameters[key]
    config.parameters[PRECISION_PARAMETER].string_value = precision
    # How the server prepares images for it, in the keys every classifier's config uses: the
    # normalisation and softmax are inside the graph, so pixels in [0, 1] in, probabilities out.
    channels, height, width = shape
    prep = ImagePrep(NCHW, channels, height, width, scaling=UNIT, output=PROBABILITIES)
    for key in IMAGE_PARAMETERS:  # no mean or std an earlier config may carry: none applies
        if key in config.parameters:
            del config.parameters[key]
    for key, value in prep.to_parameters().items():
        config.parameters[key].string_value = value
    for key, value in (parameters or {}).items():
        config.parameters[key].string_value = value
    return config


def platform_for(
    model_dir: Path, name: str, fmt: str, shape: tuple[int, ...], labels: list[str]
) -> str:
    """The config's platform; an existing model must keep its shape, classes and platform."""
    wanted = layout.PLATFORM_TORCHSCRIPT if fmt == "torchscript" else layout.PLATFORM_ONNX
    config_path = model_dir / layout.CONFIG_FILE
    if not config_path.exists():
        return wanted
    try:
        existing = load_config(config_path)
    except ConfigError as exc:
        raise TrainingError(f"cannot add a version to {name}: {exc}") from None
    old_in = list(existing.input[0].dims) if existing.input else []
    old_out = list(existing.output[0].dims) if existing.output else []
    if old_in != list(shape) or old_out != [len(labels)]:
        raise TrainingError(
            f"{config_path} declares input {old_in} and {old_out} classes, but this checkpoint "
            f"takes {list(shape)} and has [{len(labels)}]: export under another --name"
        )
    labels_path = model_dir / layout.LABELS_FILE
    if labels_path.exists() and layout.read_labels(labels_path) != labels:
        raise TrainingError(
            f"{labels_path} lists other class names than this checkpoint: export under another "
            "--name"
        )
    produced = {
        "onnx": {layout.PLATFORM_ONNX},
        "torchscript": {layout.PLATFORM_TORCHSCRIPT},
        "both": {layout.PLATFORM_ONNX, layout.PLATFORM_TORCHSCRIPT},
    }[fmt]
    if existing.platform not in produced:
        raise TrainingError(
            f"{name} is served as {existing.platform!r}, which --format {fmt} does not produce: "
            "use a --format that includes it, or another --name"
        )
    return existing.platform


def check_precision_kept(model_dir: Path, name: str, precision: str) -> None:
    """An existing model keeps its precision: its versions share one config.pbtxt, which says
    what they are (a config that records none is fp32, as every earlier export was)."""
    config_path = model_dir / layout.CONFIG_FILE
    if not config_path.exists():
        return
    try:
        current = precision_of(load_config(config_path))
    except (ConfigError, PrecisionError) as exc:
        raise TrainingError(f"cannot add a version to {name}: {exc}") from None
    if current != precision:
        stem = name.removesuffix(f"_{current}")
        raise TrainingError(
            f"{name} holds {current} versions, and a model's versions share one config.pbtxt: "
            f"export --precision {precision} under another --name (e.g. {stem}_{precision})"
        )
