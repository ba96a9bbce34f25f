"""Export round trips: files, config.pbtxt, parity of ONNX Runtime and TorchScript with PyTorch."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch

from modelrepo import imageprep, layout
from modelrepo.config import load_config, write_config
from modelrepo.precision import PRECISION_PARAMETER
from training.checkpoint import classifier_from_checkpoint, load_checkpoint
from training.errors import TrainingError
from training.export import _check_parity, export_checkpoint, torchscript_deprecation_silenced
from training.train import train
from wire import model_config_pb2


def quiet(_line: str) -> None:
    """Export logs are not what these tests check."""


@pytest.fixture(scope="module")
def lenet_run(tmp_path_factory: pytest.TempPathFactory) -> Any:
    return train(
        "lenet5",
        "synthetic",
        checkpoint_dir=tmp_path_factory.mktemp("lenet"),
        epochs=1,
        synthetic_train_size=300,
        synthetic_test_size=80,
        device="cpu",
        log=quiet,
    )


@pytest.fixture(scope="module")
def runs(trained_runs: dict[str, Any], lenet_run: Any) -> dict[str, Any]:
    return {**trained_runs, "lenet5": lenet_run}


def eager(checkpoint: Path, x: np.ndarray) -> np.ndarray:
    model = classifier_from_checkpoint(load_checkpoint(checkpoint)).probabilities().eval()
    with torch.inference_mode():
        return model(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("arch", ["fashion_mlp", "cifar10_cnn", "lenet5"])
def test_round_trip_both_formats(runs: dict[str, Any], tmp_path: Path, arch: str) -> None:
    run = runs[arch]
    version = export_checkpoint(
        run.best,
        tmp_path,
        "model",
        "both",
        max_batch_size=8,
        instance_count=2,
        max_queue_delay_us=500,
        data=run.data,
        log=quiet,
    )
    assert version == tmp_path / "model" / "1"
    assert {p.name for p in version.iterdir()} == {
        layout.ONNX_FILE,
        layout.TORCHSCRIPT_FILE,
        layout.REFERENCE_FILE,
    }
    assert not [p for p in (tmp_path / "model").iterdir() if p.name.startswith(".")]

    shape = list(run.data.input_shape)
    config = load_config(tmp_path / "model" / layout.CONFIG_FILE)
    assert config.name == "model" and config.platform == layout.PLATFORM_ONNX
    assert config.max_batch_size == 8
    (inp,) = config.input
    assert (inp.name, list(inp.dims)) == (layout.INPUT_NAME, shape)
    assert inp.data_type == model_config_pb2.TYPE_FP32
    assert inp.format == model_config_pb2.ModelInput.FORMAT_NCHW
    (out,) = config.output
    assert (out.name, list(out.dims), out.label_filename) == (
        layout.OUTPUT_NAME,
        [10],
        layout.LABELS_FILE,
    )
    assert config.dynamic_batching.max_queue_delay_microseconds == 500
    assert [(g.count, g.kind) for g in config.instance_group] == [
        (2, model_config_pb2.ModelInstanceGroup.KIND_AUTO)
    ]
    # The fixture trained on generated images: the config says so, for the server to warn;
    # and it records the precision (fp32 by default).
    assert dict(config.parameters) == {
        layout.TRAINING_DATASET_PARAMETER: model_config_pb2.ModelParameter(
            string_value=layout.SYNTHETIC_DATASET
        ),
        PRECISION_PARAMETER: model_config_pb2.ModelParameter(string_value="fp32"),
        # How the server prepares images for it (modelrepo.imageprep): [0, 1] pixels in,
        # probabilities out; layout, size and datatype are the input's own fields.
        imageprep.SCALING_PARAMETER: model_config_pb2.ModelParameter(string_value="UNIT"),
        imageprep.CHANNEL_ORDER_PARAMETER: model_config_pb2.ModelParameter(string_value="RGB"),
        imageprep.OUTPUT_PARAMETER: model_config_pb2.ModelParameter(string_value="probabilities"),
    }
    prep = imageprep.ImagePrep.from_config(config)
    assert (prep.layout, prep.shape, prep.datatype) == ("NCHW", tuple(shape), "FP32")
    assert 'key: "training_dataset"' in (tmp_path / "model" / layout.CONFIG_FILE).read_text()
    assert layout.read_labels(tmp_path / "model" / layout.LABELS_FILE) == run.data.class_names

    session = ort.InferenceSession(str(version / layout.ONNX_FILE))
    assert [i.name for i in session.get_inputs()] == [layout.INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == [layout.OUTPUT_NAME]
    with torchscript_deprecation_silenced():
        scripted = torch.jit.load(str(version / layout.TORCHSCRIPT_FILE))
    rng = np.random.default_rng(7)
    for batch in (1, 37):
        x = rng.random((batch, *shape), dtype=np.float32)
        expected = eager(run.best, x)
        (from_onnx,) = session.run(None, {layout.INPUT_NAME: x})
        with torch.inference_mode():
            from_script = scripted(torch.from_numpy(x)).numpy()
        assert from_onnx.shape == from_script.shape == (batch, 10)
        assert np.max(np.abs(from_onnx - expected)) <= 1e-5
        assert np.max(np.abs(from_script - expected)) <= 1e-5
        np.testing.assert_allclose(from_onnx.sum(axis=1), 1.0, atol=1e-5)

    reference = np.load(version / layout.REFERENCE_FILE)
    inputs, outputs = reference["inputs"], reference["outputs"]
    # fp32 records its precision and no tolerance of its own: the server's setting applies.
    assert str(reference["precision"]) == "fp32" and "tolerance" not in reference.files
    assert inputs.dtype == outputs.dtype == np.float32
    assert inputs.shape == (16, *shape) and outputs.shape == (16, 10)
    assert inputs.min() >= 0.0 and inputs.max() <= 1.0
    np.testing.assert_array_equal(inputs, run.data.test.tensors[0][:16].numpy())
    assert np.max(np.abs(session.run(None, {"input": inputs})[0] - outputs)) <= 1e-5
    assert np.max(np.abs(eager(run.best, inputs) - outputs)) <= 1e-6


def test_torchscript_only_is_served_by_libtorch(runs: dict[str, Any], tmp_path: Path) -> None:
    version = export_checkpoint(runs["lenet5"].best, tmp_path, "ts", "torchscript", log=quiet)
    assert {p.name for p in version.iterdir()} == {layout.TORCHSCRIPT_FILE, layout.REFERENCE_FILE}
    config = load_config(tmp_path / "ts" / layout.CONFIG_FILE)
    assert config.platform == layout.PLATFORM_TORCHSCRIPT
    # Without data the reference rows are seeded random pixels, still checked against PyTorch.
    reference = np.load(version / layout.REFERENCE_FILE)
    expected = eager(runs["lenet5"].best, reference["inputs"])
    assert np.max(np.abs(expected - reference["outputs"])) <= 1e-6
    assert reference["inputs"].shape == (16, 1, 32, 32)


def test_export_emits_no_warnings(runs: dict[str, Any], tmp_path: Path) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_checkpoint(runs["fashion_mlp"].best, tmp_path, "m", "both", log=quiet)
    assert [str(w.message) for w in caught] == []


def test_second_export_is_version_two(writable_repository: Path, runs: dict[str, Any]) -> None:
    first = writable_repository / "fashion_mnist" / "1"
    before = (first / layout.ONNX_FILE).read_bytes()
    version = export_checkpoint(
        runs["fashion_mlp"].best, writable_repository, "fashion_mnist", log=quiet
    )
    assert version.name == "2" and (version / layout.ONNX_FILE).is_file()
    assert layout.list_versions(writable_repository / "fashion_mnist") == [1, 2]
    assert (first / layout.ONNX_FILE).read_bytes() == before


def test_a_new_version_keeps_the_operators_serving_settings(
    writable_repository: Path, runs: dict[str, Any]
) -> None:
    config_path = writable_repository / "fashion_mnist" / layout.CONFIG_FILE
    tuned = load_config(config_path)
    tuned.max_batch_size = 16
    tuned.dynamic_batching.max_queue_delay_microseconds = 777
    tuned.version_policy.all.SetInParent()
    del tuned.instance_group[:]
    tuned.instance_group.add(count=3, kind=model_config_pb2.ModelInstanceGroup.KIND_CPU)
    write_config(config_path, tuned)
    checkpoint = runs["fashion_mlp"].best

    export_checkpoint(checkpoint, writable_repository, "fashion_mnist", log=quiet)
    assert load_config(config_path) == tuned  # nothing asked to change: nothing changed

    export_checkpoint(
        checkpoint, writable_repository, "fashion_mnist", max_batch_size=32, log=quiet
    )
    changed = load_config(config_path)
    assert changed.max_batch_size == 32
    assert changed.dynamic_batching.max_queue_delay_microseconds == 777
    assert changed.HasField("version_policy") and changed.version_policy.HasField("all")
    assert [(g.count, g.kind) for g in changed.instance_group] == [
        (3, model_config_pb2.ModelInstanceGroup.KIND_CPU)
    ]
    assert layout.list_versions(writable_repository / "fashion_mnist") == [1, 2, 3]


def test_shape_or_platform_mismatch_is_refused(
    writable_repository: Path, runs: dict[str, Any]
) -> None:
    model_dir = writable_repository / "fashion_mnist"
    with pytest.raises(TrainingError, match="another --name"):
        export_checkpoint(runs["cifar10_cnn"].best, writable_repository, "fashion_mnist")
    with pytest.raises(TrainingError, match="onnxruntime_onnx"):
        export_checkpoint(
            runs["fashion_mlp"].best, writable_repository, "fashion_mnist", "torchscript"
        )
    assert layout.list_versions(model_dir) == [1]
    assert not [p for p in model_dir.iterdir() if p.name.startswith(".")]


def test_parity_failure_is_an_error(runs: dict[str, Any]) -> None:
    ours = classifier_from_checkpoint(load_checkpoint(runs["fashion_mlp"].best)).probabilities()
    batches = [torch.rand(3, 1, 28, 28)]
    _check_parity("ONNX", ours, lambda x: ours(x).detach().numpy(), batches)  # identical: fine
    with pytest.raises(TrainingError, match="differs from PyTorch"):
        _check_parity("ONNX", ours, lambda x: ours(x).detach().numpy() + 1e-4, batches)


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({"name": "../escape"}, "invalid model name"),
        ({"fmt": "tensorrt"}, "unknown export format"),
        ({"max_batch_size": 0}, "--max-batch-size"),
    ],
)
def test_bad_options(runs: dict[str, Any], tmp_path: Path, options: dict, expected: str) -> None:
    arguments = {"name": "m", "fmt": "onnx", **options}
    with pytest.raises(TrainingError, match=expected):
        export_checkpoint(runs["fashion_mlp"].best, tmp_path, log=quiet, **arguments)
    assert not (tmp_path / "m").exists()


def test_shared_repository_fixture(model_repository: Path) -> None:
    expected = {
        "fashion_mnist": (layout.PLATFORM_ONNX, layout.ONNX_FILE, [1, 28, 28]),
        "fashion_mnist_ts": (layout.PLATFORM_TORCHSCRIPT, layout.TORCHSCRIPT_FILE, [1, 28, 28]),
        "cifar10": (layout.PLATFORM_ONNX, layout.ONNX_FILE, [3, 32, 32]),
    }
    assert {p.name for p in model_repository.iterdir()} == set(expected)
    for name, (platform, filename, dims) in expected.items():
        config = load_config(model_repository / name / layout.CONFIG_FILE)
        assert (config.name, config.platform, list(config.input[0].dims)) == (name, platform, dims)
        assert (model_repository / name / "1" / filename).is_file()
        assert (model_repository / name / "1" / layout.REFERENCE_FILE).is_file()
