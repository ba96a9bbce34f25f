"""Checkpoint -> a new, parity-checked version in a Triton-layout model repository.

The version is assembled in a hidden folder inside the model's folder and renamed into place
only after the exported files match eager PyTorch, so the server never sees half a version.
A reduced-precision export (fp16, int8) starts from the parity-checked fp32 ONNX model and
must also pass the accuracy gate (training.gate) before anything is renamed into place.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import shutil
import sys
import tempfile
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from modelrepo import layout
from modelrepo.config import format_config, load_config
from modelrepo.precision import (
    ACCURACY_PARAMETER,
    FP16,
    FP32_ACCURACY_PARAMETER,
    INT8,
    QUANTIZATION_PARAMETER,
    REFERENCE_PRECISION_KEY,
    REFERENCE_TOLERANCE_KEY,
    reference_tolerance,
)
from training import gate
from training.checkpoint import classifier_from_checkpoint, load_checkpoint
from training.data import DataBundle, DatasetUnavailable, first_images, load_dataset
from training.errors import TrainingError
from training.half import HalfPrecision, onnx_to_fp16
from training.model_config import build_config, check_precision_kept, platform_for
from training.quantize import onnx_session, quantize_int8
from training.reduced import (
    PrecisionOptions,
    as_images,
    calibration_images,
    check_execution_paths,
)

FORMATS = ("onnx", "torchscript", "both")
PARITY_TOLERANCE = 1e-5
PARITY_BATCH_SIZES = (1, 7, 64)
REFERENCE_ROWS = 16
# Loggers of the exporter stack that report progress at INFO: useful to its developers, noise here.
EXPORTER_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript", "onnx_ir")


def export_checkpoint(
    checkpoint: Path | str,
    repository: Path | str,
    name: str,
    fmt: str = "onnx",
    *,
    max_batch_size: int | None = None,
    instance_count: int | None = None,
    max_queue_delay_us: int | None = None,
    data: DataBundle | torch.Tensor | None = None,
    precision: PrecisionOptions | None = None,
    progress: bool | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Export a checkpoint as the next version of model `name`; returns the version folder.

    `data` (a DataBundle, or a float32 N x C x H x W batch in [0, 1]) supplies real images for the
    parity check and reference.npz; without it both use seeded random pixels.
    Serving options left None keep what an existing config.pbtxt says (an operator may have
    tuned it), else take the defaults.
    `precision` (default fp32): fp16 or int8 need `data` as a DataBundle, whose training split
    calibrates int8 and whose test split the accuracy gate measures. `progress`: show progress
    bars (default: when stderr is a terminal).
    """
    options = precision or PrecisionOptions()
    _check_options(name, fmt, max_batch_size, instance_count, max_queue_delay_us)
    options.check(fmt)
    if options.reduced and not isinstance(data, DataBundle):
        raise TrainingError(
            f"--precision {options.precision} needs the checkpoint's dataset (the test split for "
            "the accuracy gate, the training split to calibrate int8): none is at hand (see "
            "--data-dir; --random-reference cannot be used)"
        )
    state = load_checkpoint(checkpoint)
    served = classifier_from_checkpoint(state, checkpoint).probabilities().eval()
    shape = tuple(int(d) for d in state["input_shape"])
    labels = list(state["class_names"])
    model_dir = Path(repository) / name
    platform = platform_for(model_dir, name, fmt, shape, labels)
    check_precision_kept(model_dir, name, options.precision)
    show = sys.stderr.isatty() if progress is None else progress

    images = _dataset_images(data, shape)
    batches = _parity_batches(shape, images)
    reference = images[:REFERENCE_ROWS] if images is not None else batches[-1][:REFERENCE_ROWS]

    model_dir.mkdir(parents=True, exist_ok=True)
    staging = model_dir / f".export-{uuid.uuid4().hex[:12]}"
    staging.mkdir()
    try:
        if options.reduced:
            assert isinstance(data, DataBundle)
            result = _export_reduced(
                served, shape, fmt, staging, batches, reference, data, options, show, log
            )
        else:
            result = _export_fp32(served, shape, fmt, staging, batches, reference)
        extra: dict[str, Any] = {REFERENCE_PRECISION_KEY: np.array(options.precision)}
        if result.tolerance is not None:
            extra[REFERENCE_TOLERANCE_KEY] = np.array(result.tolerance, dtype=np.float64)
        np.savez(
            staging / layout.REFERENCE_FILE,
            inputs=reference.numpy().astype(np.float32),
            outputs=result.outputs.astype(np.float32),
            **extra,
        )
        config_path = model_dir / layout.CONFIG_FILE
        existing = load_config(config_path) if config_path.exists() else None
        config = build_config(
            name,
            platform,
            shape,
            len(labels),
            max_batch_size,
            instance_count,
            max_queue_delay_us,
            training_dataset=str(state.get("dataset", "")),
            base=existing,
            precision=options.precision,
            parameters=result.parameters,
        )
        if config != existing:
            _replace_file(config_path, format_config(config))
        _replace_file(model_dir / layout.LABELS_FILE, "".join(f"{label}\n" for label in labels))
        version_dir = _publish(staging, model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    kinds = {"onnx": "ONNX", "torchscript": "TorchScript", "both": "ONNX + TorchScript"}[fmt]
    source = "dataset images" if images is not None else "random inputs"
    if options.reduced:
        what = f"{options.precision} {kinds}"
        log(f"exported {state['arch']} ({what}) to {version_dir}: {result.note}")
    else:
        log(
            f"exported {state['arch']} ({kinds}) to {version_dir}: matches PyTorch within "
            f"{PARITY_TOLERANCE:g} at batch sizes {', '.join(map(str, PARITY_BATCH_SIZES))} "
            f"on {source}"
        )
    return version_dir


@dataclass
class _Exported:
    """What the files of a staged version need written beside them."""

    outputs: np.ndarray  # of the served file on the reference inputs
    tolerance: float | None = None  # recorded in reference.npz; None: the server's default
    parameters: dict[str, str] = field(default_factory=dict)  # for config.pbtxt
    note: str = ""


def _export_fp32(
    served: nn.Module,
    shape: tuple,
    fmt: str,
    staging: Path,
    batches: list[torch.Tensor],
    reference: torch.Tensor,
) -> _Exported:
    if fmt in ("onnx", "both"):
        path = staging / layout.ONNX_FILE
        _export_onnx(served, shape, path)
        _check_parity("ONNX", served, _onnx_runner(path), batches)
    if fmt in ("torchscript", "both"):
        path = staging / layout.TORCHSCRIPT_FILE
        runner = _export_torchscript(served, shape, path)
        _check_parity("TorchScript", served, runner, batches)
    with torch.inference_mode():
        return _Exported(served(reference).numpy())


def _export_reduced(
    served: nn.Module,
    shape: tuple,
    fmt: str,
    staging: Path,
    batches: list[torch.Tensor],
    reference: torch.Tensor,
    data: DataBundle,
    options: PrecisionOptions,
    progress: bool,
    log: Callable[[str], None],
) -> _Exported:
    """fp16/int8 files in `staging`, converted from the parity-checked fp32 ONNX model (which
    stays outside the repository), then gated on accuracy and on reproducible outputs."""
    precision = options.precision
    tolerance = reference_tolerance(precision)
    assert tolerance is not None
    exported: dict[str, Callable[[torch.Tensor], np.ndarray]] = {}
    # Other ways of running the same files: each must reproduce the served file's outputs.
    paths: dict[str, Callable[[torch.Tensor], np.ndarray]] = {}
    parameters: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="imgserve-export-") as scratch:
        fp32_path = Path(scratch) / "fp32.onnx"
        _export_onnx(served, shape, fp32_path)
        _check_parity("ONNX (fp32)", served, _onnx_runner(fp32_path), batches)
        if fmt in ("onnx", "both"):
            path = staging / layout.ONNX_FILE
            if precision == INT8:
                images = (
                    as_images(options.calibration, shape, "calibration images")
                    if options.calibration is not None
                    else calibration_images(data.train, options.calibration_images, shape)
                )
                int8 = quantize_int8(
                    fp32_path,
                    path,
                    images,
                    per_channel=options.per_channel,
                    fmt=options.int8_format,
                    progress=progress,
                )
                parameters[QUANTIZATION_PARAMETER] = int8.description
            else:
                onnx_to_fp16(fp32_path, path)
            exported["ONNX"] = _onnx_runner(path)
            paths["ONNX run unoptimised"] = _onnx_runner(path, optimized=False)
        if fmt in ("torchscript", "both") and precision == FP16:
            half = HalfPrecision(served)
            path = staging / layout.TORCHSCRIPT_FILE
            runner = _export_torchscript(half, shape, path)
            _check_parity("TorchScript (fp16)", half, runner, batches)
            exported["TorchScript"] = runner
        result = gate.measure(_onnx_runner(fp32_path), exported, data, precision, progress)
    log(result.summary(data.name))
    gate.enforce(result, options.max_accuracy_drop, data.name)
    served_kind = "ONNX" if "ONNX" in exported else "TorchScript"
    outputs = np.asarray(exported[served_kind](reference))
    paths |= {kind: run for kind, run in exported.items() if kind != served_kind}
    spread = check_execution_paths(reference, outputs, paths, tolerance)
    worst = result.worst
    parameters[ACCURACY_PARAMETER] = f"{result.accuracy(worst):.4f}"
    parameters[FP32_ACCURACY_PARAMETER] = f"{result.fp32_accuracy:.4f}"
    note = (
        f"top-1 accuracy {result.accuracy(worst):.2%} against fp32's {result.fp32_accuracy:.2%} "
        f"(drop {result.drop_points(worst):.2f} points, allowed {options.max_accuracy_drop:g}); "
        f"load-time tolerance {tolerance:g}"
    )
    if paths:
        note += f", reference outputs reproduced within {spread:.2g} by {', '.join(paths)}"
    return _Exported(outputs, tolerance, parameters, note)


def _check_options(
    name: str, fmt: str, max_batch: int | None, instances: int | None, delay_us: int | None
) -> None:
    if not name or name.startswith(".") or "/" in name or "\\" in name or name != name.strip():
        raise TrainingError(f"invalid model name {name!r}: use a plain folder name")
    if fmt not in FORMATS:
        raise TrainingError(f"unknown export format {fmt!r} (choose from: {', '.join(FORMATS)})")
    if max_batch is not None and max_batch < 1:
        raise TrainingError(f"--max-batch-size must be at least 1, got {max_batch}")
    if instances is not None and instances < 1:
        raise TrainingError(f"--instance-count must be at least 1, got {instances}")
    if delay_us is not None and delay_us < 0:
        raise TrainingError(f"--max-queue-delay-us must not be negative, got {delay_us}")


def _dataset_images(data: DataBundle | torch.Tensor | None, shape: tuple) -> torch.Tensor | None:
    if data is None:
        return None
    images = (
        first_images(data.test, max(PARITY_BATCH_SIZES)) if isinstance(data, DataBundle) else data
    )
    images = images.detach().to(torch.float32).cpu()
    if images.dim() != 4 or tuple(images.shape[1:]) != shape or images.shape[0] < 1:
        raise TrainingError(
            f"reference images shaped {list(images.shape)} do not fit {list(shape)}"
        )
    return images.contiguous()


def _parity_batches(shape: tuple, images: torch.Tensor | None) -> list[torch.Tensor]:
    """Seeded random pixels at every checked batch size, plus dataset images when given."""
    generator = torch.Generator().manual_seed(0)
    batches = [torch.rand(n, *shape, generator=generator) for n in PARITY_BATCH_SIZES]
    if images is not None:
        batches += [images[:n] for n in PARITY_BATCH_SIZES if n <= images.shape[0]]
    return batches


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """The exporter reports progress and internal deprecations that say nothing about the user's
    model; keep them off the console. The parity check afterwards is what vouches for the file."""
    saved = {n: logging.getLogger(n).level for n in EXPORTER_LOGGERS}
    chatter = io.StringIO()
    try:
        for logger_name in EXPORTER_LOGGERS:
            logging.getLogger(logger_name).setLevel(logging.ERROR)
        with warnings.catch_warnings(record=True), contextlib.redirect_stdout(chatter):
            warnings.simplefilter("always")
            yield chatter
    finally:
        for logger_name, level in saved.items():
            logging.getLogger(logger_name).setLevel(level)


def _export_onnx(module: nn.Module, shape: tuple, path: Path) -> None:
    example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))
    batch = torch.export.Dim("batch", min=1)
    try:
        with _quiet_exporter():
            torch.onnx.export(
                module,
                (example,),
                str(path),
                input_names=[layout.INPUT_NAME],
                output_names=[layout.OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                external_data=False,
                dynamo=True,
                verbose=False,
            )
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"ONNX export failed: {first[:300]}") from None
    if not path.is_file():
        raise TrainingError("ONNX export produced no file")


def _onnx_runner(path: Path, optimized: bool = True) -> Callable[[torch.Tensor], np.ndarray]:
    session = onnx_session(path, optimized)
    return lambda x: session.run([layout.OUTPUT_NAME], {layout.INPUT_NAME: x.numpy()})[0]


@contextlib.contextmanager
def torchscript_deprecation_silenced() -> Iterator[None]:
    """torch 2.14 flags every torch.jit call as deprecated; TorchScript is still what
    Triton's pytorch_libtorch backend loads, so it is used on purpose."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r".*torch\.jit")
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*torch\.jit")
        yield


def _export_torchscript(
    module: nn.Module, shape: tuple, path: Path
) -> Callable[[torch.Tensor], np.ndarray]:
    example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(1))
    with torchscript_deprecation_silenced():
        try:
            traced = torch.jit.trace(module, (example,))
            traced.save(str(path))
            loaded = torch.jit.load(str(path), map_location="cpu").eval()
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise TrainingError(f"TorchScript export failed: {first[:300]}") from None

    def run(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return loaded(x).numpy()

    return run


def _check_parity(
    kind: str,
    eager: nn.Module,
    exported: Callable[[torch.Tensor], Any],
    batches: list[torch.Tensor],
) -> None:
    for batch in batches:
        with torch.inference_mode():
            expected = eager(batch).numpy()
        got = np.asarray(exported(batch))
        if got.shape != expected.shape:
            raise TrainingError(
                f"{kind} export returns shape {list(got.shape)} for batch {batch.shape[0]}, "
                f"PyTorch {list(expected.shape)}: nothing written"
            )
        diff = float(np.max(np.abs(got - expected)))
        if not diff <= PARITY_TOLERANCE:
            raise TrainingError(
                f"{kind} export differs from PyTorch by {diff:.3g} (> {PARITY_TOLERANCE:g}) "
                f"at batch size {batch.shape[0]}: nothing written"
            )


def _replace_file(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _publish(staging: Path, model_dir: Path) -> Path:
    """Rename the staged folder to the next free version number (never over an existing one)."""
    for _ in range(100):
        target = model_dir / str(layout.next_version(model_dir))
        if target.exists():
            continue
        try:
            os.rename(staging, target)
        except OSError:
            continue  # another export took that number first
        return target
    raise TrainingError(f"could not find a free version number in {model_dir}")


def reference_data(
    state: dict[str, Any], data_dir: Path | str | None, skip_checksum: bool, log: Callable
) -> DataBundle | None:
    """The checkpoint's own dataset when it is at hand (never downloaded), for real-image parity."""
    recorded = state.get("args", {}) or {}
    options = state.get("data_options", {}) or {}
    try:
        return load_dataset(
            state["dataset"],
            state["input_shape"],
            data_dir=data_dir if data_dir is not None else recorded.get("data_dir", "data"),
            download=False,
            skip_checksum=skip_checksum or bool(recorded.get("skip_checksum", False)),
            synthetic_train_size=int(options.get("train_size", 1)),
            synthetic_test_size=int(options.get("test_size", REFERENCE_ROWS)),
            synthetic_classes=int(options.get("num_classes", len(state["class_names"]))),
            seed=int(options.get("seed", 0)),
            log=log,
        )
    except DatasetUnavailable:
        log(
            f"note: no {state['dataset']} data at hand (see --data-dir); checking parity on "
            "random inputs only"
        )
    except TrainingError as exc:
        log(f"note: cannot use the training data for parity ({exc}); using random inputs only")
    return None


def main(args: argparse.Namespace) -> int:
    """`python -m training export`: the parsed command line -> export_checkpoint()."""
    options = PrecisionOptions(
        precision=args.precision,
        max_accuracy_drop=args.max_accuracy_drop,
        calibration_images=args.calibration_images,
        per_channel=args.per_channel,
        int8_format=args.int8_format,
    )
    options.check(args.format)
    if options.reduced and args.random_reference:
        raise TrainingError(
            f"--precision {args.precision} measures accuracy on the test split: it cannot be "
            "combined with --random-reference"
        )
    state = load_checkpoint(args.checkpoint)
    data = (
        None
        if args.random_reference
        else reference_data(state, args.data_dir, args.skip_checksum, print)
    )
    export_checkpoint(
        args.checkpoint,
        args.model_repository,
        args.name,
        args.format,
        max_batch_size=args.max_batch_size,
        instance_count=args.instance_count,
        max_queue_delay_us=args.max_queue_delay_us,
        data=data,
        precision=options,
    )
    return 0
