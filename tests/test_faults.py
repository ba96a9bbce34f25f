"""Faults are isolated and observable: request ids, logs, metrics, RepositoryIndex.

One server (JSON logs at DEBUG) serves, next to a good `fashion_mnist`:
- `raising_ts`: a TorchScript module that raises at run time for any batch holding a pixel of
  exactly 1.0 (tests/test_errors.py covers the same fault in onnxruntime);
- `corrupt`: a model whose model.onnx is not a model;
- `mixed`: version 1 good, version 2 whose reference.npz no longer matches its outputs
  (version_policy all: version 1 must keep serving, version 2 must be reported).
Hot reload under load runs on a server of its own.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re
import shutil
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
from server_process import ServerProcess, clone_model, kserve_method, onnx_probabilities

from modelrepo.config import load_config, write_config
from modelrepo.layout import CONFIG_FILE, ONNX_FILE, REFERENCE_FILE, TORCHSCRIPT_FILE
from server.api.status import INTERNAL_MESSAGE
from server.observability import logs
from wire import classifier_pb2, classifier_pb2_grpc
from wire import grpc_service_pb2 as pb

pytestmark = pytest.mark.both_transports
SHAPE = (1, 28, 28)
GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def _raising_module(model_file: Path) -> None:
    """A scripted module whose forward raises when any pixel is exactly 1.0; its own
    reference.npz (pixels below 1.0) so it loads."""
    import torch

    class Raising(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(784, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if bool(torch.any(x == 1.0)):
                raise RuntimeError("poison pixel 1.0 in the batch")
            return torch.softmax(self.linear(torch.flatten(x, 1)), dim=1)

    torch.manual_seed(0)
    with warnings.catch_warnings():  # TorchScript is deprecated upstream; the platform is not
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.script(Raising().eval())
    module.save(str(model_file))
    inputs = np.random.default_rng(0).random((4, *SHAPE), dtype=np.float32) * 0.9
    with torch.no_grad():
        outputs = module(torch.from_numpy(inputs)).numpy()
    np.savez(model_file.parent / REFERENCE_FILE, inputs=inputs, outputs=outputs)


def _build(repo: Path, source: Path) -> None:
    raising = clone_model(source / "fashion_mnist_ts", repo, "raising_ts")
    _raising_module(raising / "1" / TORCHSCRIPT_FILE)

    corrupt = clone_model(repo / "fashion_mnist", repo, "corrupt")
    (corrupt / "1" / ONNX_FILE).write_bytes(b"\x08\x07 this is not an onnx model")

    mixed = clone_model(repo / "fashion_mnist", repo, "mixed")
    shutil.copytree(mixed / "1", mixed / "2")
    reference = mixed / "2" / REFERENCE_FILE
    with np.load(reference) as data:
        inputs, outputs = data["inputs"], data["outputs"]
    np.savez(reference, inputs=inputs, outputs=outputs[:, ::-1].copy())
    config = load_config(mixed / CONFIG_FILE)
    config.version_policy.all.SetInParent()
    write_config(mixed / CONFIG_FILE, config)


@pytest.fixture(scope="module")
def server(serve: Callable[..., ServerProcess], model_repository: Path) -> ServerProcess:
    return serve(
        "--log-format", "json", "--log-level", "debug",
        models=["fashion_mnist"],
        prepare=lambda repo: _build(repo, model_repository),
    )  # fmt: skip


def _images(n: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *SHAPE), dtype=np.float32) * 0.9


def _infer_request(model: str, images: np.ndarray, version: str = "") -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.inputs.add(name="input", datatype="FP32", shape=list(images.shape))
    request.raw_input_contents.append(images.tobytes())
    return request


def _entries(server: ServerProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in server.log.splitlines() if line.startswith("{")]


def _wait_for_entry(
    server: ServerProcess,
    match: Callable[[dict[str, Any]], bool],
    timeout: float = 10.0,
    count: int = 1,
) -> list[dict[str, Any]]:
    """The matching log entries once there are `count` of them, or all there are at `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in _entries(server) if match(e)]
        if len(found) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


# --- request ids ---


def _unary_id(call: Any, request: object, metadata: tuple[tuple[str, str], ...]) -> str:
    """The x-request-id the server sent back, whether the call succeeded or failed."""
    try:
        _, rpc = call.with_call(request, metadata=metadata, timeout=30)
        trailing = rpc.trailing_metadata()
    except grpc.RpcError as exc:
        trailing = exc.trailing_metadata()
    [request_id] = [value for key, value in trailing if key == "x-request-id"]
    return request_id


def test_request_ids_are_echoed_or_generated(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.target) as channel:
        infer = kserve_method(channel, "ModelInfer")
        classify = classifier_pb2_grpc.ClassifierStub(channel).Classify
        good = _infer_request("fashion_mnist", _images())
        native = classifier_pb2.ClassifyRequest(
            model="fashion_mnist",
            images=[
                classifier_pb2.Image(
                    tensor=classifier_pb2.Tensor(
                        shape=list(SHAPE), datatype="FP32", data=_images().tobytes()
                    )
                )
            ],
        )
        unknown = _infer_request("no_such_model", _images())
        for call, request in ((infer, good), (classify, native), (infer, unknown)):
            assert _unary_id(call, request, (("x-request-id", "order-42/a"),)) == "order-42/a"
            generated = {_unary_id(call, request, ()) for _ in range(3)}
            assert len(generated) == 3 and all(GENERATED_ID.fullmatch(g) for g in generated)
            # gRPC itself refuses control characters, non-ASCII and headers past its size limit.
            for bad in ("x" * 129, "x" * 4000, ""):
                replaced = _unary_id(call, request, (("x-request-id", bad),))
                assert GENERATED_ID.fullmatch(replaced), (bad, replaced)
        # A stream has one id: the stream's.
        stream = kserve_method(channel, "ModelStreamInfer")(
            iter([good, unknown]), metadata=(("x-request-id", "stream-7"),), timeout=30
        )
        answers = list(stream)
        assert [bool(a.error_message) for a in answers].count(True) == 1
        assert ("x-request-id", "stream-7") in stream.trailing_metadata()


def test_client_errors_log_quietly_and_server_faults_log_a_traceback(
    server: ServerProcess,
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        infer = kserve_method(channel, "ModelInfer")
        bad = _infer_request("fashion_mnist", _images())
        bad.inputs[0].datatype = "INT32"
        with pytest.raises(grpc.RpcError) as caught:
            infer(bad, metadata=(("x-request-id", "client-fault-1"),), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        poison = _images()
        poison[0, 0, 0, 0] = 1.0
        with pytest.raises(grpc.RpcError) as caught:
            infer(
                _infer_request("raising_ts", poison),
                metadata=(("x-request-id", "server-fault-1"),),
                timeout=30,
            )
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        assert caught.value.details() == INTERNAL_MESSAGE  # nothing of torch leaks

    client = _wait_for_entry(server, lambda e: e.get("request_id") == "client-fault-1")
    assert client, server.log
    assert all(e["level"] in ("debug", "info") and "exception" not in e for e in client)
    assert any("INVALID_ARGUMENT" in e["message"] for e in client)
    fault = _wait_for_entry(server, lambda e: e.get("request_id") == "server-fault-1")
    errors = [e for e in fault if e["level"] == "error"]
    assert errors, server.log
    assert "Traceback" in errors[0]["exception"] and "poison pixel" in errors[0]["exception"]


# --- faults at run time and at load time ---


def test_torchscript_runtime_failure_is_isolated(server: ServerProcess) -> None:
    before = server.metric("imgserve_requests_total", model="raising_ts", code="INTERNAL")
    failures = server.metric("imgserve_batches_total", model="raising_ts", outcome="failure")
    poison = _images(seed=1)
    poison[0, 0, 5, 5] = 1.0
    with grpc.insecure_channel(server.target) as channel:
        infer = kserve_method(channel, "ModelInfer")
        with pytest.raises(grpc.RpcError) as caught:
            infer(_infer_request("raising_ts", poison), timeout=30)
        assert caught.value.code() == grpc.StatusCode.INTERNAL
        # The same model answers the next request, and so do the others.
        clean = _images(2, seed=2)
        answer = infer(_infer_request("raising_ts", clean), timeout=30)
        assert np.frombuffer(answer.raw_output_contents[0], np.float32).shape == (20,)
        answer = infer(_infer_request("fashion_mnist", clean), timeout=30)
        expected = onnx_probabilities(server.repository / "fashion_mnist" / "1" / ONNX_FILE, clean)
        got = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(2, 10)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    after = server.metric("imgserve_requests_total", model="raising_ts", code="INTERNAL")
    assert after == before + 1
    assert (
        server.metric("imgserve_batches_total", model="raising_ts", outcome="failure")
        == failures + 1
    )


def test_broken_models_and_versions_are_reported_and_the_rest_serves(
    server: ServerProcess,
) -> None:
    with grpc.insecure_channel(server.target) as channel:
        index = kserve_method(channel, "RepositoryIndex")(pb.RepositoryIndexRequest(), timeout=30)
        states = {(m.name, m.version): (m.state, m.reason) for m in index.models}
        assert states[("corrupt", "1")][0] == "UNAVAILABLE"
        assert states[("corrupt", "1")][1].startswith("onnxruntime cannot load model.onnx")
        assert "corrupt/1/model.onnx" in states[("corrupt", "1")][1]
        assert states[("mixed", "1")] == ("READY", "")
        assert states[("mixed", "2")][0] == "UNAVAILABLE"
        assert states[("mixed", "2")][1].startswith("reference check failed: max abs diff")
        assert str(server.repository) not in str(states)

        infer = kserve_method(channel, "ModelInfer")
        images = _images(3, seed=3)
        answer = infer(_infer_request("mixed", images), timeout=30)  # the good version answers
        assert answer.model_version == "1"
        expected = onnx_probabilities(server.repository / "mixed" / "1" / ONNX_FILE, images)
        got = np.frombuffer(answer.raw_output_contents[0], np.float32).reshape(3, 10)
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
        for model, version in (("mixed", "2"), ("corrupt", "")):
            with pytest.raises(grpc.RpcError) as caught:
                infer(_infer_request(model, images, version), timeout=30)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "reference check failed" in caught.value.details() or (
                "cannot load" in caught.value.details()
            )
    assert server.metric("imgserve_model_ready", model="mixed", version="1") == 1
    assert server.metric("imgserve_model_ready", model="mixed", version="2") == 0
    assert server.metric("imgserve_model_ready", model="corrupt", version="1") == 0
    assert server.metric("imgserve_requests_total", model="mixed", version="", code="UNAVAILABLE")
    errors = [e["message"] for e in _entries(server) if e["level"] == "error"]
    assert any(m.startswith("model mixed version 2 not served: reference check") for m in errors)
    assert any(m.startswith("model corrupt version 1 not served: onnxruntime") for m in errors)


# --- hot reload under load ---

RELOAD_CLIENTS = 8


@pytest.fixture(scope="module")
def reload_server(serve: Callable[..., ServerProcess]) -> ServerProcess:
    def prepare(repo: Path) -> None:
        config = load_config(repo / "fashion_mnist" / CONFIG_FILE)
        config.version_policy.all.SetInParent()
        write_config(repo / "fashion_mnist" / CONFIG_FILE, config)

    return serve("--enable-model-control", models=["fashion_mnist"], prepare=prepare)


def _set_versions(model_dir: Path, versions: list[int]) -> None:
    config = load_config(model_dir / CONFIG_FILE)
    config.version_policy.specific.ClearField("versions")
    config.version_policy.specific.versions.extend(versions)
    write_config(model_dir / CONFIG_FILE, config)


async def _load_while_serving(server: ServerProcess, images: np.ndarray) -> dict[str, Any]:
    """Closed-loop clients (unpinned: "the latest version") run through: load of version 2
    (1 and 2 both served), then a reload that keeps only version 2 (1 drains and closes)."""
    model_dir = server.repository / "fashion_mnist"
    outcomes: list[tuple[int, object]] = []
    stop = asyncio.Event()
    async with grpc.aio.insecure_channel(server.target) as channel:
        infer = kserve_method(channel, "ModelInfer")
        load = kserve_method(channel, "RepositoryModelLoad")

        async def client(worker: int) -> None:
            index = worker
            while not stop.is_set():
                row = index % len(images)
                try:
                    answer = await infer(
                        _infer_request("fashion_mnist", images[row : row + 1]), timeout=30
                    )
                except grpc.aio.AioRpcError as exc:
                    outcomes.append((row, exc.code()))
                else:
                    outcomes.append((row, answer))
                index += RELOAD_CLIENTS

        clients = [asyncio.create_task(client(i)) for i in range(RELOAD_CLIENTS)]
        await asyncio.sleep(0.5)
        shutil.copytree(model_dir / "1", model_dir / "2")
        await load(pb.RepositoryModelLoadRequest(model_name="fashion_mnist"), timeout=60)
        during_both = len(outcomes)
        await asyncio.sleep(0.5)
        _set_versions(model_dir, [2])
        await load(pb.RepositoryModelLoadRequest(model_name="fashion_mnist"), timeout=60)
        await asyncio.sleep(0.5)
        stop.set()
        await asyncio.gather(*clients)
    return {"outcomes": outcomes, "during_both": during_both}


def test_hot_reload_under_load_fails_no_request(reload_server: ServerProcess) -> None:
    images = _images(16, seed=9)
    expected = onnx_probabilities(
        reload_server.repository / "fashion_mnist" / "1" / ONNX_FILE, images
    )
    result = asyncio.run(_load_while_serving(reload_server, images))
    outcomes = result["outcomes"]
    failures = [(row, o) for row, o in outcomes if not isinstance(o, pb.ModelInferResponse)]
    assert not failures, failures[:5]
    versions = [o.model_version for _, o in outcomes]
    assert "1" in versions[: result["during_both"]] and versions[-1] == "2"
    # Once version 1 is closed, only 2 answers: the switch happened under load.
    last_one = max(i for i, v in enumerate(versions) if v == "1")
    assert set(versions[last_one + 1 :]) == {"2"} and len(versions) - last_one > RELOAD_CLIENTS
    for row, answer in outcomes:
        got = np.frombuffer(answer.raw_output_contents[0], np.float32)
        np.testing.assert_allclose(got, expected[row], rtol=0, atol=1e-6)
    assert reload_server.metric("imgserve_model_ready", model="fashion_mnist", version="1") == 0
    assert reload_server.metric("imgserve_model_ready", model="fashion_mnist", version="2") == 1


def test_both_log_formats_carry_the_request_id() -> None:
    """The id set for a request reaches text and JSON lines, from tasks the request starts
    too; lines outside any request have none."""

    async def request(name: str) -> None:
        logs.REQUEST_ID.set(name)
        await asyncio.sleep(0)
        await asyncio.create_task(asyncio.to_thread(logging.getLogger("t").warning, "in %s", name))

    async def main() -> None:
        await asyncio.gather(request("id-a"), request("id-b"))
        logging.getLogger("t").warning("outside")

    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        results = {}
        for log_format in ("text", "json"):
            logs.configure(log_format, "info")
            stream = io.StringIO()
            root.handlers[0].setStream(stream)  # type: ignore[attr-defined]
            asyncio.run(main())
            results[log_format] = stream.getvalue().splitlines()
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
    text = sorted(results["text"])
    assert any(line.endswith("WARNING t: [id-a] in id-a") for line in text), text
    assert any(line.endswith("WARNING t: [id-b] in id-b") for line in text), text
    assert any(line.endswith("WARNING t: outside") for line in text), text
    entries = {json.loads(line)["message"]: json.loads(line) for line in results["json"]}
    assert entries["in id-a"]["request_id"] == "id-a"
    assert entries["in id-b"]["request_id"] == "id-b"
    assert "request_id" not in entries["outside"]


def test_concurrent_requests_never_mix_their_ids_in_the_log(server: ServerProcess) -> None:
    """200 requests at once, each naming an unknown model after its own id: every line the
    server logs about one carries that one's id (each RPC has its own context)."""

    async def send() -> None:
        async with grpc.aio.insecure_channel(server.target) as channel:
            infer = kserve_method(channel, "ModelInfer")

            async def one(i: int) -> None:
                with pytest.raises(grpc.aio.AioRpcError):
                    await infer(
                        pb.ModelInferRequest(model_name=f"mix-{i}"),
                        metadata=(("x-request-id", f"mix-{i}"),),
                        timeout=30,
                    )

            await asyncio.gather(*(one(i) for i in range(200)))

    asyncio.run(send())
    # Lines of concurrent requests reach the log in no particular order: wait for all 200.
    about = _wait_for_entry(server, lambda e: "unknown model: 'mix-" in e["message"], count=200)
    assert len(about) == 200, len(about)
    for entry in about:
        assert f"unknown model: '{entry['request_id']}'" in entry["message"], entry
