"""The accuracy gate of a reduced-precision export: top-1 accuracy on the test split, against
the fp32 model, in one pass over the data so that both see exactly the same images."""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from training.data import DataBundle
from training.errors import TrainingError
from training.train import eval_loader

# Any model: a float32 N x C x H x W batch of pixels in [0, 1] -> N x classes scores.
Runner = Callable[[torch.Tensor], np.ndarray]
DEFAULT_MAX_DROP = 1.0  # points of top-1 accuracy


@dataclass(frozen=True)
class GateResult:
    precision: str
    images: int
    fp32_correct: int
    correct: dict[str, int]  # per exported file ("ONNX", "TorchScript")

    @property
    def fp32_accuracy(self) -> float:
        return self.fp32_correct / self.images

    def accuracy(self, kind: str) -> float:
        return self.correct[kind] / self.images

    @property
    def worst(self) -> str:
        """The exported file with the lowest accuracy: the one the gate judges."""
        return min(self.correct, key=lambda kind: self.correct[kind])

    def drop_points(self, kind: str) -> float:
        return 100.0 * (self.fp32_correct - self.correct[kind]) / self.images

    def summary(self, dataset: str) -> str:
        measured = ", ".join(
            f"{self.precision} {kind} {self.accuracy(kind):.2%}" for kind in self.correct
        )
        return (
            f"top-1 accuracy on the {dataset} test split ({self.images} images): "
            f"fp32 {self.fp32_accuracy:.2%}, {measured}"
        )


def check_max_drop(points: float) -> float:
    if not math.isfinite(points) or points < 0:
        raise TrainingError(
            f"--max-accuracy-drop must be a non-negative number of points, got {points:g}"
        )
    return points


def measure(
    fp32: Runner,
    exported: Mapping[str, Runner],
    data: DataBundle,
    precision: str,
    progress: bool,
) -> GateResult:
    """Top-1 correct counts of the fp32 model and of every exported file over the test split."""
    loader = eval_loader(data)
    fp32_correct, seen = 0, 0
    correct = dict.fromkeys(exported, 0)
    bar = tqdm(
        loader,
        desc=f"accuracy gate (fp32 vs {precision})",
        unit="batch",
        file=sys.stderr,
        disable=not progress,
        leave=False,
    )
    for images, labels in bar:
        images = images.to(torch.float32).contiguous()
        truth = labels.numpy()
        fp32_correct += int((np.asarray(fp32(images)).argmax(axis=1) == truth).sum())
        for kind, run in exported.items():
            correct[kind] += int((np.asarray(run(images)).argmax(axis=1) == truth).sum())
        seen += len(truth)
    if seen == 0:
        raise TrainingError(f"the {data.name} test split is empty: no accuracy to check")
    return GateResult(precision, seen, fp32_correct, correct)


def enforce(result: GateResult, max_drop: float, dataset: str) -> None:
    """Refuse (TrainingError) when an exported file loses more than `max_drop` points."""
    worst = result.worst
    drop = result.drop_points(worst)
    if drop > max_drop + 1e-9:  # counts of images: only rounding can make them differ by less
        raise TrainingError(
            f"{result.precision} {worst} loses {drop:.2f} points of top-1 accuracy on the "
            f"{dataset} test split (fp32 {result.fp32_accuracy:.2%}, {result.precision} "
            f"{result.accuracy(worst):.2%}), more than --max-accuracy-drop {max_drop:g}: "
            "nothing written"
        )
