"""Reduced-precision exports (int8, fp16): the accuracy gate, what is recorded, and serving
them through a real server to a real client within the recorded tolerance."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
import tritonclient.grpc as triton
from server_process import PROJECT_ROOT, ServerProcess

from client import ClassifierClient
from modelrepo import layout
from modelrepo.config import load_config, write_config
from modelrepo.precision import (
    ACCURACY_PARAMETER,
    FP32_ACCURACY_PARAMETER,
    PRECISION_PARAMETER,
    QUANTIZATION_PARAMETER,
    REFERENCE_TOLERANCES,
)
from server.config import Settings
from server.core.loading import prepare_version
from server.core.repository import RepositoryError, read_model
from server.runtimes import RuntimeLoadError
from training.cli import main
from training.errors import TrainingError
from training.export import export_checkpoint
from training.reduced import PrecisionOptions

# name -> (architecture, precision, format)
EXPORTS = {
    "fashion_mnist_int8": ("fashion_mlp", "int8", "onnx"),
    "cifar10_int8": ("cifar10_cnn", "int8", "onnx"),
    "fashion_mnist_fp16": ("fashion_mlp", "fp16", "both"),
}
# The fp16 export's TorchScript file, served by libtorch (its folder, config changed).
TORCHSCRIPT_FP16 = "fashion_mnist_fp16_ts"


def quiet(_line: str) -> None:
    """Export logs are not what these tests check."""


@pytest.fixture(scope="module")
def reduced_repository(
    trained_runs: dict[str, Any], tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The session's checkpoints (1 epoch on synthetic data) exported at reduced precision with
    the default gate (1 point), plus the fp16 TorchScript file as a model of its own."""
    repo = tmp_path_factory.mktemp("reduced_repository")
    for name, (arch, precision, fmt) in EXPORTS.items():
        run = trained_runs[arch]
        options = PrecisionOptions(precision)
        export_checkpoint(run.best, repo, name, fmt, data=run.data, precision=options, log=quiet)
    shutil.copytree(repo / "fashion_mnist_fp16", repo / TORCHSCRIPT_FP16)
    config = load_config(repo / TORCHSCRIPT_FP16 / layout.CONFIG_FILE)
    config.name, config.platform = TORCHSCRIPT_FP16, layout.PLATFORM_TORCHSCRIPT
    write_config(repo / TORCHSCRIPT_FP16 / layout.CONFIG_FILE, config)
    return repo


@pytest.fixture(scope="module")
def server(reduced_repository: Path) -> Iterator[ServerProcess]:
    with ServerProcess(reduced_repository) as process:
        yield process


def parameters(model_dir: Path) -> dict[str, str]:
    config = load_config(model_dir / layout.CONFIG_FILE)
    return {key: value.string_value for key, value in config.parameters.items()}


@pytest.mark.parametrize("name", ["fashion_mnist_int8", "cifar10_int8"])
def test_int8_export_passes_the_gate_and_records_it(reduced_repository: Path, name: str) -> None:
    model_dir = reduced_repository / name
    recorded = parameters(model_dir)
    assert recorded[PRECISION_PARAMETER] == "int8"
    accuracy, fp32 = float(recorded[ACCURACY_PARAMETER]), float(recorded[FP32_ACCURACY_PARAMETER])
    assert 0.5 < fp32 <= 1.0 and fp32 - accuracy <= 0.01  # the default gate: 1 point
    assert "QDQ" in recorded[QUANTIZATION_PARAMETER]
    assert "calibration on 1000 training images" in recorded[QUANTIZATION_PARAMETER]

    assert {p.name for p in (model_dir / "1").iterdir()} == {
        layout.ONNX_FILE,
        layout.REFERENCE_FILE,
    }
    graph = onnx.load(str(model_dir / "1" / layout.ONNX_FILE)).graph
    ops = [node.op_type for node in graph.node]
    assert "QuantizeLinear" in ops and "DequantizeLinear" in ops
    weights = {init.name: init.data_type for init in graph.initializer}
    assert onnx.TensorProto.INT8 in weights.values()  # the weights are stored as int8
    # The wire contract does not change: float32 pixels in, float32 probabilities out,
    # and the softmax stays float (not quantized to steps of 1/256).
    assert [(i.name, i.type.tensor_type.elem_type) for i in graph.input] == [
        (layout.INPUT_NAME, onnx.TensorProto.FLOAT)
    ]
    assert [(o.name, o.type.tensor_type.elem_type) for o in graph.output] == [
        (layout.OUTPUT_NAME, onnx.TensorProto.FLOAT)
    ]
    softmax = next(node for node in graph.node if node.op_type == "Softmax")
    assert softmax.output[0] == layout.OUTPUT_NAME

    with np.load(model_dir / "1" / layout.REFERENCE_FILE) as reference:
        assert str(reference["precision"]) == "int8"
        assert float(reference["tolerance"]) == REFERENCE_TOLERANCES["int8"]
        np.testing.assert_allclose(reference["outputs"].sum(axis=1), 1.0, atol=1e-5)


def test_fp16_export_keeps_float32_io(reduced_repository: Path) -> None:
    model_dir = reduced_repository / "fashion_mnist_fp16"
    assert parameters(model_dir)[PRECISION_PARAMETER] == "fp16"
    assert QUANTIZATION_PARAMETER not in parameters(model_dir)
    graph = onnx.load(str(model_dir / "1" / layout.ONNX_FILE)).graph
    assert {init.data_type for init in graph.initializer if len(init.dims) > 1} == {
        onnx.TensorProto.FLOAT16
    }
    assert graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    with np.load(model_dir / "1" / layout.REFERENCE_FILE) as reference:
        assert str(reference["precision"]) == "fp16"
        assert float(reference["tolerance"]) == REFERENCE_TOLERANCES["fp16"]


def test_reduced_models_serve_within_their_tolerance(
    server: ServerProcess, reduced_repository: Path
) -> None:
    """Real server, real client: answers on the reference images match what export recorded,
    and the precision shows in the model list, ModelConfig and the info metric."""
    names = [*EXPORTS, TORCHSCRIPT_FP16]
    with ClassifierClient(server.target, timeout=30.0) as client:
        listed = {m.name: m for m in client.list_models()}
        for name in names:
            assert listed[name].ready, listed[name].reason
            precision = parameters(reduced_repository / name)[PRECISION_PARAMETER]
            assert listed[name].precision == precision
            with np.load(reduced_repository / name / "1" / layout.REFERENCE_FILE) as reference:
                inputs, outputs = reference["inputs"], reference["outputs"]
                tolerance = float(reference["tolerance"])
            results = client.classify(name, inputs, top_k=1)
            got = np.array([r.probabilities for r in results], dtype=np.float32)
            assert got.shape == outputs.shape
            assert np.max(np.abs(got - outputs)) <= tolerance, name
            assert [r.top[0].index for r in results] == list(outputs.argmax(axis=1))
    assert listed[TORCHSCRIPT_FP16].platform == layout.PLATFORM_TORCHSCRIPT

    kserve = triton.InferenceServerClient(server.target)
    try:
        config = kserve.get_model_config("cifar10_int8", as_json=True)["config"]
    finally:
        kserve.close()
    assert config["parameters"][PRECISION_PARAMETER] == {"string_value": "int8"}

    for name in names:
        precision = listed[name].precision
        assert server.metric("imgserve_model_info", model=name, precision=precision) == 1


def test_cli_lists_the_precision(server: ServerProcess) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "client", "models", "--server", server.target],
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    header, *lines = done.stdout.splitlines()
    assert "PRECISION" in header.split()
    rows = {line.split()[0]: line.split() for line in lines}
    assert rows["cifar10_int8"][4] == "int8"
    assert rows[TORCHSCRIPT_FP16][3:5] == [layout.PLATFORM_TORCHSCRIPT, "fp16"]


def _snapshot(model_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(model_dir)): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()
    }


def test_damaged_calibration_is_refused(
    trained_runs: dict[str, Any], reduced_repository: Path, tmp_path: Path
) -> None:
    """Calibrating on pixels in 0..255 (the model takes [0, 1]) ruins the activation ranges:
    the gate refuses, says both accuracies, and the model folder is left as it was."""
    repo = tmp_path / "repo"
    shutil.copytree(reduced_repository / "cifar10_int8", repo / "cifar10_int8")
    before = _snapshot(repo / "cifar10_int8")
    run = trained_runs["cifar10_cnn"]
    damaged = run.data.train.tensors[0][:256] * 255
    options = PrecisionOptions("int8", calibration=damaged)
    with pytest.raises(TrainingError) as refused:
        export_checkpoint(
            run.best, repo, "cifar10_int8", data=run.data, precision=options, log=quiet
        )
    message = str(refused.value)
    fp32 = float(parameters(repo / "cifar10_int8")[FP32_ACCURACY_PARAMETER])
    assert f"fp32 {fp32:.2%}" in message and "int8 " in message
    assert "more than --max-accuracy-drop 1" in message and "nothing written" in message
    assert _snapshot(repo / "cifar10_int8") == before
    assert [p.name for p in (repo / "cifar10_int8").iterdir() if p.name.startswith(".")] == []


def test_impossible_gate_is_a_usage_error(
    trained_checkpoints: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = tmp_path / "repo"
    args = ["export", str(trained_checkpoints["fashion_mlp"]), "--model-repository", str(repo)]
    with pytest.raises(SystemExit) as exited:
        main([*args, "--name", "m", "--precision", "int8", "--max-accuracy-drop", "-1"])
    assert exited.value.code == 2
    assert "--max-accuracy-drop: must be a non-negative number" in capsys.readouterr().err
    assert main([*args, "--name", "m", "--precision", "int8", "--format", "both"]) == 2
    assert "exists only as ONNX" in capsys.readouterr().err
    assert main([*args, "--name", "m", "--precision", "fp16", "--random-reference"]) == 2
    assert "--random-reference" in capsys.readouterr().err
    assert not repo.exists()


@pytest.mark.parametrize(
    ("options", "data", "expected"),
    [
        ({"precision": "int4"}, True, "unknown precision 'int4'"),
        ({"precision": "int8", "max_accuracy_drop": float("nan")}, True, "non-negative"),
        ({"precision": "int8", "calibration_images": 0}, True, "--calibration-images"),
        ({"precision": "int8"}, False, "needs the checkpoint's dataset"),
    ],
)
def test_bad_precision_options(
    trained_runs: dict[str, Any], tmp_path: Path, options: dict, data: bool, expected: str
) -> None:
    run = trained_runs["fashion_mlp"]
    with pytest.raises(TrainingError, match=expected):
        export_checkpoint(
            run.best,
            tmp_path,
            "m",
            data=run.data if data else None,
            precision=PrecisionOptions(**options),
            log=quiet,
        )
    assert not (tmp_path / "m").exists()


def test_a_model_keeps_its_precision(
    trained_runs: dict[str, Any], writable_repository: Path
) -> None:
    """Versions share config.pbtxt: an int8 export into an fp32 model (whose config, written
    before precisions were recorded or not, says fp32) is refused, and the reverse too."""
    run = trained_runs["fashion_mlp"]
    model_dir = writable_repository / "fashion_mnist"
    before = _snapshot(model_dir)
    with pytest.raises(TrainingError, match=r"holds fp32 versions.*fashion_mnist_int8"):
        export_checkpoint(
            run.best,
            writable_repository,
            "fashion_mnist",
            data=run.data,
            precision=PrecisionOptions("int8"),
            log=quiet,
        )
    config = load_config(model_dir / layout.CONFIG_FILE)
    del config.parameters[PRECISION_PARAMETER]  # as an export from before precisions wrote it
    write_config(model_dir / layout.CONFIG_FILE, config)
    with pytest.raises(TrainingError, match="holds fp32 versions"):
        export_checkpoint(
            run.best,
            writable_repository,
            "fashion_mnist",
            data=run.data,
            precision=PrecisionOptions("fp16"),
            log=quiet,
        )
    assert {k: v for k, v in _snapshot(model_dir).items() if k != layout.CONFIG_FILE} == {
        k: v for k, v in before.items() if k != layout.CONFIG_FILE
    }


def _load(repo: Path, name: str, tolerance: float = 1e-4) -> None:
    settings = Settings(model_repository=repo, reference_tolerance=tolerance)
    spec = read_model(repo, name, settings)
    for runtime in prepare_version(spec, spec.versions[-1], settings, threading.Event()).runtimes:
        runtime.close()


def test_the_load_check_uses_the_recorded_precision_and_tolerance(
    reduced_repository: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(reduced_repository / "fashion_mnist_int8", repo / "m")
    model_dir = repo / "m"
    config = load_config(model_dir / layout.CONFIG_FILE)
    config.name = "m"
    write_config(model_dir / layout.CONFIG_FILE, config)
    reference_path = model_dir / "1" / layout.REFERENCE_FILE
    with np.load(reference_path) as saved:
        reference = dict(saved)
    _load(repo, "m")  # as exported: passes the check under the server's default 1e-4

    def record(outputs: np.ndarray) -> None:
        np.savez(reference_path, **{**reference, "outputs": outputs})

    # The recorded tolerance (2e-2) applies, not the server's 1e-4 ...
    record(reference["outputs"] + 5e-3)
    _load(repo, "m")
    # ... and still fails outputs that are not the model's (the classes shifted by one) ...
    record(np.roll(reference["outputs"], 1, axis=1))
    with pytest.raises(RuntimeLoadError, match="reference check failed"):
        _load(repo, "m")
    # ... unless the operator's --reference-tolerance is looser still: the larger applies.
    _load(repo, "m", tolerance=0.999)

    np.savez(reference_path, **reference)
    del config.parameters[PRECISION_PARAMETER]
    write_config(model_dir / layout.CONFIG_FILE, config)
    with pytest.raises(RuntimeLoadError, match=r"exported at int8, but config\.pbtxt says fp32"):
        _load(repo, "m")
    config.parameters[PRECISION_PARAMETER].string_value = "int4"
    write_config(model_dir / layout.CONFIG_FILE, config)
    with pytest.raises(RepositoryError, match="unknown precision 'int4'"):
        _load(repo, "m")


def test_the_gate_refuses_exactly_past_the_allowed_drop(trained_runs: dict[str, Any]) -> None:
    """The gate counts images: a model that gets k more test images wrong than fp32 loses
    100 k / N points, passes a gate of exactly that, and is refused by any tighter one."""
    from training import gate
    from training.checkpoint import classifier_from_checkpoint, load_checkpoint

    run = trained_runs["fashion_mlp"]
    model = classifier_from_checkpoint(load_checkpoint(run.best)).probabilities().eval()

    def fp32(x: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return model(x).numpy()

    def worse(x: torch.Tensor) -> np.ndarray:
        out = fp32(x)
        out[0] = np.roll(out[0], 1)  # the first image of every batch answers another class
        return out

    same = gate.measure(fp32, {"ONNX": fp32}, run.data, "int8", progress=False)
    assert same.images == len(run.data.test) and same.drop_points("ONNX") == 0
    gate.enforce(same, 0.0, "synthetic")

    result = gate.measure(fp32, {"ONNX": worse}, run.data, "int8", progress=False)
    lost = result.fp32_correct - result.correct["ONNX"]
    assert lost >= 1  # the fixture's model gets the first image of a batch right
    drop = 100.0 * lost / result.images
    assert result.drop_points("ONNX") == pytest.approx(drop)
    gate.enforce(result, drop, "synthetic")
    with pytest.raises(TrainingError, match=f"loses {drop:.2f} points"):
        gate.enforce(result, drop - 0.01, "synthetic")


def test_precision_benchmark_compares_pairs_side_by_side(
    model_repository: Path, reduced_repository: Path, tmp_path: Path
) -> None:
    """`python -m benchmarks precision`, short: the pair found by name, both measured alone
    and served, the recorded accuracies beside them, ratios that follow from the figures."""
    repo = tmp_path / "repo"
    shutil.copytree(model_repository / "fashion_mnist", repo / "fashion_mnist")
    shutil.copytree(reduced_repository / "fashion_mnist_int8", repo / "fashion_mnist_int8")
    out = tmp_path / "precision.json"
    command = [
        sys.executable, "-m", "benchmarks", "precision", "--model-repository", str(repo),
        "--duration", "0.3", "--warmup", "0.1", "--rounds", "1", "--ceiling-seconds", "0.05",
        "--concurrency", "2", "--batch", "2", "--out", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command,
        cwd=PROJECT_ROOT,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "int8 / fp32" in done.stdout
    report = json.loads(out.read_text())
    (pair,) = report["pairs"]
    fp32, int8 = pair["fp32"], pair["reduced"]
    assert (fp32["name"], fp32["precision"]) == ("fashion_mnist", "fp32")
    assert (int8["name"], int8["precision"]) == ("fashion_mnist_int8", "int8")
    recorded = parameters(repo / "fashion_mnist_int8")
    assert int8["accuracy"] == float(recorded[ACCURACY_PARAMETER])
    assert fp32["accuracy"] == float(recorded[FP32_ACCURACY_PARAMETER])
    for model in (fp32, int8):
        assert set(model["alone_images_per_s"]) == {"1", "64"}
        assert model["served"]["requests"] > 0 and model["served"]["errors"] == {}
    served = int8["served"]["images_per_s"] / fp32["served"]["images_per_s"]
    assert pair["ratios"]["served_images_per_s"] == pytest.approx(served, rel=1e-2)
    alone = int8["alone_images_per_s"]["64"][0] / fp32["alone_images_per_s"]["64"][0]
    assert pair["ratios"]["alone_batch_64"] == pytest.approx(alone, rel=1e-2)


def test_precision_benchmark_refuses_a_pair_of_the_same_precision(
    model_repository: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks import precision

    args = ["--model-repository", str(model_repository), "--pair", "fashion_mnist", "cifar10"]
    assert precision.main(args) == 1
    assert "expected an fp32 model and a reduced one, found fp32 and fp32" in (
        capsys.readouterr().err
    )
    assert precision.main(["--model-repository", str(model_repository)]) == 1
    assert "no pairs in" in capsys.readouterr().err


def test_model_info_follows_what_serves() -> None:
    """One series per version: 1 while it serves, 0 after (never removed, as multiprocess
    mode cannot remove one); a changed description zeroes the old labels."""
    from server.observability.metrics import Metrics

    metrics = Metrics()

    def value(*labels: str) -> float | None:
        names = ("model", "version", "platform", "precision")
        return metrics.registry.get_sample_value(
            "imgserve_model_info", dict(zip(names, labels, strict=True))
        )

    metrics.describe_version("m", "1", layout.PLATFORM_ONNX, "int8")
    assert value("m", "1", layout.PLATFORM_ONNX, "int8") == 1
    metrics.describe_version("m", "1", layout.PLATFORM_TORCHSCRIPT, "int8")
    assert value("m", "1", layout.PLATFORM_ONNX, "int8") == 0
    assert value("m", "1", layout.PLATFORM_TORCHSCRIPT, "int8") == 1
    metrics.describe_version("m", "1")
    assert value("m", "1", layout.PLATFORM_TORCHSCRIPT, "int8") == 0
    metrics.describe_version("m", "1", layout.PLATFORM_TORCHSCRIPT, "int8")
    assert value("m", "1", layout.PLATFORM_TORCHSCRIPT, "int8") == 1
