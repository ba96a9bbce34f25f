"""The `python -m training` command line: one parser per subcommand, errors as one line."""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from modelrepo.precision import FP32, PRECISIONS
from training import synthetic
from training.data import DATASETS
from training.errors import TrainingError
from training.export import FORMATS
from training.gate import DEFAULT_MAX_DROP
from training.importer import add_parser as add_import_parser
from training.models import ARCHITECTURES
from training.quantize import DEFAULT_CALIBRATION_IMAGES, INT8_FORMATS, PER_CHANNEL
from training.train import DEVICES, OPTIMIZERS

EXIT_USAGE = 2


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def _points(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of points, got {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(
            f"must be a non-negative number of percentage points (0 allows no loss), got {text}"
        )
    return value


def _precision_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=FP32,
        help="fp32 (default); fp16 for GPU runtimes (onnxruntime CUDA, TorchScript on cuda); "
        "int8 through onnxruntime's static quantization (ONNX only). Inputs and outputs stay "
        "float32 (the casts are inside the graph). fp16 and int8 need the checkpoint's dataset: "
        "they are refused when their top-1 accuracy on the test split falls more than "
        "--max-accuracy-drop below the fp32 model's",
    )
    parser.add_argument(
        "--max-accuracy-drop",
        type=_points,
        default=DEFAULT_MAX_DROP,
        metavar="POINTS",
        help="fp16/int8: largest loss of top-1 test accuracy accepted, in percentage points "
        "(default: %(default)s)",
    )


def _dataset_options(parser: argparse.ArgumentParser, data_dir_default: str | None) -> None:
    where = "the checkpoint's recorded folder" if data_dir_default is None else "%(default)s"
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=data_dir_default,
        help="root of the datasets: FashionMNIST/raw, cifar-10-batches-py, or for imagefolder "
        f"a folder with train/<class>/ and test/<class>/ (default: {where})",
    )
    parser.add_argument(
        "--skip-checksum",
        action="store_true",
        help="load an existing CIFAR10 folder without torchvision's md5 check (for copies that "
        "are not byte-identical to the official release); off by default",
    )
    parser.add_argument(
        "--no-download",
        action="store_true",
        help="never download a missing dataset (fail, or for build-repository use synthetic data)",
    )


def _synthetic_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--synthetic-train-size",
        type=_positive,
        default=synthetic.DEFAULT_TRAIN_SIZE,
        help="training images of the synthetic dataset (default: %(default)s)",
    )
    parser.add_argument(
        "--synthetic-test-size",
        type=_positive,
        default=synthetic.DEFAULT_TEST_SIZE,
        help="test images of the synthetic dataset (default: %(default)s)",
    )


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        choices=DEVICES,
        default="auto",
        help="where to compute; auto prefers cuda, then mps, then cpu (default: %(default)s)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training",
        description="Train the seed image classifiers and export them into a Triton-layout "
        "model repository for the server, or import a model trained elsewhere.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    datasets = ", ".join(DATASETS)
    archs = ", ".join(ARCHITECTURES)

    train = commands.add_parser(
        "train",
        help="train a classifier and write best.pt/last.pt checkpoints",
        description="Train a classifier. Prints the train loss and test accuracy of every epoch "
        "and writes best.pt (highest test accuracy) and last.pt into --checkpoint-dir.",
    )
    train.add_argument(
        "--arch",
        choices=ARCHITECTURES,
        help=f"architecture: {archs} (taken from the checkpoint with --resume)",
    )
    train.add_argument(
        "--dataset",
        choices=DATASETS,
        help=f"dataset: {datasets} (taken from the checkpoint with --resume); synthetic is "
        "generated, learnable, and not real images",
    )
    _dataset_options(train, "data")
    train.add_argument(
        "--epochs", type=_positive, default=3, help="total epochs (default: %(default)s)"
    )
    train.add_argument(
        "--batch-size", type=_positive, default=64, help="images per step (default: %(default)s)"
    )
    train.add_argument(
        "--lr", type=float, default=None, help="learning rate (default: adam 1e-3, sgd 0.01)"
    )
    train.add_argument(
        "--optimizer",
        choices=OPTIMIZERS,
        default="adam",
        help="adam, or sgd with momentum 0.9 (default: %(default)s)",
    )
    _device_option(train)
    train.add_argument(
        "--seed", type=int, default=0, help="seeds weights and shuffling (default: %(default)s)"
    )
    train.add_argument(
        "--checkpoint-dir", type=Path, required=True, help="where best.pt and last.pt are written"
    )
    train.add_argument(
        "--resume",
        type=Path,
        metavar="CKPT",
        help="continue from this checkpoint's epoch, weights and optimizer state up to --epochs",
    )
    _synthetic_options(train)

    evaluate = commands.add_parser(
        "evaluate",
        help="accuracy, per-class accuracy and confusion matrix of a checkpoint",
        description="Evaluate a checkpoint on a dataset's test split and print the accuracy, the "
        "per-class accuracy and the confusion matrix.",
    )
    evaluate.add_argument("checkpoint", type=Path, help="a best.pt or last.pt from train")
    evaluate.add_argument(
        "--dataset",
        choices=DATASETS,
        help=f"dataset: {datasets} (default: the one the checkpoint was trained on)",
    )
    _dataset_options(evaluate, None)
    _device_option(evaluate)
    evaluate.add_argument(
        "--confusion-png", type=Path, help="also save the confusion matrix as a PNG image here"
    )

    export = commands.add_parser(
        "export",
        help="export a checkpoint as a new version in a model repository",
        description="Export a checkpoint (Normalize -> network -> Softmax) as ONNX and/or "
        "TorchScript into MODEL_REPOSITORY/NAME/<next version>/, after checking that the "
        "exported model matches PyTorch within 1e-5. Writes config.pbtxt and labels.txt. "
        "With --precision fp16 or int8 the fp32 model is converted after that check, and the "
        "result must keep its top-1 accuracy on the test split within --max-accuracy-drop; a "
        "refused export writes nothing.",
    )
    export.add_argument("checkpoint", type=Path, help="a best.pt or last.pt from train")
    export.add_argument(
        "--model-repository", type=Path, required=True, help="the repository folder"
    )
    export.add_argument("--name", required=True, help="the model's folder (and served name)")
    export.add_argument(
        "--format",
        choices=FORMATS,
        default="onnx",
        help="onnx (platform onnxruntime_onnx), torchscript (pytorch_libtorch) or both "
        "(served as ONNX) (default: %(default)s)",
    )
    export.add_argument(
        "--max-batch-size",
        type=_positive,
        default=None,
        help="largest batch the server forms (default: the model's current config.pbtxt, else 64)",
    )
    export.add_argument(
        "--instance-count",
        type=_positive,
        default=None,
        help="model instances the server runs (default: the current config.pbtxt, else 1)",
    )
    export.add_argument(
        "--max-queue-delay-us",
        type=_non_negative,
        default=None,
        help="longest a request waits for a batch to fill, microseconds; 0 starts a batch as "
        "soon as an instance is free (default: the current config.pbtxt, else 0)",
    )
    _dataset_options(export, None)
    export.add_argument(
        "--random-reference",
        action="store_true",
        help="check parity and write reference.npz with random pixels only, not dataset images "
        "(fp32 only)",
    )
    _precision_options(export)
    export.add_argument(
        "--calibration-images",
        type=_positive,
        default=DEFAULT_CALIBRATION_IMAGES,
        metavar="N",
        help="int8: training images (drawn with a fixed seed) whose activation ranges set the "
        "quantization scales (default: %(default)s)",
    )
    export.add_argument(
        "--per-channel",
        choices=PER_CHANNEL,
        default="auto",
        help="int8: per-channel weight scales; auto quantizes both ways and keeps the one closer "
        "to the fp32 model on the calibration images (default: %(default)s)",
    )
    export.add_argument(
        "--int8-format",
        choices=INT8_FORMATS,
        default="qdq",
        help="int8: QuantizeLinear/DequantizeLinear pairs (qdq: standard ONNX, read by the CPU, "
        "CUDA and TensorRT providers) or onnxruntime's quantized operators (qoperator: CPU "
        "provider only) (default: %(default)s)",
    )

    build = commands.add_parser(
        "build-repository",
        help="train and export the fashion_mnist and cifar10 models (what `make run` uses)",
        description="Build the served repository: fashion_mnist (fashion_mlp on FashionMNIST) and "
        "cifar10 (cifar10_cnn on CIFAR10), as ONNX. A dataset that is neither under --data-dir "
        "nor downloadable is replaced by the SYNTHETIC dataset, with a banner saying so. Models "
        "that already have a version are skipped unless --force.",
    )
    build.add_argument("--model-repository", type=Path, required=True, help="the repository folder")
    _dataset_options(build, "data")
    build.add_argument(
        "--epochs", type=_positive, default=3, help="epochs per model (default: %(default)s)"
    )
    build.add_argument(
        "--batch-size", type=_positive, default=64, help="images per step (default: %(default)s)"
    )
    _device_option(build)
    build.add_argument(
        "--checkpoint-dir",
        type=Path,
        default=Path("checkpoints"),
        help="checkpoints go to DIR/<model>/ (default: %(default)s)",
    )
    build.add_argument(
        "--force", action="store_true", help="retrain models that already have a version"
    )
    _precision_options(build)
    _synthetic_options(build)
    add_import_parser(commands, _positive, _non_negative)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from training.train import main as run
        elif args.command == "evaluate":
            from training.evaluate import main as run
        elif args.command == "export":
            from training.export import main as run
        elif args.command == "import":
            from training.importer import main as run
        else:
            from training.repository_build import main as run
        return run(args)
    except TrainingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as exc:  # a disk or folder the user can fix: one line, not a traceback
        where = f" {exc.filename}" if exc.filename else ""
        print(f"error:{where}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
