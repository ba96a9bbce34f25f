"""How an image classifier's images are prepared: read from config.pbtxt, applied to pixels.

Triton's model configuration says an input's layout (`format`) and dims, but not how pixels
become numbers or whether the output is logits. Those live in `parameters` keys of our own
(Triton passes unknown parameters through, so the folder still loads in Triton). Training
writes them, the import command writes them for models trained elsewhere, and the server reads
them to turn an encoded image into the model's input and its output into probabilities.
numpy and PIL only: the server imports this without torch.

The steps, in order (pixels start as uint8 RGB, H x W x C):
1. convert to RGB, or to grayscale (PIL's "L") for a 1-channel input, and resize to the
   input's H x W (PIL bilinear), as the server's image decoding and Triton's image_client do;
2. `image_channel_order`: BGR reverses the channels;
3. `image_scaling`, computed in the input's datatype as image_client.py computes it:
   UNIT x / 255; NONE x; INCEPTION (x / 127.5) - 1; VGG x - (123, 117, 104) per R, G, B
   channel (x - 128 for grayscale): NONE, INCEPTION and VGG are image_client.py's formulas;
4. `image_mean` / `image_std`: (x - mean) / std, per channel in the model's channel order;
5. into the input's layout and datatype.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from PIL import Image

from wire import model_config_pb2

SCALING_PARAMETER = "image_scaling"
MEAN_PARAMETER = "image_mean"
STD_PARAMETER = "image_std"
CHANNEL_ORDER_PARAMETER = "image_channel_order"
OUTPUT_PARAMETER = "image_output"
PARAMETERS = (
    SCALING_PARAMETER,
    MEAN_PARAMETER,
    STD_PARAMETER,
    CHANNEL_ORDER_PARAMETER,
    OUTPUT_PARAMETER,
)

UNIT, NONE, INCEPTION, VGG = "UNIT", "NONE", "INCEPTION", "VGG"
SCALINGS = (UNIT, NONE, INCEPTION, VGG)
RGB, BGR = "RGB", "BGR"
CHANNEL_ORDERS = (RGB, BGR)
PROBABILITIES, LOGITS = "probabilities", "logits"
OUTPUTS = (PROBABILITIES, LOGITS)
NCHW, NHWC = "NCHW", "NHWC"
LAYOUTS = (NCHW, NHWC)
FORMATS = {
    NCHW: model_config_pb2.ModelInput.FORMAT_NCHW,
    NHWC: model_config_pb2.ModelInput.FORMAT_NHWC,
}

# Triton image_client.py's constants: INCEPTION maps 0..255 onto -1..1; VGG subtracts these
# (whole numbers, per R, G, B channel; 128 for one channel).
INCEPTION_HALF_RANGE = 127.5
VGG_MEAN_RGB = (123.0, 117.0, 104.0)
VGG_MEAN_GRAY = (128.0,)

# Input datatypes an image can be prepared into. Integer inputs take pixels as they are (NONE)
# or, when signed and wider than 8 bits, with VGG's whole-number offsets; INT8 cannot hold 255.
FLOAT_DTYPES = {"FP16": np.float16, "FP32": np.float32, "FP64": np.float64}
UNSIGNED_DTYPES = {"UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64}
SIGNED_DTYPES = {"INT16": np.int16, "INT32": np.int32, "INT64": np.int64}
DTYPES: Mapping[str, type[np.generic]] = FLOAT_DTYPES | UNSIGNED_DTYPES | SIGNED_DTYPES
_CHANNEL_MODES = {1: "L", 3: "RGB"}


class ImagePrepError(ValueError):
    """A config whose images cannot be prepared; the message names the key or field and what
    it allows."""


@dataclass(frozen=True)
class ImagePrep:
    """One image input's preparation. `prepare` gives one image without the batch dim."""

    layout: str  # NCHW or NHWC (the input's format)
    channels: int  # 1 or 3
    height: int
    width: int
    datatype: str = "FP32"  # the input's, in the KServe v2 spelling
    scaling: str = ""  # "": the datatype's default, UNIT for floating point, else NONE
    mean: tuple[float, ...] = ()  # empty, or one value per channel (model channel order)
    std: tuple[float, ...] = ()
    channel_order: str = RGB
    output: str = PROBABILITIES
    # dims carry a leading batch dim of their own (max_batch_size 0, dims [1 or -1, ...]).
    explicit_batch: bool = False

    def __post_init__(self) -> None:
        if not self.scaling:
            object.__setattr__(self, "scaling", UNIT if self.datatype in FLOAT_DTYPES else NONE)
        _check(self.layout in LAYOUTS, f"layout {self.layout!r}", LAYOUTS)
        if self.channels not in _CHANNEL_MODES:
            raise ImagePrepError(f"images have 1 or 3 channels, not {self.channels}")
        if self.height < 1 or self.width < 1:
            raise ImagePrepError(
                f"image size {self.height}x{self.width}: height and width must be fixed (> 0)"
            )
        _check(self.datatype in DTYPES, f"datatype {self.datatype!r}", tuple(DTYPES))
        _check(self.scaling in SCALINGS, f"{SCALING_PARAMETER} {self.scaling!r}", SCALINGS)
        _check(
            self.channel_order in CHANNEL_ORDERS,
            f"{CHANNEL_ORDER_PARAMETER} {self.channel_order!r}",
            CHANNEL_ORDERS,
        )
        _check(self.output in OUTPUTS, f"{OUTPUT_PARAMETER} {self.output!r}", OUTPUTS)
        if self.channel_order == BGR and self.channels != 3:
            raise ImagePrepError(f"{CHANNEL_ORDER_PARAMETER} BGR needs 3 channels, not 1")
        for key, values in ((MEAN_PARAMETER, self.mean), (STD_PARAMETER, self.std)):
            if values and len(values) != self.channels:
                raise ImagePrepError(
                    f"{key}: {len(values)} values for {self.channels} channel(s) (give one, or "
                    "one per channel)"
                )
        if any(not math.isfinite(v) for v in self.mean + self.std):
            raise ImagePrepError(f"{MEAN_PARAMETER}/{STD_PARAMETER} must be finite numbers")
        if any(v <= 0 for v in self.std):
            raise ImagePrepError(f"{STD_PARAMETER} must be positive, got {list(self.std)}")
        if self.datatype not in FLOAT_DTYPES:
            allowed = (NONE, VGG) if self.datatype in SIGNED_DTYPES else (NONE,)
            if self.scaling not in allowed:
                raise ImagePrepError(
                    f"{SCALING_PARAMETER} {self.scaling} gives values a {self.datatype} input "
                    f"cannot hold (allowed for {self.datatype}: {', '.join(allowed)})"
                )
            if self.mean or self.std:
                raise ImagePrepError(
                    f"{MEAN_PARAMETER}/{STD_PARAMETER} need a floating-point input, "
                    f"not {self.datatype}"
                )

    @classmethod
    def from_config(cls, config: model_config_pb2.ModelConfig, input_index: int = 0) -> ImagePrep:
        """The preparation of `config`'s input `input_index` (layout, size, datatype) and its
        `image_*` parameters. Absent keys: RGB, probabilities, and UNIT scaling for
        floating-point inputs (what this server's exports have always taken) or NONE for
        integer ones. Raises ImagePrepError naming what cannot be prepared."""
        if not 0 <= input_index < len(config.input):
            raise ImagePrepError(
                f"config.pbtxt has {len(config.input)} input(s): no input {input_index}"
            )
        model_input = config.input[input_index]
        what = f"input {model_input.name!r}"
        dims = [int(d) for d in model_input.dims]
        explicit_batch = config.max_batch_size == 0 and len(dims) == 4 and dims[0] in (1, -1)
        if explicit_batch:
            dims = dims[1:]
        if len(dims) != 3:
            raise ImagePrepError(
                f"{what} has dims {dims}: an image input has 3 (C,H,W or H,W,C, after the batch "
                "dim)"
            )
        layout = _layout(model_input.format, dims, what)
        channels, height, width = (dims[0], dims[1], dims[2]) if layout == NCHW else (
            dims[2], dims[0], dims[1],
        )  # fmt: skip
        if channels not in _CHANNEL_MODES:
            raise ImagePrepError(
                f"{what} ({layout}, dims {dims}) has {channels} channels: images have 1 or 3"
            )
        if height < 1 or width < 1:
            raise ImagePrepError(
                f"{what} has a variable height or width (dims {dims}): image preparation needs "
                "a fixed size to resize to"
            )
        datatype = model_config_pb2.DataType.Name(model_input.data_type).removeprefix("TYPE_")
        if datatype not in DTYPES:
            raise ImagePrepError(
                f"{what} is {datatype}: images can be prepared into {', '.join(DTYPES)}"
            )
        params = {key: config.parameters[key].string_value for key in config.parameters}
        try:
            return cls(
                layout=layout,
                channels=channels,
                height=height,
                width=width,
                datatype=datatype,
                scaling=_word(params, SCALING_PARAMETER, "").upper(),
                mean=_floats(params, MEAN_PARAMETER, channels),
                std=_floats(params, STD_PARAMETER, channels),
                channel_order=_word(params, CHANNEL_ORDER_PARAMETER, RGB).upper(),
                output=_word(params, OUTPUT_PARAMETER, PROBABILITIES).lower(),
                explicit_batch=explicit_batch,
            )
        except ImagePrepError as exc:
            raise ImagePrepError(f"config.pbtxt parameters: {exc}") from None

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(DTYPES[self.datatype])

    @property
    def shape(self) -> tuple[int, int, int]:
        """One prepared image's shape (no batch dim)."""
        if self.layout == NCHW:
            return (self.channels, self.height, self.width)
        return (self.height, self.width, self.channels)

    def to_parameters(self) -> dict[str, str]:
        """The `parameters` keys that say this preparation (layout, size and datatype are the
        input's own fields). Mean and std only when set."""
        params = {
            SCALING_PARAMETER: self.scaling,
            CHANNEL_ORDER_PARAMETER: self.channel_order,
            OUTPUT_PARAMETER: self.output,
        }
        if self.mean:
            params[MEAN_PARAMETER] = ",".join(repr(float(v)) for v in self.mean)
        if self.std:
            params[STD_PARAMETER] = ",".join(repr(float(v)) for v in self.std)
        return params

    def describe(self) -> str:
        """One line for people: what the model takes and how pixels get there."""
        c, h, w = self.channels, self.height, self.width
        text = f"{self.layout} {c}x{h}x{w} {self.datatype}, {self.channel_order}, {self.scaling}"
        if self.mean:
            text += f", mean {list(self.mean)}"
        if self.std:
            text += f", std {list(self.std)}"
        return f"{text}, output {self.output}"

    def prepare_image(self, image: Image.Image) -> np.ndarray:
        """A decoded PIL image of any mode and size -> one model input."""
        converted = image.convert(_CHANNEL_MODES[self.channels])
        if converted.size != (self.width, self.height):
            converted = converted.resize((self.width, self.height), Image.Resampling.BILINEAR)
        pixels = np.asarray(converted, dtype=np.uint8).reshape(
            self.height, self.width, self.channels
        )
        return self._prepared(pixels)

    def prepare(self, pixels: np.ndarray) -> np.ndarray:
        """uint8 pixels, H x W x C (C 1, 3 or 4: gray, RGB, RGBA) or H x W -> one model input,
        in the model's layout and datatype, without the batch dim."""
        if pixels.dtype != np.uint8:
            raise ImagePrepError(f"pixels must be uint8, not {pixels.dtype}")
        if pixels.ndim == 2:
            pixels = pixels[:, :, np.newaxis]
        if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4) or 0 in pixels.shape:
            raise ImagePrepError(
                f"pixels must be H x W x C with C 1, 3 or 4, not shape {list(pixels.shape)}"
            )
        if pixels.shape == (self.height, self.width, self.channels):
            return self._prepared(pixels)
        image = Image.fromarray(pixels[:, :, 0] if pixels.shape[2] == 1 else pixels)
        return self.prepare_image(image)

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """The model's output as probabilities over the last axis: as they are, or the
        softmax of logits."""
        if self.output == PROBABILITIES:
            return scores
        x = np.asarray(scores, dtype=np.float64 if scores.dtype == np.float64 else np.float32)
        shifted = np.exp(x - x.max(axis=-1, keepdims=True))
        return shifted / shifted.sum(axis=-1, keepdims=True)

    def _prepared(self, pixels: np.ndarray) -> np.ndarray:
        """Pixels already converted and resized (H x W x C uint8) -> the model's input."""
        if self.channel_order == BGR:
            pixels = pixels[:, :, ::-1]
        if self.layout == NCHW:
            pixels = pixels.transpose(2, 0, 1)
        pixels = np.ascontiguousarray(pixels)  # the uint8 copy is the cheap one
        dtype = self.dtype
        compute: type[np.generic] = dtype.type  # as image_client: bit-identical inputs
        if self.scaling == UNIT:
            x = np.divide(pixels, compute(255.0), dtype=compute)
        elif self.scaling == INCEPTION:
            x = np.divide(pixels, compute(INCEPTION_HALF_RANGE), dtype=compute)
            x -= compute(1.0)
        elif self.scaling == VGG:
            offsets = VGG_MEAN_RGB if self.channels == 3 else VGG_MEAN_GRAY
            if self.channel_order == BGR:
                offsets = offsets[::-1]
            x = pixels.astype(compute) - self._per_channel(offsets, compute)
        else:
            x = pixels.astype(compute, copy=False)
        if self.mean:  # floating-point inputs only, so x is a fresh float array here
            x -= self._per_channel(self.mean, compute)
        if self.std:
            x /= self._per_channel(self.std, compute)
        return x

    def _per_channel(self, values: tuple[float, ...], dtype: type[np.generic]) -> np.ndarray:
        """Per-channel constants shaped to broadcast over one image in the model's layout."""
        array = np.asarray(values, dtype=dtype)
        return array.reshape(-1, 1, 1) if self.layout == NCHW else array


def declares_image_prep(config: model_config_pb2.ModelConfig) -> bool:
    """Whether config.pbtxt sets any `image_*` key (a model whose author said how its images
    are prepared, as opposed to one that only looks like an image model)."""
    return any(key in config.parameters for key in PARAMETERS)


def infer_layout(dims: list[int]) -> str | None:
    """FORMAT_NONE: NCHW when the first of the three image dims is 1 or 3, else NHWC when the
    last is, else None."""
    if len(dims) != 3:
        return None
    if dims[0] in (1, 3):
        return NCHW
    if dims[-1] in (1, 3):
        return NHWC
    return None


def _layout(fmt: int, dims: list[int], what: str) -> str:
    if fmt == model_config_pb2.ModelInput.FORMAT_NCHW:
        return NCHW
    if fmt == model_config_pb2.ModelInput.FORMAT_NHWC:
        return NHWC
    inferred = infer_layout(dims)
    if inferred is None:
        raise ImagePrepError(
            f"{what} has format FORMAT_NONE and dims {dims}, which have no channel dim of 1 or "
            "3 first or last: set format FORMAT_NCHW or FORMAT_NHWC"
        )
    return inferred


def _check(ok: bool, what: str, allowed: tuple[str, ...]) -> None:
    if not ok:
        raise ImagePrepError(f"unknown {what} (allowed: {', '.join(allowed)})")


def _word(params: Mapping[str, str], key: str, default: str) -> str:
    value = params.get(key, "").strip()
    return value or default


def _floats(params: Mapping[str, str], key: str, channels: int) -> tuple[float, ...]:
    """`"0.485, 0.456,0.406"` -> floats; one value stands for every channel."""
    text = params.get(key, "").strip()
    if not text:
        return ()
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ImagePrepError(
            f"{key} {text!r}: expected comma-separated numbers, one or one per channel"
        ) from None
    return values * channels if len(values) == 1 else values
