"""Training, checkpoints, resume and evaluate, on synthetic data and real-format files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from dataset_files import write_cifar10, write_fashion_mnist, write_image_folder

from modelrepo import layout
from modelrepo.config import load_config
from training.checkpoint import load_checkpoint
from training.errors import TrainingError
from training.evaluate import evaluate_checkpoint, format_report
from training.export import export_checkpoint
from training.train import train

SMALL = {"synthetic_train_size": 400, "synthetic_test_size": 100, "device": "cpu"}


def quiet(_line: str) -> None:
    """Training logs go nowhere in these tests; what they report is checked from the results."""


def test_synthetic_training_beats_chance(trained_runs: dict[str, Any]) -> None:
    for arch, run in trained_runs.items():
        assert run.accuracy > 0.6, f"{arch}: {run.accuracy:.2%} after one epoch (chance 10%)"
        assert run.best.is_file() and run.last.is_file()


def test_checkpoint_holds_what_resume_evaluate_and_export_need(
    trained_checkpoints: dict[str, Path], trained_runs: dict[str, Any]
) -> None:
    state = load_checkpoint(trained_checkpoints["cifar10_cnn"])
    assert state["arch"] == "cifar10_cnn" and state["dataset"] == "synthetic"
    assert state["synthetic"] is True
    assert state["input_shape"] == [3, 32, 32]
    assert state["class_names"] == trained_runs["cifar10_cnn"].data.class_names
    assert len(state["mean"]) == len(state["std"]) == 3
    assert state["epoch"] == 1 and state["accuracy"] == trained_runs["cifar10_cnn"].accuracy
    assert state["optimizer"] == "adam" and state["optimizer_state"]["state"]
    assert state["args"]["epochs"] == 1 and state["args"]["seed"] == 0
    assert state["versions"]["torch"] == str(torch.__version__)
    assert state["versions"]["torchvision"] != "unknown"
    assert not list(trained_checkpoints["cifar10_cnn"].parent.glob(".*tmp*"))  # atomic save


def test_resume_continues_exactly_where_it_stopped(tmp_path: Path) -> None:
    straight = train(
        "lenet5", "synthetic", checkpoint_dir=tmp_path / "a", epochs=2, log=quiet, **SMALL
    )
    train("lenet5", "synthetic", checkpoint_dir=tmp_path / "b", epochs=1, log=quiet, **SMALL)
    lines: list[str] = []
    resumed = train(
        None,
        None,
        checkpoint_dir=tmp_path / "b",
        epochs=2,
        resume=tmp_path / "b" / "last.pt",
        log=lines.append,
        **SMALL,
    )
    assert any("at epoch 1" in line for line in lines)
    assert sum(line.startswith("epoch ") for line in lines) == 1  # only epoch 2 ran
    a, b = load_checkpoint(straight.last), load_checkpoint(resumed.last)
    assert b["epoch"] == 2 and b["arch"] == "lenet5"
    # Identical weights and Adam moments prove the optimizer state and epoch seed were restored.
    for key, value in a["model_state"].items():
        torch.testing.assert_close(b["model_state"][key], value, rtol=0, atol=1e-6)
    for index, moments in a["optimizer_state"]["state"].items():
        other = b["optimizer_state"]["state"][index]
        torch.testing.assert_close(other["exp_avg"], moments["exp_avg"], rtol=0, atol=1e-6)
        assert int(other["step"]) == int(moments["step"])
    assert b["accuracy"] == a["accuracy"]


def test_resume_refuses_a_finished_or_mismatched_checkpoint(
    trained_checkpoints: dict[str, Path], tmp_path: Path
) -> None:
    ckpt = trained_checkpoints["fashion_mlp"]
    with pytest.raises(TrainingError, match="already at epoch 1"):
        train(None, None, checkpoint_dir=tmp_path, epochs=1, resume=ckpt, log=quiet, **SMALL)
    with pytest.raises(TrainingError, match="architecture 'fashion_mlp'"):
        train("lenet5", None, checkpoint_dir=tmp_path, epochs=2, resume=ckpt, log=quiet)


def test_evaluate_agrees_with_the_accuracy_recorded_at_training(
    trained_checkpoints: dict[str, Path],
) -> None:
    for ckpt in trained_checkpoints.values():
        report = evaluate_checkpoint(ckpt, device="cpu", log=quiet)
        assert report.evaluation.accuracy == load_checkpoint(ckpt)["accuracy"]
        assert int(report.evaluation.confusion.sum()) == 200
        text = format_report(report)
        assert f"accuracy: {report.evaluation.accuracy:.2%}" in text
        assert "SYNTHETIC" in text and "synthetic_9" in text


def test_training_on_fashion_mnist_files(tmp_path: Path) -> None:
    write_fashion_mnist(tmp_path / "data", train=300, test=100)
    run = train(
        "fashion_mlp",
        "fashion-mnist",
        data_dir=tmp_path / "data",
        download=False,
        checkpoint_dir=tmp_path / "ck",
        epochs=1,
        batch_size=32,
        device="cpu",
        log=quiet,
    )
    assert run.accuracy > 0.5
    state = load_checkpoint(run.best)
    assert state["class_names"][0] == "T-shirt/top" and state["mean"] == [0.2860]
    assert state["synthetic"] is False


def test_training_on_cifar10_files_needs_the_checksum_flag(tmp_path: Path) -> None:
    write_cifar10(tmp_path / "data", per_batch=40, test=100)
    options = {"data_dir": tmp_path / "data", "download": False, "device": "cpu", "log": quiet}
    with pytest.raises(TrainingError, match="--skip-checksum"):
        train("cifar10_cnn", "cifar10", checkpoint_dir=tmp_path / "ck", **options)
    run = train(
        "cifar10_cnn",
        "cifar10",
        checkpoint_dir=tmp_path / "ck",
        epochs=1,
        batch_size=20,
        skip_checksum=True,
        **options,
    )
    assert run.accuracy > 0.3
    assert load_checkpoint(run.best)["args"]["skip_checksum"] is True
    again = evaluate_checkpoint(run.best, skip_checksum=True, download=False, log=quiet)
    assert again.evaluation.accuracy == pytest.approx(run.accuracy)


def test_image_folder_trains_and_exports_with_its_own_classes(tmp_path: Path) -> None:
    folder = write_image_folder(tmp_path / "shapes", train_per_class=30, test_per_class=10)
    run = train(
        "lenet5",
        "imagefolder",
        data_dir=folder,
        checkpoint_dir=tmp_path / "ck",
        epochs=3,
        batch_size=16,
        device="cpu",
        log=quiet,
    )
    assert run.accuracy > 0.5  # chance is 1/3
    version = export_checkpoint(run.best, tmp_path / "repo", "shapes", data=run.data, log=quiet)
    config = load_config(version.parent / layout.CONFIG_FILE)
    assert list(config.input[0].dims) == [1, 32, 32]
    assert list(config.output[0].dims) == [3]
    assert layout.read_labels(version.parent / layout.LABELS_FILE) == [
        "circle",
        "square",
        "stripes",
    ]
    session = ort.InferenceSession(str(version / layout.ONNX_FILE))
    images = run.data.test and torch.stack([run.data.test[i][0] for i in range(4)]).numpy()
    (probabilities,) = session.run(None, {"input": images})
    assert probabilities.shape == (4, 3)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
