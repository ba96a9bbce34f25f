"""The `python -m training` command line: help, user errors without tracebacks, the happy path,
and build-repository offline."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dataset_files import write_cifar10, write_image_folder

from modelrepo import layout
from modelrepo.config import load_config
from training.checkpoint import load_checkpoint
from training.cli import main

ROOT = Path(__file__).resolve().parent.parent
SUBPROCESS_TIMEOUT_S = 120


def command(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "training", *map(str, args)]


def corrupt_checkpoint(tmp: Path) -> Path:
    path = tmp / "corrupt.pt"
    path.write_bytes(b"this is not a checkpoint" * 10)
    return path


def image_folder_without_test(tmp: Path) -> Path:
    root = write_image_folder(tmp / "no_test", train_per_class=2, test_per_class=1)
    for path in sorted((root / "test").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    (root / "test").rmdir()
    return root


@pytest.fixture(scope="module")
def bad_runs(
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, tuple[subprocess.CompletedProcess, str]]:
    """The bad commands run as real processes, all at once: each pays for importing torch,
    so they overlap that cost. case -> (result, a phrase the one-line error must contain)."""
    tmp = tmp_path_factory.mktemp("bad_cli")
    ck = ["--checkpoint-dir", str(tmp / "ck")]
    cases = {
        "missing dataset": (
            command(
                "train",
                "--arch",
                "fashion_mlp",
                "--dataset",
                "fashion-mnist",
                "--data-dir",
                tmp / "empty",
                "--no-download",
                *ck,
            ),
            "FashionMNIST not found",
        ),
        "corrupt checkpoint": (
            command("evaluate", corrupt_checkpoint(tmp), "--dataset", "synthetic"),
            "not a readable checkpoint",
        ),
        "unknown architecture": (
            command("train", "--arch", "resnet50", "--dataset", "synthetic", *ck),
            "invalid choice: 'resnet50'",
        ),
        "wrong image-folder layout": (
            command(
                "train",
                "--arch",
                "lenet5",
                "--dataset",
                "imagefolder",
                "--data-dir",
                image_folder_without_test(tmp),
                *ck,
            ),
            "no test/ folder",
        ),
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    running = {
        name: subprocess.Popen(
            argv, cwd=tmp, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, (argv, _) in cases.items()
    }
    results = {}
    for name, process in running.items():
        out, err = process.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        completed = subprocess.CompletedProcess(process.args, process.returncode, out, err)
        results[name] = (completed, cases[name][1])
    return results


@pytest.mark.parametrize(
    "case",
    ["missing dataset", "corrupt checkpoint", "unknown architecture", "wrong image-folder layout"],
)
def test_user_errors_are_one_clear_line(bad_runs: dict[str, Any], case: str) -> None:
    result, phrase = bad_runs[case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1, result.stderr
    assert phrase in error_lines[0]


def test_more_user_errors_in_process(
    tmp_path: Path, trained_checkpoints: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """The same entry point, called in this process (no torch import per case)."""
    write_cifar10(tmp_path / "cifar", per_batch=4, test=4)
    repo = ["--model-repository", str(tmp_path / "repo"), "--name", "m"]
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    cases = [
        (["export", str(corrupt_checkpoint(tmp_path)), *repo], "not a readable checkpoint"),
        (["export", str(tmp_path / "nope.pt"), *repo], "nope.pt not found"),
        (["train", "--arch", "cifar10_cnn", "--dataset", "cifar10", "--data-dir",
          str(tmp_path / "cifar"), "--checkpoint-dir", str(tmp_path / "ck")], "--skip-checksum"),
        (["train", "--dataset", "synthetic", "--checkpoint-dir", str(tmp_path / "ck")], "--arch"),
        (["evaluate", str(trained_checkpoints["fashion_mlp"]), "--dataset", "imagefolder",
          "--data-dir", str(tmp_path / "nowhere")], "does not exist"),
        # refused before any training: the repository cannot be written (a file is in the way)
        (["build-repository", "--model-repository", str(a_file / "repo"), "--no-download"],
         f"cannot write the model repository {a_file / 'repo'}"),
    ]  # fmt: skip
    for argv, phrase in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and phrase in err, err
    with pytest.raises(SystemExit) as exited:
        main(["export", str(trained_checkpoints["fashion_mlp"]), *repo, "--max-batch-size", "0"])
    assert exited.value.code == 2
    assert "must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "repo").exists()
    # An export that cannot write where it is told: one line naming the path, no traceback.
    unwritable = ["--model-repository", str(a_file / "repo"), "--name", "m"]
    assert main(["export", str(trained_checkpoints["fashion_mlp"]), *unwritable]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and str(a_file) in err, err


def test_every_option_is_explained(capsys: pytest.CaptureFixture[str]) -> None:
    expected = {
        "train": ["--arch", "--dataset", "--data-dir", "--epochs", "--batch-size", "--lr",
                  "--optimizer", "--device", "--seed", "--checkpoint-dir", "--resume",
                  "--skip-checksum", "--no-download"],
        "evaluate": ["--dataset", "--data-dir", "--confusion-png", "--device"],
        "export": ["--model-repository", "--name", "--format", "--max-batch-size",
                   "--instance-count", "--max-queue-delay-us", "--precision",
                   "--max-accuracy-drop", "--calibration-images", "--per-channel",
                   "--int8-format"],
        "build-repository": ["--model-repository", "--data-dir", "--epochs", "--device",
                             "--checkpoint-dir", "--force", "--precision", "--max-accuracy-drop"],
    }  # fmt: skip
    for subcommand, options in expected.items():
        with pytest.raises(SystemExit) as exited:
            main([subcommand, "--help"])
        assert exited.value.code == 0
        text = capsys.readouterr().out
        for option in options:
            assert option in text, f"{subcommand} --help does not mention {option}"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "build-repository" in capsys.readouterr().out


def test_train_evaluate_export_through_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sizes = ["--synthetic-train-size", "300", "--synthetic-test-size", "100"]
    ck = tmp_path / "ck"
    train = ["train", "--arch", "fashion_mlp", "--dataset", "synthetic", "--device", "cpu"]
    assert main([*train, "--epochs", "1", "--checkpoint-dir", str(ck), *sizes]) == 0
    assert main([*train, "--epochs", "2", "--checkpoint-dir", str(ck), *sizes,
                 "--resume", str(ck / "last.pt")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "SYNTHETIC" in out and "resuming fashion_mlp" in out and "epoch 2/2" in out
    state = load_checkpoint(ck / "last.pt")
    assert state["epoch"] == 2

    png = tmp_path / "confusion.png"
    assert (
        main(["evaluate", str(ck / "last.pt"), "--device", "cpu", "--confusion-png", str(png)]) == 0
    )
    out = capsys.readouterr().out
    assert f"accuracy: {state['accuracy']:.2%}" in out
    assert "confusion matrix" in out and "per-class accuracy" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    repo = tmp_path / "repo"
    export = ["export", str(ck / "best.pt"), "--model-repository", str(repo), "--name", "fm"]
    assert main([*export, "--format", "torchscript", "--max-queue-delay-us", "0"]) == 0
    config = load_config(repo / "fm" / layout.CONFIG_FILE)
    assert config.platform == layout.PLATFORM_TORCHSCRIPT
    assert config.HasField("dynamic_batching")
    assert "on dataset images" in capsys.readouterr().out


def test_build_repository_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["build-repository", "--model-repository", tmp_path / "repo", "--data-dir",
            tmp_path / "data", "--checkpoint-dir", tmp_path / "ck", "--epochs", "1",
            "--device", "cpu", "--no-download", "--synthetic-train-size", "200",
            "--synthetic-test-size", "50"]  # fmt: skip
    assert main([str(a) for a in args]) == 0
    first = capsys.readouterr().out
    for title in ("FashionMNIST", "CIFAR10"):
        banner = f"{title} not available offline: training on the SYNTHETIC dataset"
        assert banner in first
    assert "predictions are meaningless for real images" in first
    for name, dims in (("fashion_mnist", [1, 28, 28]), ("cifar10", [3, 32, 32])):
        model_dir = tmp_path / "repo" / name
        assert layout.list_versions(model_dir) == [1]
        assert (model_dir / "1" / layout.ONNX_FILE).is_file()
        config = load_config(model_dir / layout.CONFIG_FILE)
        assert config.platform == layout.PLATFORM_ONNX and list(config.input[0].dims) == dims
        assert layout.read_labels(model_dir / layout.LABELS_FILE)[0] == "synthetic_0"

    assert main([str(a) for a in args]) == 0
    out = capsys.readouterr().out
    assert out.count("skipping") == 2 and "built nothing new" in out
    assert layout.list_versions(tmp_path / "repo" / "cifar10") == [1]

    assert main([str(a) for a in args] + ["--force"]) == 0
    assert layout.list_versions(tmp_path / "repo" / "fashion_mnist") == [1, 2]

    # --precision reaches the export: an int8 version cannot join the fp32 model.
    capsys.readouterr()
    assert main([str(a) for a in args] + ["--force", "--precision", "int8"]) == 2
    assert "fashion_mnist holds fp32 versions" in capsys.readouterr().err
    assert layout.list_versions(tmp_path / "repo" / "fashion_mnist") == [1, 2]
