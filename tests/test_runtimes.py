"""The runtimes on real exported files: ONNX Runtime and TorchScript agree with each other
and with the reference outputs export recorded."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from modelrepo.layout import (
    INPUT_NAME,
    ONNX_FILE,
    OUTPUT_NAME,
    PLATFORM_ONNX,
    PLATFORM_TORCHSCRIPT,
    REFERENCE_FILE,
    TORCHSCRIPT_FILE,
)
from server.runtimes import Runtime, RuntimeLoadError, create_runtime
from server.runtimes.onnx import cuda_usable

ROOT = Path(__file__).resolve().parents[1]
# 0 keeps torch's thread count: torch's pools are process-wide, and this process also trains.
THREADS = 0


def _reference(path: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(path) as data:
        return data["inputs"], data["outputs"]


def classify(runtime: Runtime, images: np.ndarray) -> np.ndarray:
    """A seed model's images in, its probabilities out."""
    return runtime.run({INPUT_NAME: images})[OUTPUT_NAME]


def test_onnx_and_torchscript_agree_with_each_other_and_the_reference(
    model_repository: Path,
) -> None:
    onnx = create_runtime(
        PLATFORM_ONNX, model_repository / "fashion_mnist" / "1" / ONNX_FILE, "auto", THREADS
    )
    torchscript = create_runtime(
        PLATFORM_TORCHSCRIPT,
        model_repository / "fashion_mnist_ts" / "1" / TORCHSCRIPT_FILE,
        "auto",
        THREADS,
    )
    try:
        assert onnx.device == "cpu"
        assert torchscript.device == "cpu"
        inputs, expected = _reference(model_repository / "fashion_mnist" / "1" / REFERENCE_FILE)
        ts_inputs, ts_expected = _reference(
            model_repository / "fashion_mnist_ts" / "1" / REFERENCE_FILE
        )
        np.testing.assert_array_equal(inputs, ts_inputs)  # one checkpoint, one reference
        np.testing.assert_allclose(classify(onnx, inputs), expected, rtol=0, atol=1e-5)
        np.testing.assert_allclose(classify(torchscript, ts_inputs), ts_expected, rtol=0, atol=1e-5)

        rng = np.random.default_rng(0)
        for rows in (1, 37):
            batch = rng.random((rows, 1, 28, 28), dtype=np.float32)
            a, b = classify(onnx, batch), classify(torchscript, batch)
            assert a.shape == b.shape == (rows, 10)
            assert a.dtype == b.dtype == np.float32
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
            np.testing.assert_allclose(a.sum(axis=1), np.ones(rows), atol=1e-5)
            np.testing.assert_allclose(b.sum(axis=1), np.ones(rows), atol=1e-5)
    finally:
        onnx.close()
        torchscript.close()


def test_torchscript_accepts_read_only_input(model_repository: Path) -> None:
    """Tensors decoded from a request buffer are read-only; the runtime must not choke on them."""
    runtime = create_runtime(
        PLATFORM_TORCHSCRIPT,
        model_repository / "fashion_mnist_ts" / "1" / TORCHSCRIPT_FILE,
        "cpu",
        THREADS,
    )
    inputs, expected = _reference(model_repository / "fashion_mnist_ts" / "1" / REFERENCE_FILE)
    frozen = np.frombuffer(inputs.tobytes(), dtype=np.float32).reshape(inputs.shape)
    assert not frozen.flags.writeable
    np.testing.assert_allclose(classify(runtime, frozen), expected, rtol=0, atol=1e-5)
    runtime.close()


def test_onnx_cuda_request_runs_on_the_gpu_or_fails_clearly(model_repository: Path) -> None:
    path = model_repository / "fashion_mnist" / "1" / ONNX_FILE
    if not cuda_usable():  # the CPU build: no CUDA provider at all
        with pytest.raises(RuntimeLoadError, match=r"cuda requested.*CUDAExecutionProvider"):
            create_runtime(PLATFORM_ONNX, path, "cuda", THREADS)
        return
    try:
        runtime = create_runtime(PLATFORM_ONNX, path, "cuda", THREADS)
    except RuntimeLoadError as exc:
        if "failed to start" not in str(exc):
            raise
        # onnxruntime-gpu lists the provider, but this host's driver or CUDA libraries cannot
        # start it: the clear error is what is checked; running on a GPU cannot be.
        pytest.skip(f"CUDAExecutionProvider present but cannot start here: {exc}")
    try:
        assert runtime.device == "cuda:0"
        inputs, expected = _reference(model_repository / "fashion_mnist" / "1" / REFERENCE_FILE)
        np.testing.assert_allclose(classify(runtime, inputs), expected, rtol=0, atol=1e-4)
    finally:
        runtime.close()


def test_torchscript_cuda_request_runs_on_the_gpu_or_fails_clearly(
    model_repository: Path,
) -> None:
    import torch

    path = model_repository / "fashion_mnist_ts" / "1" / TORCHSCRIPT_FILE
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeLoadError, match=r"cuda requested.*no usable CUDA device"):
            create_runtime(PLATFORM_TORCHSCRIPT, path, "cuda", THREADS)
        return
    runtime = create_runtime(PLATFORM_TORCHSCRIPT, path, "cuda", THREADS)
    try:
        assert runtime.device == "cuda:0"
        inputs, expected = _reference(path.with_name(REFERENCE_FILE))
        np.testing.assert_allclose(classify(runtime, inputs), expected, rtol=0, atol=1e-4)
    finally:
        runtime.close()


def test_cpu_preference_stays_on_cpu(model_repository: Path) -> None:
    path = model_repository / "cifar10" / "1" / ONNX_FILE
    runtime = create_runtime(PLATFORM_ONNX, path, "cpu", 1)
    assert runtime.device == "cpu"
    out = classify(runtime, np.zeros((3, 3, 32, 32), np.float32))
    assert out.shape == (3, 10)
    runtime.close()


@pytest.mark.parametrize(
    ("platform", "filename", "message"),
    [
        (PLATFORM_ONNX, ONNX_FILE, "onnxruntime cannot load model.onnx"),
        (PLATFORM_TORCHSCRIPT, TORCHSCRIPT_FILE, "torch cannot load model.pt"),
    ],
)
def test_corrupt_model_file_is_a_load_error(
    tmp_path: Path, platform: str, filename: str, message: str
) -> None:
    path = tmp_path / filename
    path.write_bytes(b"this is not a model")
    with pytest.raises(RuntimeLoadError, match=message):
        create_runtime(platform, path, "cpu", THREADS)


def test_unknown_platform_device_and_missing_file(model_repository: Path) -> None:
    path = model_repository / "fashion_mnist" / "1" / ONNX_FILE
    with pytest.raises(RuntimeLoadError, match="unsupported platform 'tensorflow_savedmodel'"):
        create_runtime("tensorflow_savedmodel", path, "cpu", THREADS)
    with pytest.raises(RuntimeLoadError, match="unknown device 'tpu'"):
        create_runtime(PLATFORM_ONNX, path, "tpu", THREADS)
    with pytest.raises(RuntimeLoadError, match="not found"):
        create_runtime(PLATFORM_ONNX, path.with_name("missing.onnx"), "cpu", THREADS)


def test_onnx_graph_with_other_tensor_names_is_refused(tmp_path: Path) -> None:
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "renamed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / ONNX_FILE)
    with pytest.raises(RuntimeLoadError, match=r"has no input 'input' \(its inputs: x\)"):
        create_runtime(PLATFORM_ONNX, tmp_path / ONNX_FILE, "cpu", THREADS)


def test_server_core_does_not_import_torch() -> None:
    code = (
        "import sys\n"
        "import server.core.manager, server.core.batcher, server.core.repository, server.runtimes\n"
        "import server.runtimes.onnx, server.core.loading, server.app, server.__main__\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
