"""File names and version folders of a Triton-layout model repository."""

from __future__ import annotations

from pathlib import Path

CONFIG_FILE = "config.pbtxt"
LABELS_FILE = "labels.txt"
ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.pt"
# Inputs and outputs that export checked against eager PyTorch; the server re-checks them at load.
# An .npz with arrays "inputs" (float32, N x C x H x W) and "outputs" (float32, N x classes).
REFERENCE_FILE = "reference.npz"

PLATFORM_ONNX = "onnxruntime_onnx"
PLATFORM_TORCHSCRIPT = "pytorch_libtorch"
MODEL_FILES = {PLATFORM_ONNX: ONNX_FILE, PLATFORM_TORCHSCRIPT: TORCHSCRIPT_FILE}

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"

# config.pbtxt `parameters` key naming the dataset the model was trained on (Triton passes
# unknown parameters through). Models trained on SYNTHETIC_DATASET classify noise patterns,
# not real images: the server warns about them at load.
TRAINING_DATASET_PARAMETER = "training_dataset"
SYNTHETIC_DATASET = "synthetic"
# config.pbtxt `parameters` key of Triton's onnxruntime backend: the intra-op threads of each
# instance of an onnxruntime_onnx model ("0": onnxruntime's default). Where a config sets it,
# it wins over the server's --intra-op-threads.
INTRA_OP_THREADS_PARAMETER = "intra_op_thread_count"


def list_versions(model_dir: Path) -> list[int]:
    """Numbered version folders of a model, ascending; other entries are ignored."""
    if not model_dir.is_dir():
        return []
    return sorted(
        int(p.name)
        for p in model_dir.iterdir()
        if p.is_dir() and p.name.isdigit() and int(p.name) > 0
    )


def next_version(model_dir: Path) -> int:
    """The version number a new export gets: one past the highest, never reusing one."""
    versions = list_versions(model_dir)
    return versions[-1] + 1 if versions else 1


def read_labels(path: Path) -> list[str]:
    """One class name per line; blank trailing lines are ignored."""
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_labels(path: Path, labels: list[str]) -> None:
    path.write_text("".join(f"{label}\n" for label in labels), encoding="utf-8")
