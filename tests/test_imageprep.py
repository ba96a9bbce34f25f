"""Image preparation from config.pbtxt keys (modelrepo.imageprep): the formulas, the layouts,
the server's resize, the keys our exports write, and the messages for what cannot be prepared."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from PIL import Image

from modelrepo import imageprep
from modelrepo.config import ModelConfig, format_config, parse_config
from modelrepo.imageprep import ImagePrep, ImagePrepError
from server.api.codecs import decode_image
from training.model_config import build_config
from wire import model_config_pb2

NCHW = model_config_pb2.ModelInput.FORMAT_NCHW
NHWC = model_config_pb2.ModelInput.FORMAT_NHWC
NONE = model_config_pb2.ModelInput.FORMAT_NONE
# One row of four RGB pixels whose values are easy to check by hand.
PIXELS = np.array([[[0, 0, 0], [255, 255, 255], [123, 117, 104], [10, 20, 30]]], np.uint8)


def config(
    dims: list[int],
    fmt: int = NCHW,
    datatype: int = model_config_pb2.TYPE_FP32,
    max_batch_size: int = 8,
    **params: str,
) -> ModelConfig:
    result = ModelConfig(name="m", platform="onnxruntime_onnx", max_batch_size=max_batch_size)
    result.input.add(name="x", data_type=datatype, format=fmt, dims=dims)
    result.output.add(name="y", data_type=model_config_pb2.TYPE_FP32, dims=[10])
    for key, value in params.items():
        result.parameters[key].string_value = value
    return result


def prep(scaling: str, **kwargs: object) -> ImagePrep:
    return ImagePrep("NHWC", 3, 1, 4, scaling=scaling, **kwargs)  # type: ignore[arg-type]


def test_scalings_are_image_clients_formulas() -> None:
    x = PIXELS.astype(np.float64)
    assert np.array_equal(prep("NONE").prepare(PIXELS), PIXELS.astype(np.float32))
    unit = prep("UNIT").prepare(PIXELS)
    assert unit.dtype == np.float32 and unit[0, 1].tolist() == [1.0, 1.0, 1.0]
    np.testing.assert_allclose(unit, x / 255, rtol=1e-7)
    inception = prep("INCEPTION").prepare(PIXELS)
    assert inception[0, 0].tolist() == [-1.0, -1.0, -1.0] and inception[0, 1].tolist() == [1] * 3
    np.testing.assert_allclose(inception, x / 127.5 - 1, rtol=1e-6, atol=1e-7)
    vgg = prep("VGG").prepare(PIXELS)
    assert vgg[0, 2].tolist() == [0.0, 0.0, 0.0]  # VGG's mean pixel, per R, G, B
    assert vgg[0, 3].tolist() == [10 - 123, 20 - 117, 30 - 104]
    gray = ImagePrep("NCHW", 1, 1, 1, scaling="VGG").prepare(np.full((1, 1), 200, np.uint8))
    assert gray.tolist() == [[[72.0]]]  # 200 - 128


def test_mean_std_channel_order_and_layouts() -> None:
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    torchvision = prep("UNIT", mean=mean, std=std).prepare(PIXELS)
    by_hand = (PIXELS.astype(np.float32) / np.float32(255) - np.float32(mean)) / np.float32(std)
    np.testing.assert_allclose(torchvision, by_hand, rtol=1e-6)
    assert np.array_equal(prep("NONE", channel_order="BGR").prepare(PIXELS), PIXELS[..., ::-1])
    # VGG's offsets follow their channels into BGR order; mean/std are in the model's order.
    bgr = prep("VGG", channel_order="BGR").prepare(PIXELS)
    assert bgr[0, 3].tolist() == [30 - 104, 20 - 117, 10 - 123]
    bgr_mean = prep("NONE", channel_order="BGR", mean=(1.0, 2.0, 3.0)).prepare(PIXELS)
    assert bgr_mean[0, 3].tolist() == [29.0, 18.0, 7.0]
    nchw = ImagePrep("NCHW", 3, 1, 4, scaling="NONE").prepare(PIXELS)
    assert nchw.shape == (3, 1, 4) and nchw.flags.c_contiguous
    assert np.array_equal(nchw, PIXELS.transpose(2, 0, 1))
    half = ImagePrep("NCHW", 3, 1, 4, datatype="FP16", scaling="INCEPTION").prepare(PIXELS)
    assert half.dtype == np.float16
    raw = ImagePrep("NHWC", 3, 1, 4, datatype="UINT8").prepare(PIXELS)
    assert raw.dtype == np.uint8 and np.array_equal(raw, PIXELS)  # integer input: NONE


def test_resize_and_grayscale_match_the_servers_decoding() -> None:
    pixels = np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")
    for channels in (1, 3):
        ours = ImagePrep("NCHW", channels, 28, 32).prepare(pixels)
        assert ours.shape == (channels, 28, 32)
        assert np.array_equal(ours, decode_image(png.getvalue(), (channels, 28, 32)))
    image = Image.open(io.BytesIO(png.getvalue()))
    nhwc = ImagePrep("NHWC", 1, 28, 32, scaling="NONE").prepare_image(image)
    expected = np.asarray(image.convert("L").resize((32, 28), Image.Resampling.BILINEAR))
    assert np.array_equal(nhwc[..., 0], expected.astype(np.float32))


def test_from_config_reads_dims_format_and_keys() -> None:
    keys = {
        imageprep.SCALING_PARAMETER: " inception ",
        imageprep.MEAN_PARAMETER: "0.5",
        imageprep.STD_PARAMETER: "0.25, 0.5,1",
        imageprep.CHANNEL_ORDER_PARAMETER: "bgr",
        imageprep.OUTPUT_PARAMETER: "Logits",
    }
    read = ImagePrep.from_config(config([224, 200, 3], NHWC, **keys))
    assert read == ImagePrep(
        "NHWC", 3, 224, 200, "FP32", "INCEPTION", (0.5,) * 3, (0.25, 0.5, 1.0), "BGR", "logits"
    )
    # Written back as keys, through config.pbtxt text, the same preparation comes out.
    again = config([224, 200, 3], NHWC, **read.to_parameters())
    assert ImagePrep.from_config(parse_config(format_config(again))) == read
    # FORMAT_NONE: channels first when dims[0] is 1 or 3, else last; absent keys: UNIT, RGB,
    # probabilities for float inputs, NONE for integer ones.
    assert ImagePrep.from_config(config([3, 32, 30], NONE)).shape == (3, 32, 30)
    default = ImagePrep.from_config(config([32, 30, 1], NONE))
    assert (default.layout, default.channels, default.scaling) == ("NHWC", 1, "UNIT")
    assert default.to_parameters() == {
        "image_scaling": "UNIT",
        "image_channel_order": "RGB",
        "image_output": "probabilities",
    }
    uint8 = ImagePrep.from_config(config([3, 8, 8], datatype=model_config_pb2.TYPE_UINT8))
    assert uint8.scaling == "NONE" and uint8.dtype == np.uint8
    # max_batch_size 0 with a batch dim of the model's own in dims.
    unbatched = ImagePrep.from_config(config([1, 3, 16, 16], max_batch_size=0))
    assert unbatched.explicit_batch and unbatched.shape == (3, 16, 16)
    assert not ImagePrep.from_config(config([3, 16, 16], max_batch_size=0)).explicit_batch


def test_our_exports_write_the_keys() -> None:
    written = build_config("cifar10", "onnxruntime_onnx", (3, 32, 32), 10, None, None, None)
    assert imageprep.declares_image_prep(written)
    assert ImagePrep.from_config(written) == ImagePrep("NCHW", 3, 32, 32, "FP32", "UNIT")
    # A config an operator edited keeps none of its own mean/std on a new export.
    written.parameters[imageprep.MEAN_PARAMETER].string_value = "0.5"
    again = build_config("c", "onnxruntime_onnx", (1, 28, 28), 10, None, None, None, base=written)
    assert imageprep.MEAN_PARAMETER not in again.parameters
    assert not imageprep.declares_image_prep(config([3, 8, 8]))


Edit = Callable[[ModelConfig], object]


def _param(key: str, value: str) -> Edit:
    return lambda c: setattr(c.parameters[key], "string_value", value)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (_param("image_scaling", "caffe"), "unknown image_scaling 'CAFFE' (allowed: UNIT, NONE"),
        (_param("image_channel_order", "RGBA"), "image_channel_order 'RGBA' (allowed: RGB, BGR)"),
        (
            _param("image_output", "scores"),
            "image_output 'scores' (allowed: probabilities, logits)",
        ),
        (_param("image_mean", "0.5,0.5"), "image_mean: 2 values for 3 channel(s)"),
        (_param("image_mean", "0.5;0.4"), "image_mean '0.5;0.4': expected comma-separated"),
        (_param("image_std", "0.2,0,0.2"), "image_std must be positive"),
        (_param("image_std", "nan"), "must be finite"),
        (lambda c: c.input[0].ClearField("dims"), "an image input has 3 (C,H,W or H,W,C"),
        (lambda c: c.input[0].dims.__setitem__(0, 4), "has 4 channels: images have 1 or 3"),
        (lambda c: c.input[0].dims.__setitem__(2, -1), "variable height or width"),
        (lambda c: setattr(c.input[0], "data_type", model_config_pb2.TYPE_INT8), "is INT8"),
        (lambda c: setattr(c.input[0], "data_type", model_config_pb2.TYPE_STRING), "is STRING"),
        (lambda c: setattr(c.input[0], "format", NHWC), "has 16 channels"),
        (
            lambda c: setattr(c.input[0], "format", NONE) or c.input[0].dims.__setitem__(0, 8),
            "FORMAT_NONE and dims [8, 16, 16]",
        ),
    ],
)
def test_refusals_name_the_key_and_what_is_allowed(edit: Edit, message: str) -> None:
    bad = config([3, 16, 16])
    edit(bad)
    with pytest.raises(ImagePrepError, match=None) as caught:
        ImagePrep.from_config(bad)
    assert message in str(caught.value)


def test_refusals_for_integer_inputs_and_pixels() -> None:
    uint8 = config([3, 8, 8], datatype=model_config_pb2.TYPE_UINT8, image_scaling="INCEPTION")
    with pytest.raises(ImagePrepError, match="INCEPTION gives values a UINT8 input cannot hold"):
        ImagePrep.from_config(uint8)
    int32 = config([3, 8, 8], datatype=model_config_pb2.TYPE_INT32, image_mean="1")
    with pytest.raises(ImagePrepError, match="need a floating-point input, not INT32"):
        ImagePrep.from_config(int32)
    vgg = ImagePrep.from_config(
        config([3, 1, 4], datatype=model_config_pb2.TYPE_INT32, image_scaling="VGG")
    )
    assert vgg.prepare(PIXELS)[:, 0, 3].tolist() == [10 - 123, 20 - 117, 30 - 104]
    with pytest.raises(ImagePrepError, match="no input 1"):
        ImagePrep.from_config(config([3, 8, 8]), input_index=1)
    with pytest.raises(ImagePrepError, match="BGR needs 3 channels"):
        ImagePrep("NCHW", 1, 8, 8, channel_order="BGR")
    with pytest.raises(ImagePrepError, match="must be uint8"):
        prep("UNIT").prepare(PIXELS.astype(np.float32))
    with pytest.raises(ImagePrepError, match=r"not shape \[1, 4, 2\]"):
        prep("UNIT").prepare(PIXELS[:, :, :2])


def test_logits_become_probabilities() -> None:
    logits = np.array([[2.0, 1.0, -1.0], [1000.0, 0.0, 0.0]], np.float32)
    probabilities = ImagePrep("NCHW", 3, 8, 8, output="logits").probabilities(logits)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-6)
    assert probabilities.argmax(axis=1).tolist() == [0, 0] and np.isfinite(probabilities).all()
    np.testing.assert_allclose(probabilities[0], np.exp([2, 1, -1]) / np.exp([2, 1, -1]).sum())
    already = ImagePrep("NCHW", 3, 8, 8).probabilities(logits)
    assert already is logits
