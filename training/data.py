"""Datasets as the training loop sees them: pixels in [0, 1], shaped for the architecture.

The real datasets come through torchvision's own classes, so a user's existing folder is read by
the same code everyone else uses. torchvision is imported only when a real dataset is asked for:
it is slow to import, and synthetic runs do not need it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import pickle
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset, TensorDataset

from training import synthetic
from training.errors import TrainingError

DATASETS = ("fashion-mnist", "cifar10", "imagefolder", "synthetic")
DOWNLOAD_TIMEOUT_S = 15.0
STATS_SAMPLE = 2000

# The statistics everyone publishes for these datasets (training split, pixels in [0, 1]).
PUBLISHED_STATS = {
    "fashion-mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}
NATIVE_SHAPES = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


class DatasetUnavailable(TrainingError):
    """The real dataset is neither on disk nor downloadable; callers may fall back to synthetic."""


@dataclass
class DataBundle:
    """Both splits plus what a checkpoint must remember to reproduce the input pipeline."""

    name: str
    train: Dataset
    test: Dataset
    class_names: list[str]
    mean: list[float]
    std: list[float]
    input_shape: tuple[int, int, int]
    synthetic: bool = False
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def describe(self) -> str:
        sizes = f"{len(self.train)} train / {len(self.test)} test images"  # type: ignore[arg-type]
        text = f"{self.name}: {sizes}, {self.num_classes} classes, input {list(self.input_shape)}"
        if self.synthetic:
            text += f" -- SYNTHETIC data (seed {self.options.get('seed', 0)}), not real images"
        return text


def load_dataset(
    name: str,
    input_shape: Sequence[int],
    *,
    data_dir: Path | str = "data",
    download: bool = True,
    skip_checksum: bool = False,
    synthetic_train_size: int = synthetic.DEFAULT_TRAIN_SIZE,
    synthetic_test_size: int = synthetic.DEFAULT_TEST_SIZE,
    synthetic_classes: int = synthetic.DEFAULT_NUM_CLASSES,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> DataBundle:
    """Load a dataset by name; every failure a user can fix is a TrainingError."""
    shape = (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))
    root = Path(data_dir)
    if name == "synthetic":
        return _synthetic(shape, synthetic_train_size, synthetic_test_size, synthetic_classes, seed)
    if name == "fashion-mnist":
        return _fashion_mnist(root, shape, download=download, log=log)
    if name == "cifar10":
        return _cifar10(root, shape, download=download, skip_checksum=skip_checksum, log=log)
    if name == "imagefolder":
        return _image_folder(root, shape)
    raise TrainingError(f"unknown dataset {name!r} (choose from: {', '.join(DATASETS)})")


def first_images(dataset: Dataset, count: int) -> torch.Tensor:
    """The first `count` images of a dataset as one float32 batch (fewer if it is smaller)."""
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[0][:count].clone()
    n = min(count, len(dataset))  # type: ignore[arg-type]
    return torch.stack([dataset[i][0] for i in range(n)])


def channel_stats(dataset: Dataset, limit: int = STATS_SAMPLE) -> tuple[list[float], list[float]]:
    """Per-channel mean/std over an evenly spread sample of the training images."""
    if isinstance(dataset, TensorDataset):
        images = dataset.tensors[0][:limit]
    else:
        total = len(dataset)  # type: ignore[arg-type]
        step = max(1, total // limit)
        images = torch.stack([dataset[i][0] for i in range(0, total, step)][:limit])
    mean = images.mean(dim=(0, 2, 3))
    std = images.std(dim=(0, 2, 3)).clamp(min=1e-3)
    return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


# --- synthetic -------------------------------------------------------------------------------


def _synthetic(
    shape: tuple[int, int, int], train_size: int, test_size: int, num_classes: int, seed: int
) -> DataBundle:
    if train_size < 1 or test_size < 1:
        raise TrainingError("synthetic dataset sizes must be at least 1")
    if num_classes < 2:
        raise TrainingError("the synthetic dataset needs at least 2 classes")
    train = TensorDataset(
        *synthetic.make_split(shape, train_size, seed=seed, train=True, num_classes=num_classes)
    )
    test = TensorDataset(
        *synthetic.make_split(shape, test_size, seed=seed, train=False, num_classes=num_classes)
    )
    mean, std = channel_stats(train)
    options = {
        "train_size": train_size,
        "test_size": test_size,
        "num_classes": num_classes,
        "seed": seed,
    }
    return DataBundle(
        "synthetic",
        train,
        test,
        synthetic.class_names(num_classes),
        mean,
        std,
        shape,
        synthetic=True,
        options=options,
    )


# --- PIL pipelines ---------------------------------------------------------------------------


class ConvertMode:
    """PIL image -> the architecture's channels ("L" or "RGB"); a class so it pickles."""

    def __init__(self, mode: str) -> None:
        self.mode = mode

    def __call__(self, image: Any) -> Any:
        return image if image.mode == self.mode else image.convert(self.mode)


def _transform(shape: tuple[int, int, int], native_size: tuple[int, int] | None) -> Any:
    from torchvision import transforms

    channels, height, width = shape
    if channels not in (1, 3):
        raise TrainingError(f"images can be converted to 1 or 3 channels, not {channels}")
    steps: list[Any] = [ConvertMode("L" if channels == 1 else "RGB")]
    if native_size != (height, width):
        steps.append(transforms.Resize((height, width)))
    steps.append(transforms.ToTensor())
    return transforms.Compose(steps)


def _stats_for(name: str, shape: tuple[int, int, int], train: Dataset) -> tuple[list, list]:
    """Published statistics when the channels match the dataset's own; else measured."""
    mean, std = PUBLISHED_STATS[name]
    native_channels = NATIVE_SHAPES[name][0]
    if shape[0] == native_channels:
        return list(mean), list(std)
    if native_channels == 1:  # grey replicated to RGB: same statistics in every channel
        return list(mean) * shape[0], list(std) * shape[0]
    return channel_stats(train)


@contextlib.contextmanager
def _network_timeout(seconds: float = DOWNLOAD_TIMEOUT_S) -> Iterator[None]:
    """Bound every socket operation, so an offline machine fails fast instead of hanging."""
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield
    finally:
        socket.setdefaulttimeout(previous)


def _try_download(what: str, root: Path, fetch: Callable[[], object], log: Callable) -> str | None:
    """Run a torchvision download; None on success, else the reason (its chatter is captured)."""
    log(f"{what} not found under {root}/: downloading it ...")
    chatter = io.StringIO()
    try:
        with _network_timeout(), contextlib.redirect_stdout(chatter):
            fetch()
    except Exception as exc:  # urllib, socket, tarfile and torchvision errors all end here
        return str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
    return None


FASHION_FILES = [
    f"{split}-{kind}-ubyte"
    for split in ("train", "t10k")
    for kind in ("images-idx3", "labels-idx1")
]


def _fashion_mnist(
    root: Path, shape: tuple[int, int, int], *, download: bool, log: Callable
) -> DataBundle:
    raw = root / "FashionMNIST" / "raw"
    fix = f"put the four un-gzipped raw files in {raw} or use --dataset synthetic"
    processed = root / "FashionMNIST" / "processed"  # torchvision's older cache, still read
    present = all((raw / name).is_file() for name in FASHION_FILES) or all(
        (processed / name).is_file() for name in ("training.pt", "test.pt")
    )
    if not present and not download:  # said before importing torchvision: it takes seconds
        raise DatasetUnavailable(
            f"FashionMNIST not found under {root}/ (downloads disabled): {fix}"
        )
    from torchvision import datasets

    transform = _transform(shape, NATIVE_SHAPES["fashion-mnist"][1:])

    def load() -> tuple[Any, Any]:
        return (
            datasets.FashionMNIST(str(root), train=True, transform=transform),
            datasets.FashionMNIST(str(root), train=False, transform=transform),
        )

    try:
        train, test = _read("FashionMNIST", raw, load)
    except _Missing:
        if not download:
            raise DatasetUnavailable(f"FashionMNIST not found under {root}/: {fix}") from None
        fetch = functools.partial(datasets.FashionMNIST, str(root), train=True, download=True)
        reason = _try_download("FashionMNIST", root, fetch, log)
        if reason is not None:
            raise DatasetUnavailable(
                f"FashionMNIST not found under {root}/ and download failed "
                f"(no network? {reason}): {fix}"
            ) from None
        train, test = _read("FashionMNIST", raw, load)
    mean, std = _stats_for("fashion-mnist", shape, train)
    return DataBundle("fashion-mnist", train, test, list(train.classes), mean, std, shape)


CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]


@functools.cache
def _unchecked_cifar10() -> type:
    """torchvision's CIFAR10 minus the md5 comparison (for folders not byte-identical to the
    official release, e.g. test fixtures); the batches are still read by torchvision's code."""
    from torchvision import datasets

    class UncheckedCIFAR10(datasets.CIFAR10):
        def _check_integrity(self) -> bool:
            folder = Path(self.root) / self.base_folder
            return all((folder / name).is_file() for name, _ in self.train_list + self.test_list)

        def _load_meta(self) -> None:
            path = Path(self.root) / self.base_folder / self.meta["filename"]
            if not path.is_file():
                raise RuntimeError(f"{path} not found")
            with path.open("rb") as infile:
                data = pickle.load(infile, encoding="latin1")
            self.classes = data[self.meta["key"]]
            self.class_to_idx = {name: i for i, name in enumerate(self.classes)}

    return UncheckedCIFAR10


def _cifar10(
    root: Path,
    shape: tuple[int, int, int],
    *,
    download: bool,
    skip_checksum: bool,
    log: Callable,
) -> DataBundle:
    folder = root / CIFAR_FOLDER
    fix = f"put the extracted {CIFAR_FOLDER} folder in {root}/ or use --dataset synthetic"
    present = all((folder / name).is_file() for name in CIFAR_FILES)
    if not present and not download:
        raise DatasetUnavailable(f"CIFAR10 not found under {root}/ (downloads disabled): {fix}")
    from torchvision import datasets

    transform = _transform(shape, NATIVE_SHAPES["cifar10"][1:])
    cls = _unchecked_cifar10() if skip_checksum else datasets.CIFAR10

    def load() -> tuple[Any, Any]:
        return (
            cls(str(root), train=True, transform=transform),
            cls(str(root), train=False, transform=transform),
        )

    if not present:
        fetch = functools.partial(datasets.CIFAR10, str(root), train=True, download=True)
        reason = _try_download("CIFAR10", root, fetch, log)
        if reason is not None:
            raise DatasetUnavailable(
                f"CIFAR10 not found under {root}/ and download failed (no network? {reason}): {fix}"
            )
    try:
        train, test = _read("CIFAR10", folder, load)
    except _Missing:
        raise TrainingError(
            f"CIFAR10 files in {folder} fail torchvision's md5 check (corrupt, or not the "
            "official release): download them again, or pass --skip-checksum to load them unchecked"
        ) from None
    mean, std = _stats_for("cifar10", shape, train)
    return DataBundle("cifar10", train, test, list(train.classes), mean, std, shape)


class _Missing(Exception):
    """torchvision said "not found" (its RuntimeError), as opposed to an unreadable file."""


def _read(what: str, where: Path, load: Callable[[], tuple[Any, Any]]) -> tuple[Any, Any]:
    try:
        return load()
    except RuntimeError as exc:
        if "not found" in str(exc).lower():
            raise _Missing from None
        raise TrainingError(f"cannot read {what} files in {where}: {exc}") from None
    except (OSError, ValueError, EOFError, KeyError, AssertionError, pickle.UnpicklingError) as e:
        detail = str(e).strip() or type(e).__name__
        raise TrainingError(f"cannot read {what} files in {where}: {detail}") from None


# --- image folders ---------------------------------------------------------------------------


def _open_image(path: str) -> Any:
    from PIL import Image, UnidentifiedImageError

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
            return image
    except (OSError, UnidentifiedImageError) as exc:
        raise TrainingError(f"cannot read image {path}: {exc}") from None


def _image_folder(root: Path, shape: tuple[int, int, int]) -> DataBundle:
    layout = f"expected {root}/train/<class>/<image> and {root}/test/<class>/<image>"
    if not root.is_dir():
        raise TrainingError(f"image folder {root} does not exist ({layout})")
    missing = [name for name in ("train", "test") if not (root / name).is_dir()]
    if missing:
        raise TrainingError(f"{root} has no {' or '.join(missing)}/ folder ({layout})")
    from torchvision import datasets

    transform = _transform(shape, None)
    splits = {}
    for split in ("train", "test"):
        try:
            splits[split] = datasets.ImageFolder(
                os.fspath(root / split), transform=transform, loader=_open_image
            )
        except (FileNotFoundError, OSError) as exc:
            raise TrainingError(f"{root / split}: {exc} ({layout})") from None
    train, test = splits["train"], splits["test"]
    if train.classes != test.classes:
        only_train = sorted(set(train.classes) - set(test.classes))
        only_test = sorted(set(test.classes) - set(train.classes))
        raise TrainingError(
            f"{root}: train/ and test/ must have the same class folders "
            f"(only in train: {only_train or '-'}; only in test: {only_test or '-'})"
        )
    if len(train.classes) < 2:
        raise TrainingError(f"{root}: need at least 2 class folders, found {train.classes}")
    mean, std = channel_stats(train)
    return DataBundle("imagefolder", train, test, list(train.classes), mean, std, shape)
