"""Datasets through torchvision's real loaders, on files written in the real formats."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from dataset_files import (
    CIFAR_CLASSES,
    FASHION_CLASSES,
    class_images,
    write_cifar10,
    write_fashion_mnist,
    write_image_folder,
)

from training.data import PUBLISHED_STATS, DatasetUnavailable, load_dataset
from training.errors import TrainingError


def test_fashion_mnist_idx_files_load_with_published_stats(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, train=50, test=20)
    data = load_dataset("fashion-mnist", (1, 28, 28), data_dir=tmp_path, download=False)
    assert (len(data.train), len(data.test)) == (50, 20)
    assert data.class_names == FASHION_CLASSES
    assert [data.mean, data.std] == [list(v) for v in PUBLISHED_STATS["fashion-mnist"]]
    image, label = data.train[0]
    written, labels = class_images(50, (1, 28, 28), seed=1)
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    np.testing.assert_array_equal((image.numpy() * 255).round().astype(np.uint8), written[0])
    assert label == labels[0]
    assert not data.synthetic


def test_fashion_mnist_resized_and_replicated_for_other_architectures(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path, train=20, test=10)
    lenet = load_dataset("fashion-mnist", (1, 32, 32), data_dir=tmp_path, download=False)
    assert lenet.train[0][0].shape == (1, 32, 32)
    rgb = load_dataset("fashion-mnist", (3, 32, 32), data_dir=tmp_path, download=False)
    image = rgb.train[0][0]
    assert image.shape == (3, 32, 32)
    torch.testing.assert_close(image[0], image[2])  # grey replicated into every channel
    assert rgb.mean == [0.2860] * 3


def test_missing_fashion_mnist_says_where_to_put_it(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable) as caught:
        load_dataset("fashion-mnist", (1, 28, 28), data_dir=tmp_path, download=False)
    message = str(caught.value)
    assert str(tmp_path / "FashionMNIST" / "raw") in message
    assert "--dataset synthetic" in message
    assert "\n" not in message


def test_cifar10_checksum_is_checked_unless_skipped(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path, per_batch=12, test=20)
    with pytest.raises(TrainingError) as caught:
        load_dataset("cifar10", (3, 32, 32), data_dir=tmp_path, download=False)
    assert "md5" in str(caught.value) and "--skip-checksum" in str(caught.value)
    assert not isinstance(caught.value, DatasetUnavailable)  # present but unverified, not absent

    data = load_dataset(
        "cifar10", (3, 32, 32), data_dir=tmp_path, download=False, skip_checksum=True
    )
    assert (len(data.train), len(data.test)) == (60, 20)
    assert data.class_names == CIFAR_CLASSES
    assert [data.mean, data.std] == [list(v) for v in PUBLISHED_STATS["cifar10"]]
    written, labels = class_images(12, (3, 32, 32), seed=11)  # data_batch_1
    image, label = data.train[0]
    np.testing.assert_array_equal((image.numpy() * 255).round().astype(np.uint8), written[0])
    assert label == labels[0]
    assert folder.is_dir()


def test_cifar10_as_grey_measures_its_own_stats(tmp_path: Path) -> None:
    write_cifar10(tmp_path, per_batch=10, test=10)
    data = load_dataset(
        "cifar10", (1, 32, 32), data_dir=tmp_path, download=False, skip_checksum=True
    )
    assert data.train[0][0].shape == (1, 32, 32)
    assert len(data.mean) == len(data.std) == 1
    pixels = torch.stack([data.train[i][0] for i in range(len(data.train))])
    assert data.mean[0] == pytest.approx(float(pixels.mean()), abs=1e-4)


def test_missing_cifar10_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(DatasetUnavailable, match="cifar-10-batches-py"):
        load_dataset("cifar10", (3, 32, 32), data_dir=tmp_path, download=False)


def test_image_folder_converts_channels_and_size(tmp_path: Path) -> None:
    write_image_folder(tmp_path, train_per_class=4, test_per_class=2, size=(40, 36))
    data = load_dataset("imagefolder", (1, 28, 28), data_dir=tmp_path)
    assert data.class_names == ["circle", "square", "stripes"]
    assert (len(data.train), len(data.test)) == (12, 6)
    image, _ = data.test[0]
    assert image.shape == (1, 28, 28) and 0.0 <= float(image.min()) <= float(image.max()) <= 1.0
    assert len(data.mean) == 1 and 0.0 < data.std[0] < 1.0


def _missing_test(root: Path) -> None:
    write_image_folder(root, train_per_class=2, test_per_class=1)
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "test").rmdir()


def _different_classes(root: Path) -> None:
    write_image_folder(root, train_per_class=2, test_per_class=1)
    (root / "test" / "stripes").rename(root / "test" / "zigzag")


def _empty_class(root: Path) -> None:
    write_image_folder(root, train_per_class=2, test_per_class=1)
    (root / "train" / "triangle").mkdir()


def _flat_images(root: Path) -> None:
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        (root / split / "a.png").write_bytes(b"not sorted into class folders")


def _corrupt_image(root: Path) -> None:
    write_image_folder(root, train_per_class=2, test_per_class=1)
    (root / "train" / "circle" / "broken.png").write_bytes(b"\x89PNG but not really")


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (_missing_test, "no test/ folder"),
        (_different_classes, "same class folders"),
        (_empty_class, "triangle"),
        (_flat_images, "train"),
        (_corrupt_image, "broken.png"),
    ],
)
def test_image_folder_layout_errors_are_clear(tmp_path: Path, make, expected: str) -> None:
    make(tmp_path)
    with pytest.raises(TrainingError) as caught:
        load_dataset("imagefolder", (3, 32, 32), data_dir=tmp_path)
    assert expected in str(caught.value)


def test_image_folder_that_does_not_exist(tmp_path: Path) -> None:
    with pytest.raises(TrainingError, match="does not exist"):
        load_dataset("imagefolder", (3, 32, 32), data_dir=tmp_path / "nowhere")


def test_synthetic_is_deterministic_balanced_and_labelled() -> None:
    first = load_dataset("synthetic", (3, 32, 32), synthetic_train_size=100, synthetic_test_size=40)
    again = load_dataset("synthetic", (3, 32, 32), synthetic_train_size=100, synthetic_test_size=40)
    other = load_dataset(
        "synthetic", (3, 32, 32), synthetic_train_size=100, synthetic_test_size=40, seed=1
    )
    images, labels = first.train.tensors
    assert images.shape == (100, 3, 32, 32) and images.dtype == torch.float32
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert torch.equal(images, again.train.tensors[0])
    assert not torch.equal(images, other.train.tensors[0])
    assert not torch.equal(first.test.tensors[0][:10], images[:10])  # test split is its own
    assert torch.bincount(labels).tolist() == [10] * 10
    assert first.synthetic and "SYNTHETIC" in first.describe()
    assert all(name.startswith("synthetic_") for name in first.class_names)


def test_unknown_dataset_is_a_user_error() -> None:
    with pytest.raises(TrainingError, match="imagenet"):
        load_dataset("imagenet", (3, 32, 32))
