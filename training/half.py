"""fp16 for GPU runtimes: the network in half precision, float32 pixels in and float32
probabilities out, so the wire contract is the same as fp32's and the casts live in the graph.

ONNX: onnxruntime's own float16 converter (`onnxruntime.transformers.float16`, the converter
onnxruntime documents for its CUDA provider) with the graph's inputs and outputs kept float32.
TorchScript: the model traced in half precision behind two casts.
"""

from __future__ import annotations

import copy
from pathlib import Path

import onnx
import torch
from torch import nn

from training.errors import TrainingError


def onnx_to_fp16(source: Path, target: Path) -> None:
    """Convert a float32 ONNX model's weights and operators to float16, keeping float32 I/O."""
    from onnxruntime.transformers.float16 import convert_float_to_float16

    try:
        converted = convert_float_to_float16(onnx.load(str(source)), keep_io_types=True)
        onnx.save(converted, str(target))
    except Exception as exc:  # the converter raises plain exceptions from deep inside
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"fp16 conversion failed: {first[:300]}") from None


class HalfPrecision(nn.Module):
    """A copy of `served` in float16 between a cast of its input and a cast of its output."""

    def __init__(self, served: nn.Module) -> None:
        super().__init__()
        self.inner = copy.deepcopy(served).half().eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x.half()).float()
