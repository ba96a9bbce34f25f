"""int8 through onnxruntime's static quantization, calibrated on training images.

The choices, measured on the seed models (docs/benchmarks.md, "Reduced precision"):
- QDQ format by default: QuantizeLinear/DequantizeLinear pairs around float operators, which
  onnxruntime's CPU provider fuses into the same integer kernels QOperator names directly
  (same outputs, same speed within the noise), but which other providers read too (CUDA runs
  them in floating point, TensorRT builds int8 engines from them) and which are standard ONNX
  (QOperator's QGemm is an onnxruntime contrib operator).
- uint8 activations, int8 weights with reduce_range (7-bit weights): on x86 CPUs without VNNI
  the integer kernels' 16-bit intermediate sums saturate otherwise, and the same model's
  outputs moved by up to 0.7 between those kernels and a floating-point run of the graph;
  with it they agree within 1e-9, so the model computes the same on every machine.
- Softmax stays in float32: quantized probabilities would come in steps of 1/256.
- Per-channel weight scales where they help: both are quantized and the one whose outputs stay
  closer to the fp32 model's on the calibration images is kept. (Per-channel changes only the
  weights' scales; the activation ranges come from the same calibration either way.)
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.quantization import CalibrationDataReader
from tqdm import tqdm

from modelrepo import layout
from training.errors import TrainingError

PER_CHANNEL = ("auto", "on", "off")
INT8_FORMATS = ("qdq", "qoperator")
DEFAULT_CALIBRATION_IMAGES = 1000
CALIBRATION_BATCH = 64


@dataclass(frozen=True)
class Int8Model:
    path: Path
    per_channel: bool
    description: str  # recorded in config.pbtxt


def quantize_int8(
    fp32_model: Path,
    target: Path,
    calibration: np.ndarray,
    *,
    per_channel: str = "auto",
    fmt: str = "qdq",
    progress: bool = False,
) -> Int8Model:
    """Write the int8 version of `fp32_model` to `target`.

    `calibration`: float32 N x C x H x W training images in [0, 1]; the activation ranges
    are their minimum and maximum at every quantized tensor.
    """
    if per_channel not in PER_CHANNEL:
        raise TrainingError(f"per-channel must be one of {', '.join(PER_CHANNEL)}")
    if fmt not in INT8_FORMATS:
        raise TrainingError(f"int8 format must be one of {', '.join(INT8_FORMATS)}")
    if calibration.ndim != 4 or len(calibration) < 1:
        shape = list(calibration.shape)
        raise TrainingError(f"calibration images shaped {shape}: need N x C x H x W")
    if not np.all(np.isfinite(calibration)):
        raise TrainingError("calibration images contain NaN or infinite pixels")
    candidates = {"off": [False], "on": [True], "auto": [False, True]}[per_channel]
    batches = -(-len(calibration) // CALIBRATION_BATCH)
    bar = tqdm(
        total=batches * len(candidates),
        desc="int8 calibration",
        unit="batch",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )
    with tempfile.TemporaryDirectory(prefix="imgserve-int8-") as scratch, bar:
        prepared = Path(scratch) / "prepared.onnx"
        with _quiet_quantizer():
            from onnxruntime.quantization.shape_inference import quant_pre_process

            quant_pre_process(str(fp32_model), str(prepared))
        written = {}
        for channelwise in candidates:
            path = Path(scratch) / f"int8-{'channel' if channelwise else 'tensor'}.onnx"
            _quantize(prepared, path, calibration, channelwise, fmt, bar)
            written[channelwise] = path
        chosen = candidates[0]
        if len(candidates) > 1:
            chosen = _closer_to_fp32(fp32_model, written, calibration)
        shutil.copyfile(written[chosen], target)
    return Int8Model(target, chosen, _describe(fmt, chosen, len(calibration), per_channel))


def _quantize(
    source: Path, target: Path, calibration: np.ndarray, per_channel: bool, fmt: str, bar: tqdm
) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    model = onnx.load(str(source))
    softmax = [node.name for node in model.graph.node if node.op_type == "Softmax"]
    try:
        with _quiet_quantizer():
            quantize_static(
                str(source),
                str(target),
                _ImageBatches(calibration, bar),
                quant_format=QuantFormat.QDQ if fmt == "qdq" else QuantFormat.QOperator,
                per_channel=per_channel,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=softmax,
            )
    except Exception as exc:  # onnxruntime raises plain exceptions from deep inside
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"int8 quantization failed: {first[:300]}") from None


def _closer_to_fp32(fp32_model: Path, candidates: dict[bool, Path], images: np.ndarray) -> bool:
    """The candidate that agrees with fp32 on more top-1 classes, then by smaller mean
    probability difference; per-tensor on a tie (simpler, and what every runtime runs)."""
    reference = run_onnx(fp32_model, images)
    scores = {}
    for per_channel, path in candidates.items():
        outputs = run_onnx(path, images)
        agree = int((outputs.argmax(axis=1) == reference.argmax(axis=1)).sum())
        scores[per_channel] = (-agree, float(np.mean(np.abs(outputs - reference))))
    return scores[True] < scores[False]


def run_onnx(path: Path, images: np.ndarray, optimized: bool = True) -> np.ndarray:
    """Outputs of an ONNX model on onnxruntime's CPU provider, in batches of 256.

    `optimized=False` runs the graph as written: QDQ pairs stay float operations, the way a
    provider without integer kernels runs them.
    """
    session = onnx_session(path, optimized)
    return np.concatenate(
        [
            session.run([layout.OUTPUT_NAME], {layout.INPUT_NAME: images[i : i + 256]})[0]
            for i in range(0, len(images), 256)
        ]
    )


def onnx_session(path: Path, optimized: bool = True) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if not optimized:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _describe(fmt: str, per_channel: bool, images: int, asked: str) -> str:
    scales = "per-channel" if per_channel else "per-tensor"
    if asked == "auto":
        other = "per-tensor" if per_channel else "per-channel"
        scales += f" (closer to fp32 than {other} on the calibration images)"
    return (
        f"onnxruntime static {fmt.upper()}, uint8 activations, int8 weights (reduce_range), "
        f"{scales}, MinMax calibration on {images} training images, softmax in float32"
    )


class _ImageBatches(CalibrationDataReader):
    """Calibration feeds from an image array, one batch each; advances the progress bar."""

    def __init__(self, images: np.ndarray, bar: tqdm) -> None:
        self._images = np.ascontiguousarray(images, dtype=np.float32)
        self._bar = bar
        self._next = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self._next >= len(self._images):
            return None
        batch = self._images[self._next : self._next + CALIBRATION_BATCH]
        self._next += CALIBRATION_BATCH
        self._bar.update(1)
        return {layout.INPUT_NAME: batch}

    def rewind(self) -> None:
        self._next = 0

    def __len__(self) -> int:
        return -(-len(self._images) // CALIBRATION_BATCH)


@contextlib.contextmanager
def _quiet_quantizer() -> Iterator[None]:
    """The quantization tools log advice and progress at INFO/WARNING on the root logger."""
    root = logging.getLogger()
    saved = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(saved)
