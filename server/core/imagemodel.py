"""Whether a model is an image classifier the native API can feed, and how.

A classifier is a model with one required input holding one image per batch row (three
dims: channels 1 or 3, height, width, laid out as its `format` says) and an output of class
scores. How its pixels are prepared (scaling, mean/std, channel order) and whether its scores
are logits or probabilities come from documented config `parameters` keys (modelrepo.imageprep),
which Triton ignores. The native API decodes images to float32 N x C x H x W in [0, 1];
`to_model` turns those into the model's input and `probabilities` turns its output back into
probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from modelrepo.config import ModelConfig
from modelrepo.datatypes import Datatype
from modelrepo.layout import INPUT_NAME, OUTPUT_NAME
from server.core.signature import Signature, TensorSpec

_NUMERIC_KINDS = "fiu"


SCALINGS = ("UNIT", "NONE", "INCEPTION", "VGG")
VGG_MEAN = np.array([123.0, 117.0, 104.0], np.float32)  # RGB, as Triton's image_client


def _floats(text: str, key: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"{key} must be comma-separated numbers, got {text!r}") from None


@dataclass(frozen=True)
class ImagePrep:
    """The image-preparation keys of a config's `parameters` (docs/serving.md lists them)."""

    scaling: str = "UNIT"
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    bgr: bool = False
    logits: bool = False

    @classmethod
    def from_config(cls, config: ModelConfig) -> ImagePrep:
        params = {k: v.string_value.strip() for k, v in config.parameters.items()}
        scaling = params.get("image_scaling", "UNIT").upper()
        if scaling not in SCALINGS:
            raise ValueError(f"image_scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        order = params.get("image_channel_order", "RGB").upper()
        if order not in ("RGB", "BGR"):
            raise ValueError(f"image_channel_order must be RGB or BGR, got {order!r}")
        kind = params.get("image_output", "probabilities").lower()
        if kind not in ("probabilities", "logits"):
            raise ValueError(f"image_output must be probabilities or logits, got {kind!r}")
        mean = _floats(params.get("image_mean", ""), "image_mean")
        std = _floats(params.get("image_std", ""), "image_std")
        if any(s == 0 for s in std):
            raise ValueError("image_std cannot hold 0")
        return cls(scaling, mean, std, order == "BGR", kind == "logits")

    @property
    def is_unit(self) -> bool:
        return self.scaling == "UNIT" and not self.mean and not self.std and not self.bgr

    def from_unit(self, images: np.ndarray) -> np.ndarray:
        """float32 N x C x H x W in [0, 1] -> the pixels the model was trained on."""
        x = images.astype(np.float32, copy=True)
        if self.scaling != "UNIT":
            x *= 255.0
        if self.scaling == "INCEPTION":
            x = x / 127.5 - 1.0
        elif self.scaling == "VGG" and x.shape[1] == 3:
            x -= VGG_MEAN.reshape(1, 3, 1, 1)
        channels = x.shape[1]
        if self.mean:
            x -= np.resize(np.array(self.mean, np.float32), channels).reshape(1, channels, 1, 1)
        if self.std:
            x /= np.resize(np.array(self.std, np.float32), channels).reshape(1, channels, 1, 1)
        if self.bgr and channels == 3:
            x = x[:, ::-1]
        return x


def is_own_export(config: ModelConfig) -> bool:
    """Our training package's interface: one input `input`, an output `probabilities`."""
    return [i.name for i in config.input] == [INPUT_NAME] and any(
        o.name == OUTPUT_NAME for o in config.output
    )


@dataclass(frozen=True)
class ImageModel:
    input: str
    output: str
    shape: tuple[int, int, int]  # channels, height, width
    layout: str  # "NCHW" or "NHWC"
    datatype: Datatype
    classes: int
    prep: ImagePrep

    @property
    def takes_unit_pixels(self) -> bool:
        """Float pixels in [0, 1] as they are (our exports): UINT8 pixels may stand in for them."""
        return self.prep.is_unit and self.datatype.name == "FP32" and self.layout == "NCHW"

    def to_model(self, images: np.ndarray) -> np.ndarray:
        """float32 N x C x H x W in [0, 1] -> the model's input tensor (batch dim first)."""
        if self.takes_unit_pixels:
            return images
        pixels = self.prep.from_unit(images)  # N x C x H x W, float32, prepared
        if self.layout == "NHWC":
            pixels = pixels.transpose(0, 2, 3, 1)
        return np.ascontiguousarray(pixels.astype(self.datatype.dtype, copy=False))

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """The output as float32 N x classes probabilities (softmax when it gives logits)."""
        scores = scores.reshape(scores.shape[0], -1).astype(np.float32, copy=False)
        if not self.prep.logits:
            return scores
        shifted = scores - scores.max(axis=1, keepdims=True)
        exp = np.exp(shifted)
        return exp / exp.sum(axis=1, keepdims=True)


def image_model(config: ModelConfig, signature: Signature) -> ImageModel | None:
    """The model as an image classifier, or None when it is not one. Raises ValueError for
    image-preparation parameters that make no sense (they name the key)."""
    required = [t for t in signature.inputs if not t.optional]
    if len(required) != 1:
        return None
    spec = required[0]
    geometry = _geometry(spec)
    if geometry is None or spec.datatype.dtype.kind not in _NUMERIC_KINDS:
        return None
    output = _scores(signature)
    if output is None:
        return None
    shape, layout = geometry
    prep = ImagePrep.from_config(config)
    return ImageModel(
        input=spec.name,
        output=output.name,
        shape=shape,
        layout=layout,
        datatype=spec.datatype,
        classes=output.dims[0],
        prep=prep,
    )


def _geometry(spec: TensorSpec) -> tuple[tuple[int, int, int], str] | None:
    dims = spec.dims
    if len(dims) != 3 or any(d <= 0 for d in dims):
        return None
    if spec.format == "FORMAT_NHWC" or (spec.format == "FORMAT_NONE" and dims[0] not in (1, 3)):
        h, w, c = dims
        layout = "NHWC"
    else:
        c, h, w = dims
        layout = "NCHW"
    if c not in (1, 3):
        return None
    return (c, h, w), layout


def _scores(signature: Signature) -> TensorSpec | None:
    """The output holding class scores: `probabilities` for our exports, else the first
    numeric output whose dims hold one class axis ([classes], or [classes, 1, 1])."""
    candidates = [signature.output(OUTPUT_NAME), *signature.outputs]
    for spec in candidates:
        if spec is None or spec.datatype.dtype.kind != "f":
            continue
        classes = [d for d in spec.dims if d != 1]
        if len(classes) == 1 and classes[0] > 1 and spec.dims[0] == classes[0]:
            return spec
    return None
