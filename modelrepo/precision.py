"""Numeric precision of an exported model: what export records and the server reads back.

A model's precision is recorded twice. config.pbtxt carries it in `parameters` (Triton passes
unknown parameters through), where every version of the model shares it, as they share the
platform; each version's reference.npz carries it again with the tolerance its load-time check
needs, so a version folder copied under a model of another precision is caught at load.
"""

from __future__ import annotations

from collections.abc import Mapping

from wire import model_config_pb2

FP32 = "fp32"
FP16 = "fp16"
INT8 = "int8"
PRECISIONS = (FP32, FP16, INT8)

# config.pbtxt `parameters` keys. A config without PRECISION_PARAMETER is fp32: every model
# exported before precisions existed was.
PRECISION_PARAMETER = "precision"
# Top-1 accuracy on the test split of the exported model and of the fp32 model it came from,
# as measured by export's accuracy gate ("0.8712"); only reduced-precision exports record them.
ACCURACY_PARAMETER = "test_accuracy"
FP32_ACCURACY_PARAMETER = "fp32_test_accuracy"
# How an int8 model was quantized, in words (format, types, per-channel, calibration).
QUANTIZATION_PARAMETER = "quantization"

# reference.npz arrays besides "inputs" and "outputs": the precision (a 0-d string array) and
# the largest absolute difference the load-time check allows (a 0-d float). The server takes
# the larger of this tolerance and its own --reference-tolerance.
REFERENCE_PRECISION_KEY = "precision"
REFERENCE_TOLERANCE_KEY = "tolerance"

# Load-time check tolerances on probabilities, for the reduced precisions (fp32 records none:
# the server's --reference-tolerance, 1e-4, applies). The reference outputs are the reduced
# model's own, so the tolerance covers how differently another machine runs the same graph:
# fp16 - a GPU computes in half precision where onnxruntime's CPU provider casts to float32;
#   torch's half-precision CPU kernels and onnxruntime differed by at most 2.6e-3 over 1000
#   test images of the seed models.
# int8 - onnxruntime's integer kernels and the same QDQ graph run in floating point (as a
#   provider without integer kernels, CUDA's, runs it) agreed within 1e-9 on the seed models
#   (reduce_range keeps the integer kernels from saturating); the margin is for a
#   floating-point provider that rounds a value to the neighbouring step (not measured on a GPU).
# Either still fails a version whose weights, normalisation or graph differ from what export
# wrote; export refuses a model whose own execution paths disagree by more than half of it.
REFERENCE_TOLERANCES: Mapping[str, float] = {FP16: 1e-2, INT8: 2e-2}


class PrecisionError(ValueError):
    """A recorded precision this code does not know; str() names it and the known ones."""


def check_precision(value: str) -> str:
    if value not in PRECISIONS:
        raise PrecisionError(
            f"unknown precision {value!r} (expected {', '.join(PRECISIONS[:-1])} or "
            f"{PRECISIONS[-1]})"
        )
    return value


def precision_of(config: model_config_pb2.ModelConfig) -> str:
    """The precision config.pbtxt records; fp32 when it records none."""
    if PRECISION_PARAMETER not in config.parameters:
        return FP32
    return check_precision(config.parameters[PRECISION_PARAMETER].string_value)


def reference_tolerance(precision: str) -> float | None:
    """The tolerance export records in reference.npz for `precision`; None for fp32."""
    return REFERENCE_TOLERANCES.get(check_precision(precision))
