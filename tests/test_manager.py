"""The model manager on copies of the fixture repository: loading, checks, policies, lookups."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from generated_models import write_slow_model

from modelrepo.config import ModelConfig, load_config, write_config
from modelrepo.layout import (
    CONFIG_FILE,
    LABELS_FILE,
    ONNX_FILE,
    REFERENCE_FILE,
    TORCHSCRIPT_FILE,
    TRAINING_DATASET_PARAMETER,
)
from server.config import Settings
from server.core.manager import ModelManager, ModelState
from server.errors import InvalidInputError, ModelNotFoundError, ModelUnavailableError
from server.observability.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_MODELS = ("cifar10", "fashion_mnist", "fashion_mnist_ts")


def settings(repo: Path, **overrides: object) -> Settings:
    # intra_op_threads 0 keeps torch's thread count: its pools are process-wide, and this
    # test process also trains models.
    return Settings(**{"model_repository": repo, "intra_op_threads": 0, **overrides})  # type: ignore[arg-type]


def reference(repo: Path, name: str, version: int = 1) -> tuple[np.ndarray, np.ndarray]:
    with np.load(repo / name / str(version) / REFERENCE_FILE) as data:
        return data["inputs"], data["outputs"]


def edit_config(repo: Path, name: str, change: Callable[[ModelConfig], None]) -> None:
    path = repo / name / CONFIG_FILE
    config = load_config(path)
    change(config)
    write_config(path, config)


def clone_model(repo: Path, source: str, name: str) -> Path:
    shutil.copytree(repo / source, repo / name)
    edit_config(repo, name, lambda c: setattr(c, "name", name))
    return repo / name


def state_of(manager: ModelManager, name: str) -> list[ModelState]:
    return [s for s in manager.index() if s.name == name]


def gauge(metrics: Metrics, name: str, model: str, version: str) -> float | None:
    return metrics.registry.get_sample_value(
        f"imgserve_{name}", {"model": model, "version": version}
    )


def test_loads_and_serves_the_fixture_repository(model_repository: Path) -> None:
    metrics = Metrics()

    async def main() -> None:
        manager = ModelManager(settings(model_repository), metrics)
        await manager.start()
        assert manager.all_ready
        assert [(m.name, m.version) for m in manager.served()] == [(n, 1) for n in FIXTURE_MODELS]
        assert {s.state for s in manager.index()} == {"READY"}
        for name in FIXTURE_MODELS:
            model = manager.get(name)
            assert model is manager.get(name, "1")
            assert model.device == "cpu"
            assert len(model.labels) == model.num_classes == 10
            assert model.config.max_batch_size == 64
            assert model.config.dynamic_batching.max_queue_delay_microseconds == 0  # no waiting
            inputs, expected = reference(model_repository, name)
            assert model.input_shape == inputs.shape[1:]
            out = await model.classify(inputs)
            np.testing.assert_allclose(out, expected, rtol=0, atol=1e-5)
            assert model.stats.success_count == 1
            assert model.stats.inference_count >= len(inputs)
            assert gauge(metrics, "model_ready", name, "1") == 1
            assert gauge(metrics, "model_load_duration_seconds", name, "1") > 0
        assert manager.get("fashion_mnist").platform == "onnxruntime_onnx"
        assert manager.get("fashion_mnist_ts").platform == "pytorch_libtorch"
        with pytest.raises(InvalidInputError, match=r"expects float32 \[N, 1, 28, 28\]"):
            await manager.get("fashion_mnist").classify(np.zeros((1, 3, 32, 32), np.float32))
        await manager.close()
        assert manager.served() == []
        assert gauge(metrics, "model_ready", "cifar10", "1") == 0

    asyncio.run(main())


def test_broken_versions_are_unavailable_with_reasons_and_others_serve(
    writable_repository: Path,
) -> None:
    repo = writable_repository
    inputs, outputs = reference(repo, "cifar10")
    np.savez(
        clone_model(repo, "cifar10", "tampered") / "1" / REFERENCE_FILE,
        inputs=inputs,
        outputs=outputs + np.float32(0.31),
    )
    (clone_model(repo, "fashion_mnist", "corrupt") / "1" / ONNX_FILE).write_bytes(b"\0" * 64)
    (clone_model(repo, "fashion_mnist_ts", "corrupt_ts") / "1" / TORCHSCRIPT_FILE).write_text("x")
    (clone_model(repo, "fashion_mnist", "no_file") / "1" / ONNX_FILE).unlink()
    clone_model(repo, "fashion_mnist", "wrong_dims")
    edit_config(repo, "wrong_dims", lambda c: c.input[0].ClearField("dims"))
    edit_config(repo, "wrong_dims", lambda c: c.input[0].dims.extend([1, 32, 32]))
    clone_model(repo, "fashion_mnist", "wrong_classes")
    edit_config(repo, "wrong_classes", lambda c: c.output[0].dims.__setitem__(0, 12))
    (repo / "wrong_classes" / LABELS_FILE).write_text("".join(f"c{i}\n" for i in range(12)))
    (clone_model(repo, "fashion_mnist", "few_labels") / LABELS_FILE).write_text("a\nb\n")
    (clone_model(repo, "fashion_mnist", "bad_config") / CONFIG_FILE).write_text("name: [")
    latin1 = 'name: "bad_utf8"  # entra\u00eene sur Fashion-MNIST\n'.encode("latin-1")
    (clone_model(repo, "fashion_mnist", "bad_utf8") / CONFIG_FILE).write_bytes(latin1)
    (repo / "lost+found").mkdir()  # the root of an ext4 volume: not a model
    (repo / ".export-tmp").mkdir()  # hidden: a staging folder, not a model
    metrics = Metrics()

    async def main() -> None:
        manager = ModelManager(settings(repo), metrics)
        await manager.start()
        assert not manager.all_ready
        assert [m.name for m in manager.served()] == list(FIXTURE_MODELS)
        reasons = {s.name: s.reason for s in manager.index() if s.state != "READY"}
        assert not {"lost+found", ".export-tmp"} & {s.name for s in manager.index()}
        assert reasons["tampered"] == "reference check failed: max abs diff 0.31 > 0.0001"
        assert reasons["corrupt"].startswith("onnxruntime cannot load model.onnx")
        assert reasons["corrupt_ts"].startswith("torch cannot load model.pt")
        assert reasons["no_file"] == "model file no_file/1/model.onnx not found"
        assert reasons["wrong_dims"].startswith("warm-up at batch 1 failed:")
        assert "dimensions" in reasons["wrong_dims"]
        assert reasons["wrong_classes"] == (
            "model returns shape (1, 10) for output 'probabilities' at batch 1; "
            "the config expects (1, 12)"
        )
        assert reasons["few_labels"] == (
            "few_labels/labels.txt has 2 labels, the output has 10 classes"
        )
        assert reasons["bad_config"].startswith("bad config: bad_config/config.pbtxt: 1:7")
        assert reasons["bad_utf8"] == (
            "bad config: bad_utf8/config.pbtxt: not UTF-8 text (byte 0xee at offset 25)"
        )
        assert set(reasons) == {
            "tampered", "corrupt", "corrupt_ts", "no_file", "wrong_dims",
            "wrong_classes", "few_labels", "bad_config", "bad_utf8",
        }  # fmt: skip
        # Reasons reach clients: files are named within the repository, never by server path.
        assert "corrupt/1/model.onnx" in reasons["corrupt"]
        assert not [r for r in reasons.values() if str(repo) in r or str(repo.parent) in r]
        assert state_of(manager, "tampered") == [
            ModelState("tampered", "1", "UNAVAILABLE", reasons["tampered"])
        ]
        assert state_of(manager, "bad_config")[0].version == ""
        assert gauge(metrics, "model_ready", "tampered", "1") == 0
        with pytest.raises(ModelUnavailableError, match="reference check failed"):
            manager.get("tampered")
        with pytest.raises(ModelUnavailableError, match="max abs diff"):
            await manager.load("tampered")
        with pytest.raises(ModelUnavailableError, match="not UTF-8") as raised:
            await manager.load("bad_utf8")
        assert str(repo) not in str(raised.value)
        out = await manager.get("cifar10").classify(inputs)
        np.testing.assert_allclose(out, outputs, rtol=0, atol=1e-5)
        await manager.close()

    asyncio.run(main())


def test_version_policies_latest_all_specific(writable_repository: Path) -> None:
    repo = writable_repository
    shutil.copytree(repo / "fashion_mnist" / "1", repo / "fashion_mnist" / "2")
    metrics = Metrics()

    def policy(**choice: object) -> Callable[[ModelConfig], None]:
        def change(config: ModelConfig) -> None:
            config.ClearField("version_policy")
            kind, value = next(iter(choice.items()))
            target = getattr(config.version_policy, kind)
            target.SetInParent()
            if kind == "specific":
                target.versions.extend(value)
            elif kind == "latest":
                target.num_versions = value

        return change

    def versions(manager: ModelManager) -> list[int]:
        return [m.version for m in manager.served()]

    async def main() -> None:
        manager = ModelManager(settings(repo, models=("fashion_mnist",)), metrics)
        await manager.start()
        assert manager.all_ready
        assert versions(manager) == [2]  # default policy: the latest version only
        assert manager.get("fashion_mnist").version == 2
        with pytest.raises(ModelNotFoundError, match="'fashion_mnist' version 1 is not found"):
            manager.get("fashion_mnist", "1")
        first = manager.get("fashion_mnist")

        edit_config(repo, "fashion_mnist", policy(all=True))
        await manager.load("fashion_mnist")
        assert versions(manager) == [1, 2]
        assert manager.get("fashion_mnist").version == 2
        assert manager.get("fashion_mnist", "1").version == 1
        assert manager.get("fashion_mnist", "2") is not first  # replaced by the new load
        with pytest.raises(ModelUnavailableError):
            await first.classify(np.zeros((1, 1, 28, 28), np.float32))

        edit_config(repo, "fashion_mnist", policy(specific=[1]))
        await manager.load("fashion_mnist")
        assert versions(manager) == [1]
        assert manager.get("fashion_mnist").version == 1
        with pytest.raises(ModelNotFoundError):
            manager.get("fashion_mnist", "2")

        edit_config(repo, "fashion_mnist", policy(specific=[1, 3]))
        with pytest.raises(ModelUnavailableError, match="version 3: version folder 3 not found"):
            await manager.load("fashion_mnist")
        assert versions(manager) == [1]
        assert ModelState("fashion_mnist", "3", "UNAVAILABLE", "version folder 3 not found") in (
            manager.index()
        )
        with pytest.raises(ModelUnavailableError, match="version folder 3 not found"):
            manager.get("fashion_mnist", "3")

        edit_config(repo, "fashion_mnist", policy(latest=2))
        await manager.load("fashion_mnist")
        assert versions(manager) == [1, 2]
        assert [s.state for s in state_of(manager, "fashion_mnist")] == ["READY", "READY"]
        out = await manager.get("fashion_mnist", "1").classify(np.zeros((2, 1, 28, 28), np.float32))
        assert out.shape == (2, 10)
        await manager.close()

    asyncio.run(main())


def test_instance_group_count_creates_that_many_runtimes(writable_repository: Path) -> None:
    repo = writable_repository
    edit_config(repo, "fashion_mnist", lambda c: setattr(c.instance_group[0], "count", 2))

    async def main() -> None:
        manager = ModelManager(settings(repo, models=("fashion_mnist",)), Metrics())
        await manager.start()
        model = manager.get("fashion_mnist")
        assert len(model.runtimes) == 2
        assert model.runtimes[0] is not model.runtimes[1]
        x = np.random.default_rng(0).random((150, 1, 28, 28), dtype=np.float32)
        results = await asyncio.gather(*(model.classify(x[i : i + 50]) for i in range(0, 150, 50)))
        np.testing.assert_allclose(
            np.concatenate(results),
            model.runtimes[1].run({"input": x})["probabilities"],
            rtol=0,
            atol=1e-6,
        )
        await manager.close()

    asyncio.run(main())


def test_lookups_unload_and_reload(model_repository: Path) -> None:
    metrics = Metrics()

    async def main() -> None:
        manager = ModelManager(settings(model_repository, models=("cifar10", "nope")), metrics)
        await manager.start()
        assert not manager.all_ready  # "nope" was asked for and has no folder
        assert state_of(manager, "nope")[0].reason == "no model 'nope' in the repository"
        assert state_of(manager, "fashion_mnist") == [
            ModelState("fashion_mnist", "", "UNAVAILABLE", "not loaded")
        ]
        with pytest.raises(ModelNotFoundError, match="unknown model: 'missing' is not found"):
            manager.get("missing")
        with pytest.raises(ModelNotFoundError, match="'cifar10' version 7 is not found"):
            manager.get("cifar10", "7")
        with pytest.raises(ModelNotFoundError):
            manager.get("cifar10", "latest")
        with pytest.raises(ModelUnavailableError, match="no model 'nope'"):
            manager.get("nope")
        with pytest.raises(ModelNotFoundError):
            await manager.load("nope")
        with pytest.raises(ModelNotFoundError):
            await manager.load("../elsewhere")

        model = manager.get("cifar10")
        pending = [
            asyncio.ensure_future(model.classify(np.zeros((1, 3, 32, 32), np.float32)))
            for _ in range(8)
        ]
        await asyncio.sleep(0)  # each task runs up to its queue wait: all 8 are accepted
        assert model.queue_depth == 8
        await manager.unload("cifar10")  # accepted requests finish first
        assert all(task.done() and task.result().shape == (1, 10) for task in pending)
        with pytest.raises(ModelUnavailableError, match="unloaded"):
            manager.get("cifar10")
        with pytest.raises(ModelUnavailableError):
            await model.classify(np.zeros((1, 3, 32, 32), np.float32))
        assert state_of(manager, "cifar10") == [
            ModelState("cifar10", "1", "UNAVAILABLE", "unloaded")
        ]
        assert gauge(metrics, "model_ready", "cifar10", "1") == 0
        with pytest.raises(ModelNotFoundError):
            await manager.unload("cifar10")

        await manager.load("cifar10")
        again = manager.get("cifar10")
        assert again is not model
        assert state_of(manager, "cifar10") == [ModelState("cifar10", "1", "READY", "")]
        assert gauge(metrics, "model_ready", "cifar10", "1") == 1
        inputs, expected = reference(model_repository, "cifar10")
        np.testing.assert_allclose(await again.classify(inputs), expected, rtol=0, atol=1e-5)

        await manager.load("fashion_mnist")
        assert [m.name for m in manager.served()] == ["cifar10", "fashion_mnist"]
        await manager.close()

    asyncio.run(main())


def test_loading_keeps_the_event_loop_responsive(writable_repository: Path) -> None:
    """Session creation and warm-up run in threads: a slow load never stalls the loop."""
    repo = writable_repository

    def heavy(config: ModelConfig) -> None:  # warm-up at batch 512 on two instances
        config.max_batch_size = 512
        config.instance_group[0].count = 2

    edit_config(repo, "cifar10", heavy)

    async def main() -> tuple[float, float]:
        manager = ModelManager(settings(repo, models=("cifar10",)), Metrics())
        gaps: list[float] = []

        async def tick() -> None:
            last = time.monotonic()
            while True:
                await asyncio.sleep(0.005)
                now = time.monotonic()
                gaps.append(now - last)
                last = now

        ticker = asyncio.ensure_future(tick())
        began = time.monotonic()
        await manager.start()
        took = time.monotonic() - began
        ticker.cancel()
        assert manager.all_ready
        await manager.close()
        return took, max(gaps, default=took)  # no tick at all: the loop was blocked

    took, worst = asyncio.run(main())
    # Loading on the loop would stall it for the whole load (one version: worst ~ took).
    assert worst < took / 2, (worst, took)


def test_serving_onnx_models_never_imports_torch(model_repository: Path) -> None:
    code = (
        "import asyncio, sys\n"
        "from pathlib import Path\n"
        "import server.__main__, server.app\n"
        "from server.config import Settings\n"
        "from server.core.manager import ModelManager\n"
        "from server.observability.metrics import Metrics\n"
        "async def main():\n"
        f"    s = Settings(model_repository=Path({str(model_repository)!r}),"
        " models=('fashion_mnist', 'cifar10'))\n"
        "    m = ModelManager(s, Metrics())\n"
        "    await m.start()\n"
        "    assert m.all_ready, m.index()\n"
        "    await m.close()\n"
        "asyncio.run(main())\n"
        "print('torch' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_models_waiting_to_load_are_known_and_loading(model_repository: Path) -> None:
    async def main() -> None:
        manager = ModelManager(settings(model_repository), Metrics())
        starting = asyncio.ensure_future(manager.start())
        for _ in range(2000):  # until start() has listed the repository (bounded: 2 s)
            await asyncio.sleep(0.001)
            if any(s.state == "LOADING" for s in manager.index()):
                break
        states = {s.name: s.state for s in manager.index()}
        assert set(states.values()) <= {"LOADING", "READY"}
        waiting = [name for name, state in states.items() if state == "LOADING"]
        assert waiting
        assert not manager.all_ready
        with pytest.raises(ModelUnavailableError, match="not ready: loading"):
            manager.get(waiting[-1])
        await starting
        assert manager.all_ready
        await manager.close()
        with pytest.raises(ModelUnavailableError, match="shutting down"):
            await manager.load("cifar10")

    asyncio.run(main())


def test_start_reports_each_model_as_it_loads_and_close_abandons_a_slow_load(
    model_repository: Path, tmp_path: Path
) -> None:
    repo = tmp_path / "repository"
    repo.mkdir()
    shutil.copytree(model_repository / "fashion_mnist", repo / "fashion_mnist")
    write_slow_model(repo, "slow", instances=200)  # about 20 s to load in full
    seen: list[dict[str, str]] = []

    async def main() -> tuple[float, ModelManager]:
        manager = ModelManager(settings(repo, intra_op_threads=1), Metrics())

        async def on_change() -> None:
            seen.append({s.name: s.state for s in manager.index()})

        starting = asyncio.ensure_future(manager.start(on_change))
        for _ in range(600):  # bounded: 30 s, until fashion_mnist serves and slow loads
            await asyncio.sleep(0.05)
            if len(seen) >= 2:
                break
        assert seen[:2] == [
            {"fashion_mnist": "LOADING", "slow": "LOADING"},
            {"fashion_mnist": "READY", "slow": "LOADING"},
        ]
        assert not starting.done()
        began = time.monotonic()
        await manager.close()
        await asyncio.wait_for(starting, 30)
        return time.monotonic() - began, manager

    took, manager = asyncio.run(main())
    # The thread finishes the step in progress (one session or one warm-up run), not the load.
    assert took < 5.0, took
    assert state_of(manager, "slow") == [ModelState("slow", "1", "UNAVAILABLE", "server stopped")]
    assert manager.served() == [] and not manager.all_ready


def test_models_trained_on_synthetic_data_are_flagged(
    writable_repository: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = writable_repository
    edit_config(repo, "cifar10", lambda c: c.parameters.pop(TRAINING_DATASET_PARAMETER))
    edit_config(
        repo,
        "fashion_mnist_ts",
        lambda c: c.parameters[TRAINING_DATASET_PARAMETER].__setattr__("string_value", "cifar10"),
    )

    async def main() -> dict[str, tuple[str, bool]]:
        manager = ModelManager(settings(repo), Metrics())
        await manager.start()
        flags = {m.name: (m.training_dataset, m.synthetic) for m in manager.served()}
        await manager.close()
        return flags

    with caplog.at_level("WARNING", logger="server.core.manager"):
        flags = asyncio.run(main())
    assert flags == {
        "cifar10": ("", False),  # exported before the dataset was recorded
        "fashion_mnist": ("synthetic", True),
        "fashion_mnist_ts": ("cifar10", False),
    }
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        "model fashion_mnist was trained on SYNTHETIC data: "
        "predictions are meaningless for real images"
    ]
