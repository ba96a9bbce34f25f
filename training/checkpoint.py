"""Checkpoint files: weights plus everything needed to rebuild, resume, evaluate and export.

Saved as plain containers (tensors, numbers, strings, lists, dicts) so they load with
`torch.load(weights_only=True)`: opening a checkpoint never runs code from the file.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from training.errors import TrainingError
from training.models import ARCHITECTURES, Classifier, build_classifier

FORMAT = "imgserve-checkpoint/1"
REQUIRED = (
    "format",
    "arch",
    "dataset",
    "class_names",
    "mean",
    "std",
    "input_shape",
    "epoch",
    "accuracy",
    "model_state",
)


def library_versions() -> dict[str, str]:
    versions = {"torch": str(torch.__version__)}
    try:
        from importlib.metadata import version

        versions["torchvision"] = version("torchvision")
    except Exception:  # torchvision is optional at export time
        versions["torchvision"] = "unknown"
    return versions


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write to a temporary file beside `path`, then rename: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save({"format": FORMAT, **payload}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path | str) -> dict[str, Any]:
    """Read and validate a checkpoint; any problem becomes one clear TrainingError."""
    path = Path(path)
    if not path.is_file():
        raise TrainingError(f"checkpoint {path} not found")
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged file fails anywhere in torch's (safe) unpickler
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"{path} is not a readable checkpoint ({first[:200]})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise TrainingError(f"{path} is not a checkpoint written by `python -m training train`")
    missing = [key for key in REQUIRED if key not in data]
    if missing:
        raise TrainingError(f"{path} is missing checkpoint fields: {', '.join(missing)}")
    if data["arch"] not in ARCHITECTURES:
        raise TrainingError(f"{path} names an unknown architecture {data['arch']!r}")
    return data


def classifier_from_checkpoint(data: dict[str, Any], path: Path | str = "checkpoint") -> Classifier:
    """The trained Classifier (CPU, eval mode) described by a loaded checkpoint."""
    model = build_classifier(data["arch"], len(data["class_names"]), data["mean"], data["std"])
    try:
        model.load_state_dict(data["model_state"])
    except (RuntimeError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0]
        raise TrainingError(f"{path}: weights do not fit {data['arch']} ({first[:200]})") from None
    return model.eval()
