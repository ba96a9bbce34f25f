"""Whether a model is an image classifier the native API can feed, and how.

A classifier is a model with one required input holding one image per batch row (three
dims: channels 1 or 3, height, width, laid out as its `format` says) and an output of class
scores. How its pixels are prepared (scaling, mean/std, channel order) and whether its scores
are logits or probabilities come from documented config `parameters` keys, which Triton
ignores (modelrepo.imageprep reads them, for the training package's import too). The native
API decodes images to float32 N x C x H x W in [0, 1]; `to_model` turns those into the model's
input and `probabilities` turns its output back into probabilities.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from modelrepo.config import ModelConfig
from modelrepo.imageprep import (
    DTYPES,
    NCHW,
    RGB,
    UNIT,
    ImagePrep,
    ImagePrepError,
    declares_image_prep,
)
from modelrepo.layout import INPUT_NAME, OUTPUT_NAME
from server.core.signature import Signature, TensorSpec


def is_own_export(config: ModelConfig) -> bool:
    """Our training package's interface: one input `input`, an output `probabilities`."""
    return [i.name for i in config.input] == [INPUT_NAME] and any(
        o.name == OUTPUT_NAME for o in config.output
    )


@dataclass(frozen=True)
class ImageModel:
    input: str
    output: str
    classes: int
    prep: ImagePrep  # layout, size, datatype and pixel preparation of the input

    @property
    def shape(self) -> tuple[int, int, int]:
        """Channels, height, width: what the native API decodes images to."""
        return (self.prep.channels, self.prep.height, self.prep.width)

    @property
    def layout(self) -> str:
        return self.prep.layout

    # Float pixels in [0, 1], NCHW, RGB as they are (our exports): decoded images go in
    # unchanged, and UINT8 pixels may stand in for them on the KServe API. Read per request.
    takes_unit_pixels: bool = field(init=False)

    def __post_init__(self) -> None:
        prep = self.prep
        unit = (
            prep.scaling == UNIT
            and prep.datatype == "FP32"
            and prep.layout == NCHW
            and prep.channel_order == RGB
            and not prep.mean
            and not prep.std
        )
        object.__setattr__(self, "takes_unit_pixels", unit)

    def to_model(self, images: np.ndarray) -> np.ndarray:
        """float32 N x C x H x W in [0, 1] -> the model's input tensor (batch dim first).

        Any other preparation starts from 8-bit pixels, as it would from a decoded file, so
        the model sees what Triton's image_client would send it."""
        if self.takes_unit_pixels:
            return images
        pixels = np.rint(np.clip(images, 0.0, 1.0) * 255.0).astype(np.uint8)
        return np.stack([self.prep.prepare(p) for p in pixels.transpose(0, 2, 3, 1)])

    def probabilities(self, scores: np.ndarray) -> np.ndarray:
        """The output as float32 N x classes probabilities (softmax when it gives logits)."""
        flat = scores.reshape(scores.shape[0], -1)
        return self.prep.probabilities(flat).astype(np.float32, copy=False)


def image_model(config: ModelConfig, signature: Signature) -> ImageModel | None:
    """The model as an image classifier, or None when it is not one. Raises ImagePrepError
    (a ValueError) for image-preparation keys that make no sense, naming the key."""
    required = [i for i, t in enumerate(signature.inputs) if not t.optional]
    if len(required) != 1:
        return None
    index = required[0]
    spec = signature.inputs[index]
    if spec.datatype.name not in DTYPES or _geometry(spec) is None:
        return None
    output = _scores(signature)
    if output is None:
        return None
    try:
        prep = ImagePrep.from_config(config, index)
    except ImagePrepError:
        if declares_image_prep(config):
            raise  # the author said how: what cannot be done is an error
        return None  # only looks like an image model
    return ImageModel(input=spec.name, output=output.name, classes=output.dims[0], prep=prep)


def _geometry(spec: TensorSpec) -> tuple[int, ...] | None:
    """Three fixed image dims with a channel axis of 1 or 3 at one end."""
    dims = spec.dims
    if len(dims) != 3 or any(d <= 0 for d in dims):
        return None
    return dims if dims[0] in (1, 3) or dims[-1] in (1, 3) else None


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
