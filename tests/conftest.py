"""Shared fixtures: small trained checkpoints and a model repository built by the real pipeline.

torch is imported inside the fixtures, so test modules that never ask for them (most server
tests) do not pay for importing it.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest

# Small synthetic splits: enough to learn the classes in one epoch, cheap to build on 2 cores.
FIXTURE_TRAIN_SIZE = 1000
FIXTURE_TEST_SIZE = 200
FIXTURE_MODELS = {"fashion_mlp": "fashion_mnist", "cifar10_cnn": "cifar10"}


@pytest.fixture(scope="session")
def trained_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """arch -> training.train.TrainResult (checkpoints plus the synthetic data they saw)."""
    from training.train import train

    root = tmp_path_factory.mktemp("checkpoints")
    return {
        arch: train(
            arch,
            "synthetic",
            checkpoint_dir=root / arch,
            epochs=1,
            synthetic_train_size=FIXTURE_TRAIN_SIZE,
            synthetic_test_size=FIXTURE_TEST_SIZE,
            device="cpu",
            progress=False,
            log=lambda _line: None,
        )
        for arch in FIXTURE_MODELS
    }


@pytest.fixture(scope="session")
def trained_checkpoints(trained_runs: dict[str, Any]) -> dict[str, Path]:
    """arch -> best.pt for `fashion_mlp` and `cifar10_cnn` (1 epoch on synthetic data)."""
    return {arch: run.best for arch, run in trained_runs.items()}


@pytest.fixture(scope="session")
def model_repository(
    trained_runs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A repository with `fashion_mnist` (ONNX), `fashion_mnist_ts` (the same checkpoint as
    TorchScript) and `cifar10` (ONNX), each at version 1. Shared: copy it before changing it."""
    from training.export import export_checkpoint

    repo = tmp_path_factory.mktemp("model_repository")
    quiet = {"log": lambda _line: None}
    fashion, cifar = trained_runs["fashion_mlp"], trained_runs["cifar10_cnn"]
    export_checkpoint(fashion.best, repo, "fashion_mnist", "onnx", data=fashion.data, **quiet)
    export_checkpoint(
        fashion.best, repo, "fashion_mnist_ts", "torchscript", data=fashion.data, **quiet
    )
    export_checkpoint(cifar.best, repo, "cifar10", "onnx", data=cifar.data, **quiet)
    return repo


@pytest.fixture
def writable_repository(model_repository: Path, tmp_path: Path) -> Path:
    """A private copy of `model_repository` that a test may change."""
    copy = tmp_path / "model_repository"
    shutil.copytree(model_repository, copy)
    return copy
