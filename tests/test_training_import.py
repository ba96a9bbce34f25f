"""`python -m training import` on models trained elsewhere: torchvision architectures exported to
ONNX here, a Keras-style NHWC classifier, a TorchScript file, Triton's two-input `simple` shape;
the config it writes, the reference that reproduces, what it refuses, and a real server that
loads the imported classifiers and answers tritonclient and the native API with them."""

from __future__ import annotations

import io
import re
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import tritonclient.grpc as triton
from onnx import TensorProto, helper, numpy_helper
from PIL import Image
from server_process import ServerProcess

from client import ClassifierClient
from modelrepo import layout
from modelrepo.config import load_config
from modelrepo.imageprep import ImagePrep
from modelrepo.precision import REFERENCE_TOLERANCE_KEY
from training import importer
from training.cli import main
from wire import model_config_pb2

ROOT = Path(__file__).resolve().parent.parent
SIZE = 64  # small inputs keep the torchvision exports and runs fast
TORCHVISION_MEAN, TORCHVISION_STD = "0.485,0.456,0.406", "0.229,0.224,0.225"
FP32 = model_config_pb2.TYPE_FP32


def export_torchvision(arch: str, path: Path) -> torch.nn.Module:
    """An untrained torchvision classifier (no weights can be downloaded here) as ONNX with a
    dynamic batch dim, the way a user exports one."""
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(weights=None).eval()
    example = torch.rand(2, 3, SIZE, SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(path),
            input_names=["pixels"],
            output_names=["logits"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
            external_data=False,
            dynamo=True,
            verbose=False,
        )
    return model


@pytest.fixture(scope="module")
def torchvision_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    folder = tmp_path_factory.mktemp("torchvision")
    return {
        arch: (folder / f"{arch}.onnx", export_torchvision(arch, folder / f"{arch}.onnx"))
        for arch in ("resnet18", "mobilenet_v3_small")
    }


def labels_file(folder: Path, count: int) -> Path:
    path = folder / f"labels{count}.txt"
    path.write_text("".join(f"class {i}\n" for i in range(count)), encoding="utf-8")
    return path


def save_onnx(graph: onnx.GraphProto, path: Path, opset: int = 17) -> Path:
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def keras_style_nhwc(path: Path) -> Path:
    """What tf2onnx makes of a small Keras classifier: NHWC input, the transpose inside the
    graph, a softmax output named after the last layer."""
    rng = np.random.default_rng(3)
    nodes = [
        helper.make_node("Transpose", ["input_1"], ["nchw"], perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["nchw", "kernel", "bias"], ["conv"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["conv"], ["relu"]),
        helper.make_node("GlobalAveragePool", ["relu"], ["pooled"]),
        helper.make_node("Flatten", ["pooled"], ["flat"]),
        helper.make_node("MatMul", ["flat", "dense_w"], ["dense"]),
        helper.make_node("Softmax", ["dense"], ["predictions"], axis=-1),
    ]
    initializers = {
        "kernel": rng.standard_normal((8, 3, 3, 3)),
        "bias": rng.standard_normal(8),
        "dense_w": rng.standard_normal((8, 5)),
    }
    graph = helper.make_graph(
        nodes,
        "keras_nhwc",
        [helper.make_tensor_value_info("input_1", TensorProto.FLOAT, ["unk__0", 32, 32, 3])],
        [helper.make_tensor_value_info("predictions", TensorProto.FLOAT, ["unk__0", 5])],
        initializer=[
            numpy_helper.from_array(v.astype(np.float32), k) for k, v in initializers.items()
        ],
    )
    return save_onnx(graph, path)


def simple_add_sub(path: Path, element: int = TensorProto.INT32) -> Path:
    """Triton's `simple` model: INPUT0 + INPUT1 and INPUT0 - INPUT1, [N,16]."""
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "simple",
        [helper.make_tensor_value_info(n, element, ["N", 16]) for n in ("INPUT0", "INPUT1")],
        [helper.make_tensor_value_info(n, element, ["N", 16]) for n in ("OUTPUT0", "OUTPUT1")],
    )
    return save_onnx(graph, path)


def fixed_batch_of_one(path: Path) -> Path:
    """A classifier exported with a fixed batch of one and Triton's densenet_onnx tensor names:
    data_0 [1, 3, 8, 8] in, fc6_1 [1, 5] logits out."""
    weight = np.random.default_rng(5).standard_normal((3 * 8 * 8, 5)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["data_0"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "w"], ["fc6_1"]),
        ],
        "unbatched",
        [helper.make_tensor_value_info("data_0", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("fc6_1", TensorProto.FLOAT, [1, 5])],
        initializer=[numpy_helper.from_array(weight, "w")],
    )
    return save_onnx(graph, path)


def reference(version_dir: Path) -> dict[str, np.ndarray]:
    with np.load(version_dir / layout.REFERENCE_FILE) as data:  # no pickle: strings are bytes
        return {key: data[key] for key in data.files}


def reproduce_with_onnxruntime(version_dir: Path, batched: bool = True) -> dict[str, np.ndarray]:
    """Run the served file on reference.npz's inputs (as one batch, or row by row for a model
    without batching); its outputs must match the recorded ones within the recorded tolerance."""
    ref = reference(version_dir)
    session = ort.InferenceSession(
        str(version_dir / layout.ONNX_FILE), providers=["CPUExecutionProvider"]
    )
    names = list(ref["input_names"])
    feeds = {name: ref["inputs" if i == 0 else f"inputs_{i}"] for i, name in enumerate(names)}
    outputs = list(ref["output_names"])
    if batched:
        got = session.run(outputs, feeds)
    else:
        rows = [session.run(outputs, {k: v[r] for k, v in feeds.items()}) for r in range(4)]
        got = [np.stack(each) for each in zip(*rows, strict=True)]
    for i, array in enumerate(got):
        expected = ref["outputs" if i == 0 else f"outputs_{i}"]
        assert array.shape == expected.shape and array.dtype == expected.dtype
        assert np.max(np.abs(array - expected), initial=0) <= ref[REFERENCE_TOLERANCE_KEY]
    return ref


def import_cli(
    capsys: pytest.CaptureFixture[str], model: Path, repo: Path, name: str, *args: object
) -> tuple[int, str, str]:
    """`python -m training import ...` in this process: exit code, stdout, stderr."""
    argv = ["import", str(model), "--model-repository", str(repo), "--name", name]
    code = main([*argv, *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_resnet18_with_labels_and_torchvision_normalisation(
    torchvision_models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, eager = torchvision_models["resnet18"]
    repo = tmp_path / "models"
    code, out, err = import_cli(
        capsys, path, repo, "resnet18", "--labels", labels_file(tmp_path, 1000),
        "--mean", TORCHVISION_MEAN, "--std", TORCHVISION_STD,
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    assert "running it on 4 seeded inputs" in out and "output: logits" in out
    config = load_config(repo / "resnet18" / layout.CONFIG_FILE)
    assert (config.name, config.platform, config.max_batch_size) == (
        "resnet18",
        layout.PLATFORM_ONNX,
        importer.DEFAULT_MAX_BATCH_SIZE,
    )
    (inp,) = config.input
    assert (inp.name, inp.data_type, inp.format, list(inp.dims)) == (
        "pixels", FP32, model_config_pb2.ModelInput.FORMAT_NCHW, [3, SIZE, SIZE],
    )  # fmt: skip
    (output,) = config.output
    assert (output.name, output.data_type, list(output.dims), output.label_filename) == (
        "logits", FP32, [1000], layout.LABELS_FILE,
    )  # fmt: skip
    assert config.HasField("dynamic_batching")
    assert {k: v.string_value for k, v in config.parameters.items()} == {
        "image_scaling": "UNIT",
        "image_mean": TORCHVISION_MEAN,
        "image_std": TORCHVISION_STD,
        "image_channel_order": "RGB",
        "image_output": "logits",  # seen in the scores: they do not sum to 1
    }
    assert layout.read_labels(repo / "resnet18" / layout.LABELS_FILE)[999] == "class 999"
    version = repo / "resnet18" / "1"
    assert sorted(p.name for p in version.iterdir()) == [layout.ONNX_FILE, layout.REFERENCE_FILE]
    assert (version / layout.ONNX_FILE).read_bytes() == path.read_bytes()
    assert [p.name for p in (repo / "resnet18").iterdir() if p.name.startswith(".")] == []

    ref = reproduce_with_onnxruntime(version)
    # The inputs are images prepared as the config says, from seeded pixels; the outputs are
    # the model's own (eager PyTorch agrees).
    prep = ImagePrep.from_config(config)
    rng = np.random.default_rng(importer.REFERENCE_SEED)
    pixels = [rng.integers(0, 256, (SIZE, SIZE, 3), np.uint8) for _ in range(4)]
    assert np.array_equal(ref["inputs"], np.stack([prep.prepare(p) for p in pixels]))
    assert ref["inputs"].dtype == np.float32 and ref["inputs"].min() < -1.5  # normalised
    with torch.inference_mode():
        expected = eager(torch.from_numpy(ref["inputs"])).numpy()
    np.testing.assert_allclose(ref["outputs"], expected, atol=1e-4)
    assert ref["outputs"].shape == (4, 1000)
    assert list(ref["input_names"]) == ["pixels"] and list(ref["output_names"]) == ["logits"]

    # A second version needs --version; it must describe the same model, keeps the config.
    code, _, err = import_cli(capsys, path, repo, "resnet18")
    assert code == 2 and "already exists: pass --version N" in err
    config_text = (repo / "resnet18" / layout.CONFIG_FILE).read_text()
    labels = labels_file(tmp_path, 1000)
    code, out, err = import_cli(
        capsys, path, repo, "resnet18", "--version", 2, "--labels", labels,
        "--mean", TORCHVISION_MEAN, "--std", TORCHVISION_STD,
    )  # fmt: skip
    assert (code, err) == (0, ""), err
    assert (repo / "resnet18" / "2" / layout.REFERENCE_FILE).is_file()
    assert (repo / "resnet18" / layout.CONFIG_FILE).read_text() == config_text
    code, _, err = import_cli(capsys, path, repo, "resnet18", "--version", 2)
    assert code == 2 and "already has a version 2" in err
    code, _, err = import_cli(capsys, path, repo, "resnet18", "--version", 3, "--labels", labels)
    assert code == 2 and "other image-preparation keys" in err  # no mean/std: another model
    code, _, err = import_cli(
        capsys, path, repo, "resnet18", "--version", 3, "--output-kind", "probabilities"
    )
    assert code == 2 and "--output-kind probabilities, but the model's scores" in err
    assert sorted(p.name for p in (repo / "resnet18").iterdir()) == [
        "1", "2", layout.CONFIG_FILE, layout.LABELS_FILE,
    ]  # fmt: skip


def test_mobilenet_through_the_command_line(
    torchvision_models: dict[str, Any], tmp_path: Path
) -> None:
    """The real entry point, as a user runs it: progress lines, a summary, exit 0."""
    path, _ = torchvision_models["mobilenet_v3_small"]
    repo = tmp_path / "models"
    result = subprocess.run(
        [sys.executable, "-m", "training", "import", str(path), "--model-repository", str(repo),
         "--name", "mobilenet", "--max-batch-size", "4", "--scaling", "inception"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "loading it into onnxruntime" in result.stdout
    assert f"imported into {repo / 'mobilenet' / '1'}" in result.stdout
    config = load_config(repo / "mobilenet" / layout.CONFIG_FILE)
    assert config.max_batch_size == 4
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [
        ("logits", [1000], "")
    ]
    assert config.parameters["image_scaling"].string_value == "INCEPTION"
    assert not (repo / "mobilenet" / layout.LABELS_FILE).exists()
    ref = reproduce_with_onnxruntime(repo / "mobilenet" / "1")
    assert ref["inputs"].min() >= -1 and ref["inputs"].max() <= 1  # (x / 127.5) - 1


def test_keras_style_nhwc_softmax(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = keras_style_nhwc(tmp_path / "keras.onnx")
    repo = tmp_path / "models"
    code, out, err = import_cli(
        capsys, model, repo, "keras", "--labels", labels_file(tmp_path, 5), "--scaling", "VGG"
    )
    assert (code, err) == (0, ""), err
    assert "output: probabilities" in out
    config = load_config(repo / "keras" / layout.CONFIG_FILE)
    (inp,) = config.input
    assert (inp.name, inp.format, list(inp.dims)) == (
        "input_1", model_config_pb2.ModelInput.FORMAT_NHWC, [32, 32, 3],
    )  # fmt: skip
    assert [(o.name, list(o.dims), o.label_filename) for o in config.output] == [
        ("predictions", [5], layout.LABELS_FILE)
    ]
    prep = ImagePrep.from_config(config)
    assert (prep.layout, prep.scaling, prep.output) == ("NHWC", "VGG", "probabilities")
    ref = reproduce_with_onnxruntime(repo / "keras" / "1")
    assert ref["inputs"].shape == (4, 32, 32, 3)  # the model's own layout
    assert ref["inputs"].min() < 0 and ref["inputs"].max() > 100  # pixels minus VGG's mean
    np.testing.assert_allclose(ref["outputs"].sum(axis=1), 1, atol=1e-5)


class Scores(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).mean(dim=(2, 3)))


def test_torchscript_gets_tritons_names(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "scores.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(Scores().eval(), torch.rand(2, 1, 16, 16)).save(str(path))
    repo = tmp_path / "models"
    code, _, err = import_cli(capsys, path, repo, "scores")
    assert code == 2 and "records no input shape: give the input's dims with --input-shape" in err
    code, _, err = import_cli(capsys, path, repo, "scores", "--input-shape", "1,15")
    assert code == 2 and "does not run on a FP32 input shaped [2, 1, 15]" in err
    assert not (repo / "scores").exists()
    code, out, err = import_cli(capsys, path, repo, "scores", "--input-shape", "1,16,16")
    assert (code, err) == (0, ""), err
    assert "probing it with a FP32 input shaped [2, 1, 16, 16]" in out
    config = load_config(repo / "scores" / layout.CONFIG_FILE)
    assert config.platform == layout.PLATFORM_TORCHSCRIPT and config.max_batch_size == 8
    assert [(i.name, i.data_type, list(i.dims)) for i in config.input] == [
        ("INPUT__0", FP32, [1, 16, 16])
    ]
    assert [(o.name, o.data_type, list(o.dims)) for o in config.output] == [
        ("OUTPUT__0", FP32, [3])
    ]
    assert ImagePrep.from_config(config).channels == 1  # a grayscale classifier
    ref = reference(repo / "scores" / "1")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        served = torch.jit.load(str(repo / "scores" / "1" / layout.TORCHSCRIPT_FILE))
    with torch.inference_mode():
        again = served(torch.from_numpy(ref["inputs"])).numpy()
    assert np.max(np.abs(again - ref["outputs"])) <= ref[REFERENCE_TOLERANCE_KEY]


def test_two_input_model_is_generic(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = simple_add_sub(tmp_path / "simple.onnx")
    repo = tmp_path / "models"
    code, _, err = import_cli(capsys, model, repo, "simple", "--scaling", "VGG")
    assert code == 2 and "--scaling: cannot prepare images for it: it has 2 inputs" in err
    code, out, err = import_cli(capsys, model, repo, "simple")
    assert (code, err) == (0, ""), err
    assert "generic model, without image-preparation keys: it has 2 inputs" in out
    config = load_config(repo / "simple" / layout.CONFIG_FILE)
    int32 = model_config_pb2.TYPE_INT32
    assert [(t.name, t.data_type, list(t.dims)) for t in config.input] == [
        ("INPUT0", int32, [16]), ("INPUT1", int32, [16]),
    ]  # fmt: skip
    assert [(t.name, t.data_type, list(t.dims)) for t in config.output] == [
        ("OUTPUT0", int32, [16]), ("OUTPUT1", int32, [16]),
    ]  # fmt: skip
    assert config.max_batch_size == 8 and not config.parameters
    ref = reproduce_with_onnxruntime(repo / "simple" / "1")
    assert ref["inputs_1"].dtype == np.int32 and ref["inputs"].shape == (4, 16)
    np.testing.assert_array_equal(ref["outputs_1"], ref["inputs"] - ref["inputs_1"])


Edit = Callable[[Path], tuple[Path, list[object]]]


def _fixed_batch(tmp: Path) -> tuple[Path, list[object]]:
    graph = helper.make_graph(
        [helper.make_node("Softmax", ["x"], ["y"], axis=-1)],
        "fixed",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 10])],
    )
    return save_onnx(graph, tmp / "fixed.onnx"), ["--max-batch-size", 8]


def _batch_mixing(tmp: Path) -> tuple[Path, list[object]]:
    """Normalises over the batch: a row's answer depends on its companions."""
    graph = helper.make_graph(
        [
            helper.make_node("ReduceMean", ["x"], ["m"], axes=[0], keepdims=1),
            helper.make_node("Sub", ["x", "m"], ["y"]),
        ],
        "mixing",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
    )
    return save_onnx(graph, tmp / "mixing.onnx"), []


def _bfloat16(tmp: Path) -> tuple[Path, list[object]]:
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)],
        "bf16",
        [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])],
    )
    return save_onnx(graph, tmp / "bf16.onnx"), []


def _garbage(tmp: Path) -> tuple[Path, list[object]]:
    (tmp / "garbage.onnx").write_bytes(b"\xff" * 64)
    return tmp / "garbage.onnx", []


def _keras(*args: object) -> Edit:
    return lambda tmp: (keras_style_nhwc(tmp / "keras.onnx"), list(args))


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda tmp: (tmp / "absent.onnx", []), "model file .* not found"),
        (
            lambda tmp: (labels_file(tmp, 2).rename(tmp / "m.h5"), []),
            "unknown model file type '.h5'",
        ),
        (_garbage, "garbage.onnx is not a readable ONNX model"),
        (_bfloat16, "input 'x' is BFLOAT16, a type the server cannot serve"),
        (_fixed_batch, r"cannot batch: 'x' has shape \[1, 10\] \(its first dim is 1"),
        (_batch_mixing, "rows are not independent"),
        (_keras("--labels", "LABELS3"), "--labels lists 3 classes, but output 'predictions' has 5"),
        (_keras("--mean", "0.5,0.5"), "--mean: 2 values for 3 channel"),
        (_keras("--format", "NCHW"), "has 32 channels: images have 1 or 3"),
        (_keras("--output-kind", "logits", "--input-datatype", "FP16"), "--input-datatype is for"),
    ],
)
def test_refusals(
    make: Edit, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, args = make(tmp_path)
    args = [labels_file(tmp_path, 3) if a == "LABELS3" else a for a in args]
    repo = tmp_path / "models"
    code, out, err = import_cli(capsys, model, repo, "m", *args)
    assert code == 2, out
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert re.search(message, err), err
    assert not (repo / "m").exists()  # nothing half-written


def test_defaults_for_a_fixed_batch_and_help(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model, _ = _fixed_batch(tmp_path)
    code, _, err = import_cli(capsys, model, tmp_path / "models", "fixed")
    assert (code, err) == (0, ""), err
    config = load_config(tmp_path / "models" / "fixed" / layout.CONFIG_FILE)
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 10]
    assert not config.HasField("dynamic_batching")
    ref = reproduce_with_onnxruntime(tmp_path / "models" / "fixed" / "1", batched=False)
    assert ref["inputs"].shape == (4, 1, 10)  # each row one whole input
    with pytest.raises(SystemExit) as exited:
        main(["import", "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    for option in ("--input-shape", "--scaling", "--mean", "--output-kind", "--version"):
        assert option in text
    assert "INCEPTION" in text and "image preparation" in text


def test_image_model_without_batching(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A fixed batch of one, as some exporters write: no batching, and the config Triton's
    densenet_onnx example has (image dims, a reshape to the model's [1, C, H, W]); each
    reference row is one image, fed alone."""
    model = fixed_batch_of_one(tmp_path / "unbatched.onnx")
    code, _, err = import_cli(capsys, model, tmp_path / "models", "unbatched", "--labels",
                              labels_file(tmp_path, 5))  # fmt: skip
    assert (code, err) == (0, ""), err
    config = load_config(tmp_path / "models" / "unbatched" / layout.CONFIG_FILE)
    assert config.max_batch_size == 0 and not config.HasField("dynamic_batching")
    nchw = model_config_pb2.ModelInput.FORMAT_NCHW
    assert [(i.name, i.format, list(i.dims), list(i.reshape.shape)) for i in config.input] == [
        ("data_0", nchw, [3, 8, 8], [1, 3, 8, 8])
    ]
    assert [
        (o.name, list(o.dims), list(o.reshape.shape), o.label_filename) for o in config.output
    ] == [("fc6_1", [5], [1, 5], layout.LABELS_FILE)]
    prep = ImagePrep.from_config(config)
    assert prep.shape == (3, 8, 8) and prep.output == "logits"
    ref = reference(tmp_path / "models" / "unbatched" / "1")
    assert ref["inputs"].shape == (4, 3, 8, 8) and ref["outputs"].shape == (4, 5)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    for row, expected in zip(ref["inputs"], ref["outputs"], strict=True):
        (got,) = session.run(None, {"data_0": row[np.newaxis]})
        assert np.max(np.abs(got[0] - expected)) <= ref[REFERENCE_TOLERANCE_KEY]


def test_an_imported_classifier_serves(
    torchvision_models: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real server on imported models: tritonclient's classification answers the labels and
    scores reference.npz recorded, and the native API prepares an encoded image as the keys
    say (torchvision normalisation and logits for resnet18; NHWC with VGG, or BGR with mean and
    std, for the Keras one; INCEPTION for a fixed batch of one)."""
    repo = tmp_path / "models"
    path, _ = torchvision_models["resnet18"]
    resnet = ["--labels", labels_file(tmp_path, 1000), "--mean", TORCHVISION_MEAN,
              "--std", TORCHVISION_STD]  # fmt: skip
    assert import_cli(capsys, path, repo, "resnet18", *resnet)[0] == 0
    keras = keras_style_nhwc(tmp_path / "keras.onnx")
    assert import_cli(capsys, keras, repo, "keras", "--scaling", "VGG")[0] == 0
    bgr = ["--channel-order", "BGR", "--mean", "0.1,0.2,0.3", "--std", "0.5"]
    assert import_cli(capsys, keras, repo, "keras_bgr", *bgr)[0] == 0
    unbatched = fixed_batch_of_one(tmp_path / "unbatched.onnx")
    assert import_cli(capsys, unbatched, repo, "unbatched", "--scaling", "INCEPTION")[0] == 0
    pixels = np.random.default_rng(11).integers(0, 256, (48, 80, 3), np.uint8)
    png = io.BytesIO()
    Image.fromarray(pixels).save(png, format="PNG")

    with ServerProcess(repo) as server:
        client = triton.InferenceServerClient(server.target)
        assert client.is_model_ready("resnet18") and client.is_model_ready("keras"), server.log
        ref = reference(repo / "resnet18" / "1")
        tensor = triton.InferInput("pixels", list(ref["inputs"].shape), "FP32")
        tensor.set_data_from_numpy(ref["inputs"])
        wanted = triton.InferRequestedOutput("logits", class_count=3)
        answers = client.infer("resnet18", [tensor], outputs=[wanted]).as_numpy("logits")
        for answer, expected in zip(answers, ref["outputs"], strict=True):
            top = [a.decode().split(":") for a in answer]
            assert [int(index) for _, index, _ in top] == list(np.argsort(-expected)[:3])
            assert [label for _, _, label in top] == [f"class {index}" for _, index, _ in top]
            np.testing.assert_allclose([float(s) for s, _, _ in top], np.sort(expected)[::-1][:3],
                                       atol=1e-4)  # fmt: skip
        client.close()

        with ClassifierClient(server.target) as native:
            for name in ("resnet18", "keras", "keras_bgr", "unbatched"):
                config = load_config(repo / name / layout.CONFIG_FILE)
                prep = ImagePrep.from_config(config)
                session = ort.InferenceSession(
                    str(repo / name / "1" / layout.ONNX_FILE), providers=["CPUExecutionProvider"]
                )
                image = prep.prepare(pixels)[np.newaxis]  # the batch dim, its own or ours
                scores = session.run(None, {config.input[0].name: image})[0].reshape(1, -1)
                (result,) = native.classify(name, png.getvalue(), top_k=3)
                np.testing.assert_allclose(
                    result.probabilities, prep.probabilities(scores)[0], atol=1e-5
                )
                assert result.probabilities.sum() == pytest.approx(1, abs=1e-4)
