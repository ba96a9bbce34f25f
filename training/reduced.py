"""The options and checks of a reduced-precision export (fp16, int8) that are not about one
file format: what the user asked for, the calibration images, and the reference check's
reproducibility across the ways a runtime may execute the exported graph."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, TensorDataset

from modelrepo.precision import FP32, INT8, PrecisionError, check_precision
from training.errors import TrainingError
from training.gate import DEFAULT_MAX_DROP, check_max_drop
from training.quantize import DEFAULT_CALIBRATION_IMAGES, INT8_FORMATS, PER_CHANNEL

CALIBRATION_SEED = 0


@dataclass(frozen=True)
class PrecisionOptions:
    """How to export; everything but `precision` applies to fp16/int8 only (fp32 has no gate)."""

    precision: str = FP32
    # Largest loss of top-1 accuracy on the test split, in percentage points, that export accepts.
    max_accuracy_drop: float = DEFAULT_MAX_DROP
    # int8: training images drawn (seeded) to calibrate the activation ranges.
    calibration_images: int = DEFAULT_CALIBRATION_IMAGES
    per_channel: str = "auto"  # auto | on | off
    int8_format: str = "qdq"  # qdq | qoperator
    # int8: calibrate on these float32 N x C x H x W images instead of the training split's.
    calibration: torch.Tensor | None = None

    @property
    def reduced(self) -> bool:
        return self.precision != FP32

    def check(self, fmt: str) -> None:
        """Every usage error of these options, before anything is computed."""
        try:
            check_precision(self.precision)
        except PrecisionError as exc:
            raise TrainingError(str(exc)) from None
        check_max_drop(self.max_accuracy_drop)
        if self.calibration_images < 1:
            raise TrainingError(
                f"--calibration-images must be at least 1, got {self.calibration_images}"
            )
        if self.per_channel not in PER_CHANNEL:
            raise TrainingError(f"--per-channel must be one of: {', '.join(PER_CHANNEL)}")
        if self.int8_format not in INT8_FORMATS:
            raise TrainingError(f"--int8-format must be one of: {', '.join(INT8_FORMATS)}")
        if self.precision == INT8 and fmt != "onnx":
            raise TrainingError(
                "int8 comes from onnxruntime's quantization tools and exists only as ONNX: "
                "use --format onnx"
            )


def calibration_images(train: Dataset, count: int, shape: tuple[int, ...]) -> np.ndarray:
    """`count` training images drawn with a fixed seed (all of them when the split is smaller)."""
    total = len(train)  # type: ignore[arg-type]
    if total < 1:
        raise TrainingError("the training split is empty: nothing to calibrate int8 on")
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    picked = torch.randperm(total, generator=generator)[:count]
    if isinstance(train, TensorDataset):
        images = train.tensors[0][picked]
    else:
        images = torch.stack([train[int(i)][0] for i in picked])
    return as_images(images, shape, "calibration images")


def as_images(images: torch.Tensor, shape: tuple[int, ...], what: str) -> np.ndarray:
    """A float32 N x C x H x W numpy batch, checked against the model's input shape."""
    batch = images.detach().to(torch.float32).cpu().contiguous()
    if batch.dim() != 4 or tuple(batch.shape[1:]) != tuple(shape) or batch.shape[0] < 1:
        raise TrainingError(f"{what} shaped {list(batch.shape)} do not fit {list(shape)}")
    return batch.numpy()


def check_execution_paths(
    reference: torch.Tensor,
    outputs: np.ndarray,
    paths: Mapping[str, Callable[[torch.Tensor], np.ndarray]],
    tolerance: float,
) -> float:
    """Every other way of running the exported model must reproduce the reference outputs
    within half the tolerance the server will check them with, so that the check passes on
    another machine (another instruction set, a GPU provider) and still catches a wrong model.
    Returns the largest difference seen."""
    worst = 0.0
    for name, run in paths.items():
        got = np.asarray(run(reference))
        diff = float(np.max(np.abs(got - outputs)))
        if not diff <= tolerance / 2:
            raise TrainingError(
                f"the exported model's outputs depend on how it is run: {name} differs by "
                f"{diff:.3g} on the reference images (more than half the load-time tolerance "
                f"{tolerance:g}); nothing written"
            )
        worst = max(worst, diff)
    return worst
