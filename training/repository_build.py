"""`python -m training build-repository`: the FashionMNIST and CIFAR10 models `make run` serves.

Uses the real datasets when they are on disk or downloadable; otherwise trains on the synthetic
dataset under a banner nobody can miss, so an offline machine still gets a servable repository.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from modelrepo import layout
from training import synthetic
from training.data import DataBundle, DatasetUnavailable, load_dataset
from training.errors import TrainingError
from training.export import export_checkpoint
from training.models import input_shape
from training.reduced import PrecisionOptions
from training.train import train


@dataclass(frozen=True)
class RepositoryModel:
    name: str  # folder in the repository
    arch: str
    dataset: str
    title: str  # how people call the dataset


MODELS = (
    RepositoryModel("fashion_mnist", "fashion_mlp", "fashion-mnist", "FashionMNIST"),
    RepositoryModel("cifar10", "cifar10_cnn", "cifar10", "CIFAR10"),
)


def synthetic_banner(title: str, reason: str) -> str:
    rule = "=" * 78
    return (
        f"{rule}\n"
        f"{title} not available offline: training on the SYNTHETIC dataset;\n"
        f"predictions are meaningless for real images.\n"
        f"({reason})\n"
        f"{rule}"
    )


def build_repository(
    repository: Path | str,
    *,
    data_dir: Path | str = "data",
    epochs: int = 3,
    device: str = "auto",
    checkpoint_dir: Path | str = "checkpoints",
    force: bool = False,
    download: bool = True,
    skip_checksum: bool = False,
    batch_size: int = 64,
    synthetic_train_size: int = synthetic.DEFAULT_TRAIN_SIZE,
    synthetic_test_size: int = synthetic.DEFAULT_TEST_SIZE,
    models: tuple[RepositoryModel, ...] = MODELS,
    precision: PrecisionOptions | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Path | None]:
    """Train and export each model; name -> new version folder, or None where one was kept.

    `precision` (default fp32) is every model's export precision and accuracy gate.
    """
    options = precision or PrecisionOptions()
    options.check("onnx")
    repo = Path(repository)
    _check_writable(repo)
    results: dict[str, Path | None] = {}
    for model in models:
        existing = layout.list_versions(repo / model.name)
        if existing and not force:
            log(
                f"{model.name}: version(s) {existing} already in {repo}; skipping "
                "(--force trains again and adds a new version)"
            )
            results[model.name] = None
            continue
        log(f"{model.name}: {model.arch} on {model.title}")
        data = _data(
            model, data_dir, download, skip_checksum, synthetic_train_size, synthetic_test_size, log
        )
        run = train(
            model.arch,
            data.name,
            checkpoint_dir=Path(checkpoint_dir) / model.name,
            epochs=epochs,
            batch_size=batch_size,
            device=device,
            data_dir=data_dir,
            skip_checksum=skip_checksum,
            data=data,
            log=log,
        )
        try:
            version = export_checkpoint(
                run.best, repo, model.name, "onnx", data=data, precision=options, log=log
            )
        except TrainingError as exc:
            raise TrainingError(
                f"{model.name}: {exc} (or delete {repo / model.name} to rebuild it from scratch)"
            ) from None
        results[model.name] = version
    return results


def _check_writable(repo: Path) -> None:
    """Refuse before training, not after: a repository that cannot be written would cost
    the whole training run first."""
    try:
        repo.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=repo):
            pass
    except OSError as exc:
        raise TrainingError(
            f"cannot write the model repository {repo}: {exc.strerror or exc}"
        ) from None


def _data(
    model: RepositoryModel,
    data_dir: Path | str,
    download: bool,
    skip_checksum: bool,
    train_size: int,
    test_size: int,
    log: Callable[[str], None],
) -> DataBundle:
    shape = input_shape(model.arch)
    try:
        return load_dataset(
            model.dataset,
            shape,
            data_dir=data_dir,
            download=download,
            skip_checksum=skip_checksum,
            log=log,
        )
    except DatasetUnavailable as exc:
        log(synthetic_banner(model.title, str(exc)))
    return load_dataset(
        "synthetic", shape, synthetic_train_size=train_size, synthetic_test_size=test_size
    )


def main(args: argparse.Namespace) -> int:
    results = build_repository(
        args.model_repository,
        data_dir=args.data_dir,
        epochs=args.epochs,
        device=args.device,
        checkpoint_dir=args.checkpoint_dir,
        force=args.force,
        download=not args.no_download,
        skip_checksum=args.skip_checksum,
        batch_size=args.batch_size,
        synthetic_train_size=args.synthetic_train_size,
        synthetic_test_size=args.synthetic_test_size,
        precision=PrecisionOptions(args.precision, args.max_accuracy_drop),
    )
    built = [name for name, version in results.items() if version is not None]
    print(f"model repository {args.model_repository}: built {built or 'nothing new'}")
    return 0
