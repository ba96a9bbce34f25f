"""Small datasets written in the real on-disk formats, so tests exercise torchvision's loaders.

Images are class-conditional (a fixed random pattern per class plus noise), so a model trained
on them learns something and a test can tell a working pipeline from a broken one.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path

import numpy as np

FASHION_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
CIFAR_CLASSES = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
]


def class_images(
    count: int, shape: tuple[int, int, int], num_classes: int = 10, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 N x C x H x W, int labels N): balanced classes, pattern + noise."""
    patterns = np.random.default_rng(1234).integers(0, 256, size=(num_classes, *shape))
    rng = np.random.default_rng(seed)
    labels = np.arange(count) % num_classes
    rng.shuffle(labels)
    noise = rng.normal(0, 30, size=(count, *shape))
    images = np.clip(patterns[labels] + noise, 0, 255).astype(np.uint8)
    return images, labels.astype(np.int64)


def _write_idx_images(path: Path, images: np.ndarray) -> None:
    count, height, width = images.shape
    # IDX: magic (0, 0, type 0x08 = uint8, 3 dimensions), then big-endian sizes, then bytes.
    path.write_bytes(struct.pack(">IIII", 0x00000803, count, height, width) + images.tobytes())


def _write_idx_labels(path: Path, labels: np.ndarray) -> None:
    header = struct.pack(">II", 0x00000801, len(labels))
    path.write_bytes(header + labels.astype(np.uint8).tobytes())


def write_fashion_mnist(root: Path, train: int = 300, test: int = 100) -> Path:
    """root/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, un-gzipped."""
    raw = root / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for prefix, count, seed in (("train", train, 1), ("t10k", test, 2)):
        images, labels = class_images(count, (1, 28, 28), seed=seed)
        _write_idx_images(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        _write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


def write_cifar10(root: Path, per_batch: int = 60, test: int = 100) -> Path:
    """root/cifar-10-batches-py with data_batch_1..5, test_batch and batches.meta, pickled as
    in the official release: "data" is N x 3072 uint8 (R, G, B planes), "labels" a list."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    batches = [(f"data_batch_{i}", per_batch, 10 + i) for i in range(1, 6)]
    for name, count, seed in [*batches, ("test_batch", test, 20)]:
        images, labels = class_images(count, (3, 32, 32), seed=seed)
        entry = {
            "batch_label": name,
            "labels": labels.tolist(),
            "data": images.reshape(count, 3 * 32 * 32),
            "filenames": [f"{name}_{i}.png" for i in range(count)],
        }
        with (folder / name).open("wb") as handle:
            pickle.dump(entry, handle, protocol=2)
    meta = {"label_names": CIFAR_CLASSES, "num_cases_per_batch": per_batch, "num_vis": 3072}
    with (folder / "batches.meta").open("wb") as handle:
        pickle.dump(meta, handle, protocol=2)
    return folder


def write_image_folder(
    root: Path,
    classes: tuple[str, ...] = ("circle", "square", "stripes"),
    train_per_class: int = 12,
    test_per_class: int = 6,
    size: tuple[int, int] = (40, 36),
) -> Path:
    """root/{train,test}/<class>/<n>.png, RGB, `size` = (width, height)."""
    from PIL import Image

    width, height = size
    for split, per_class, seed in (("train", train_per_class, 3), ("test", test_per_class, 4)):
        images, labels = class_images(
            per_class * len(classes), (3, height, width), num_classes=len(classes), seed=seed
        )
        for i, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / classes[label]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.transpose(1, 2, 0), mode="RGB").save(folder / f"{i}.png")
    return root
