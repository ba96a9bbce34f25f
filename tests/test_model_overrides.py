"""Loads with an override, as Triton's clients send them: the `config` load parameter (a JSON
ModelConfig instead of config.pbtxt) and `file:<path>` parameters (the model's files in the
request), over gRPC and HTTP, on a lone server and on two workers.

Real servers and tritonclient; each server's TMPDIR is a folder of the test's, so the tests
see where the server keeps an override's files (its own folder, never the repository) and
that it removes them.
"""

from __future__ import annotations

import json
import os
import re
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from http_calls import http_post
from onnx import TensorProto, helper
from server_process import ServerGroup, ServerProcess, kserve_method
from tritonclient.utils import InferenceServerException

from modelrepo.config import ModelConfig, write_config
from modelrepo.layout import CONFIG_FILE, ONNX_FILE, PLATFORM_ONNX
from server.api.status import WORKER_KEY
from wire import grpc_service_pb2 as pb
from wire import model_config_pb2 as mc

SIMPLE = "simple"  # in the repository: versions 1 and 2, max_batch_size 8
KEEPER = "keeper"  # in the repository, never touched: it must keep serving
SENT = "sent"  # not in the repository: made by a load from the request's files
WIDTH = 16
BATCH = 8
# Channels opened to reach every worker: all landing on one of two has odds 2**-23.
CHANNELS = 24
WORKER_LINE = re.compile(r"worker (\d+) \(pid (\d+)\) (started|restarted)")


def _onnx_add_sub() -> bytes:
    """Triton's `simple` interface: OUTPUT0 = INPUT0 + INPUT1, OUTPUT1 = INPUT0 - INPUT1, INT32."""
    tensors = [
        helper.make_tensor_value_info(name, TensorProto.INT32, ["N", WIDTH])
        for name in ("INPUT0", "INPUT1", "OUTPUT0", "OUTPUT1")
    ]
    graph = helper.make_graph(
        [
            helper.make_node("Add", ["INPUT0", "INPUT1"], ["OUTPUT0"]),
            helper.make_node("Sub", ["INPUT0", "INPUT1"], ["OUTPUT1"]),
        ],
        "add_sub",
        tensors[:2],
        tensors[2:],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


MODEL_BYTES = _onnx_add_sub()


def _write_model(repository: Path, name: str, versions: tuple[int, ...]) -> None:
    config = ModelConfig(name=name, platform=PLATFORM_ONNX, max_batch_size=BATCH)
    for tensor in ("INPUT0", "INPUT1"):
        config.input.add(name=tensor, data_type=mc.TYPE_INT32, dims=[WIDTH])
    for tensor in ("OUTPUT0", "OUTPUT1"):
        config.output.add(name=tensor, data_type=mc.TYPE_INT32, dims=[WIDTH])
    config.instance_group.add(count=1, kind=mc.ModelInstanceGroup.KIND_CPU)
    (repository / name).mkdir(parents=True)
    write_config(repository / name / CONFIG_FILE, config)
    for version in versions:
        (repository / name / str(version)).mkdir()
        (repository / name / str(version) / ONNX_FILE).write_bytes(MODEL_BYTES)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("override_source")
    _write_model(repository, SIMPLE, (1, 2))
    _write_model(repository, KEEPER, (1,))
    return repository


@pytest.fixture(scope="module")
def start(
    source: Path,
    tmp_path_factory: pytest.TempPathFactory,
    _exiting_servers: list[ServerGroup],
) -> Iterator[Callable[..., tuple[ServerProcess, Path]]]:
    """`start(workers)`: a model-control server on a copy of `source`, and its TMPDIR."""
    group = ServerGroup(source, lambda: tmp_path_factory.mktemp("served"))
    _exiting_servers.append(group)

    def started(workers: int) -> tuple[ServerProcess, Path]:
        temporary = tmp_path_factory.mktemp("server_tmp")
        server = group.start(
            "--enable-model-control", "--workers", str(workers), env={"TMPDIR": str(temporary)}
        )
        return server, temporary

    yield started
    group.signal_all()


@pytest.fixture(scope="module", params=[1, 2], ids=["workers1", "workers2"])
def served(
    request: pytest.FixtureRequest, start: Callable[..., tuple[ServerProcess, Path]]
) -> tuple[ServerProcess, Path, int]:
    server, temporary = start(request.param)
    return server, temporary, request.param


@pytest.fixture
def clients(
    served: tuple[ServerProcess, Path, int],
) -> Iterator[tuple[grpcclient.InferenceServerClient, httpclient.InferenceServerClient]]:
    server = served[0]
    grpc_client = grpcclient.InferenceServerClient(server.target)
    http_client = httpclient.InferenceServerClient(server.http_target)
    yield grpc_client, http_client
    grpc_client.close()
    http_client.close()


def _infer(client: grpcclient.InferenceServerClient, model: str, version: str = "") -> str:
    """One add/sub call (checked); the version that answered."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(-100, 100, (2, WIDTH), dtype=np.int32) for _ in range(2))
    inputs = [grpcclient.InferInput(n, [2, WIDTH], "INT32") for n in ("INPUT0", "INPUT1")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer(model, inputs, model_version=version)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    return result.get_response().model_version


def _configs_by_worker(server: ServerProcess, workers: int, model: str) -> dict[int, ModelConfig]:
    """Each worker's own ModelConfig of `model` (a worker answers from what it loaded)."""
    found: dict[int, ModelConfig] = {}
    for _ in range(CHANNELS):
        options = [("grpc.use_local_subchannel_pool", 1)]  # a connection of its own
        with grpc.insecure_channel(server.target, options=options) as channel:
            response, call = kserve_method(channel, "ModelConfig").with_call(
                pb.ModelConfigRequest(name=model), timeout=10
            )
        found[int(dict(call.trailing_metadata()).get(WORKER_KEY, 0))] = response.config
        if len(found) == workers:
            return found
    raise AssertionError(f"reached workers {sorted(found)} of {workers}")


def _override_folders(temporary: Path, model: str) -> list[Path]:
    """The server's folders holding an override of `model` (in its TMPDIR)."""
    return sorted(p for p in temporary.rglob(model) if (p / CONFIG_FILE).is_file())


def _repository_files(server: ServerProcess) -> dict[str, bytes]:
    return {
        str(p.relative_to(server.repository)): p.read_bytes()
        for p in sorted(server.repository.rglob("*"))
        if p.is_file()
    }


def test_a_config_override_replaces_config_pbtxt_for_that_load(
    served: tuple[ServerProcess, Path, int],
    clients: tuple[grpcclient.InferenceServerClient, httpclient.InferenceServerClient],
) -> None:
    server, temporary, workers = served
    grpc_client, http_client = clients
    repository = _repository_files(server)
    assert grpc_client.get_model_config(SIMPLE).config.max_batch_size == BATCH
    assert _infer(grpc_client, SIMPLE) == "2"  # the default policy: the latest version

    # gRPC: another batch size and version policy; the rest auto-completed from the graph.
    override = {"max_batch_size": 4, "version_policy": {"specific": {"versions": [1]}}}
    grpc_client.load_model(SIMPLE, config=json.dumps(override))
    for worker, config in _configs_by_worker(server, workers, SIMPLE).items():
        assert config.max_batch_size == 4, f"worker {worker}"
        assert list(config.version_policy.specific.versions) == [1], f"worker {worker}"
        assert [t.name for t in config.input] == ["INPUT0", "INPUT1"], f"worker {worker}"
    assert grpc_client.is_model_ready(SIMPLE, "1") and not grpc_client.is_model_ready(SIMPLE, "2")
    assert _infer(grpc_client, SIMPLE) == "1"

    # HTTP, with the int64 fields as protobuf's JSON mapping writes them (strings).
    http_client.load_model(SIMPLE, config=json.dumps({"max_batch_size": "2"}))
    assert http_client.get_model_config(SIMPLE)["max_batch_size"] == 2
    assert {c.max_batch_size for c in _configs_by_worker(server, workers, SIMPLE).values()} == {2}
    assert _infer(grpc_client, SIMPLE) == "2"

    # A load without parameters reads the repository again.
    grpc_client.load_model(SIMPLE)
    assert {c.max_batch_size for c in _configs_by_worker(server, workers, SIMPLE).values()} == {
        BATCH
    }
    assert _infer(grpc_client, SIMPLE) == "2"
    assert _repository_files(server) == repository  # nothing written into the repository
    assert _override_folders(temporary, SIMPLE) == []
    assert _infer(grpc_client, KEEPER) == "1"


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_model_files_in_the_request_make_a_model_the_repository_lacks(
    served: tuple[ServerProcess, Path, int],
    clients: tuple[grpcclient.InferenceServerClient, httpclient.InferenceServerClient],
    protocol: str,
) -> None:
    server, temporary, workers = served
    grpc_client, http_client = clients
    client = grpc_client if protocol == "grpc" else http_client
    assert not (server.repository / SENT).exists()
    config = json.dumps({"backend": "onnxruntime", "max_batch_size": 4})
    client.load_model(SENT, config=config, files={f"file:1/{ONNX_FILE}": MODEL_BYTES})

    assert grpc_client.is_model_ready(SENT, "1")
    assert _infer(grpc_client, SENT) == "1"
    for worker, loaded in _configs_by_worker(server, workers, SENT).items():
        assert (loaded.platform, loaded.max_batch_size) == (PLATFORM_ONNX, 4), f"worker {worker}"
    index = {m.name: m.state for m in grpc_client.get_model_repository_index().models}
    assert index == {SIMPLE: "READY", KEEPER: "READY", SENT: "READY"}
    # The files live in one folder of the server's own (with workers: one for all of them).
    assert not (server.repository / SENT).exists()
    [folder] = _override_folders(temporary, SENT)
    assert (folder / "1" / ONNX_FILE).read_bytes() == MODEL_BYTES

    client.unload_model(SENT)
    assert not grpc_client.is_model_ready(SENT)
    assert _override_folders(temporary, SENT) == []  # removed with the model, as in Triton
    assert _infer(grpc_client, SIMPLE) == "2" and _infer(grpc_client, KEEPER) == "1"


def test_model_files_replace_the_whole_model_folder(
    served: tuple[ServerProcess, Path, int],
    clients: tuple[grpcclient.InferenceServerClient, httpclient.InferenceServerClient],
) -> None:
    """As in Triton: the files sent are the model's folder, its repository versions unused."""
    server, temporary, _ = served
    grpc_client, _ = clients
    repository = _repository_files(server)
    grpc_client.load_model(
        SIMPLE, config="{}", files={f"file:3/{ONNX_FILE}": MODEL_BYTES, "file:notes.txt": b"x"}
    )
    assert grpc_client.is_model_ready(SIMPLE, "3")
    assert not any(grpc_client.is_model_ready(SIMPLE, v) for v in ("1", "2"))
    assert _infer(grpc_client, SIMPLE) == "3"
    assert _repository_files(server) == repository

    grpc_client.load_model(SIMPLE)  # back to the repository's folder; the override is removed
    assert grpc_client.is_model_ready(SIMPLE, "2") and not grpc_client.is_model_ready(SIMPLE, "3")
    assert _infer(grpc_client, SIMPLE) == "2"
    assert _override_folders(temporary, SIMPLE) == []


POLL_FAILED = "failed to load 'simple', failed to poll from model repository: "
FILE = f"file:1/{ONNX_FILE}"
# (config, files, the message's end): refused on both protocols with INTERNAL (HTTP 500) and
# Triton's words, as Triton refuses them (its own model-control example checks both).
MALFORMED = [
    (None, {FILE: MODEL_BYTES}, "Load parameter 'config' must be specified for model file"),
    ("{not json", {}, "Invalid config override: not valid JSON: Expecting property name"),
    ("[1, 2]", {}, "Invalid config override: expected a JSON object, got list"),
    ('{"max_batch_size": "many"}', {}, "Invalid config override: Failed to parse max_batch_size"),
    ('{"input": [{"data_type": "TYPE_COLOUR"}]}', {}, "Invalid enum value TYPE_COLOUR"),
    ('{"name": "other"}', {}, "the config override names the model 'other', not 'simple'"),
    ("{}", {"file:../../escaped.onnx": b"x"}, "'file:../../escaped.onnx' must stay within model"),
    ("{}", {"file:/tmp/escaped.onnx": b"x"}, "'file:/tmp/escaped.onnx' must stay within model"),
    ("{}", {"file:config.pbtxt": b"x"}, "the model configuration is the 'config' parameter"),
    ("{}", {"file:1": b"x", FILE: b"y"}, f"'{FILE}', directory has been created as a file"),
    ("{}", {"file:" + "A" * 256: b"x"}, "a name is longer than 255 bytes"),
]  # fmt: skip


def test_malformed_overrides_are_refused_and_nothing_changes(
    served: tuple[ServerProcess, Path, int],
    clients: tuple[grpcclient.InferenceServerClient, httpclient.InferenceServerClient],
) -> None:
    server, temporary, workers = served
    grpc_client, http_client = clients
    for config, files, reason in MALFORMED:
        for client, code in ((grpc_client, "StatusCode.INTERNAL"), (http_client, "500")):
            with pytest.raises(InferenceServerException) as caught:
                client.load_model(SIMPLE, config=config, files=files or None)
            assert caught.value.status() == code, (config, files, caught.value)
            message = caught.value.message()
            assert message.startswith(POLL_FAILED) and reason in message, message
    assert not (server.repository.parent / "escaped.onnx").exists()
    for client in (grpc_client, http_client):  # an unknown model: Triton's words, NOT_FOUND
        with pytest.raises(InferenceServerException) as caught:
            client.load_model("wrong_model_name")
        assert caught.value.message().startswith(
            "failed to load 'wrong_model_name', failed to poll from model repository: "
        )
    assert not Path("/tmp/escaped.onnx").exists()

    # Value types and names, as Triton's gRPC front-end checks them.
    parameter = pb.ModelRepositoryParameter
    with grpc.insecure_channel(server.target) as channel:
        load = kserve_method(channel, "RepositoryModelLoad")
        for parameters, message in [
            ({"config": parameter(bytes_param=b"{}")}, "for load parameter 'config', expected string_param."),  # noqa: E501
            ({FILE: parameter(string_param="x")}, f"for load parameter '{FILE}', expected bytes_param."),  # noqa: E501
            ({"colour": parameter(string_param="red")}, "unrecognized load parameter 'colour'."),
        ]:  # fmt: skip
            request = pb.RepositoryModelLoadRequest(model_name=SIMPLE, parameters=parameters)
            with pytest.raises(grpc.RpcError) as raised:
                load(request, timeout=30)
            assert raised.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert message in (raised.value.details() or "")
    # Over HTTP every value is a string, a file's in base64.
    for parameters, message in [
        ({"config": {"max_batch_size": 2}}, "for load parameter 'config', expected a string."),
        ({"config": "{}", FILE: "not base64!"}, f"'{FILE}' is not valid base64"),
        ({"colour": "red"}, "unrecognized load parameter 'colour'."),
    ]:
        status, _, body = http_post(
            server, f"/v2/repository/models/{SIMPLE}/load", {"parameters": parameters}
        )
        assert status == 400 and message in json.loads(body)["error"], body

    # A well-formed override that cannot serve: the version before keeps serving.
    wrong = {"input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [WIDTH]}]}
    with pytest.raises(InferenceServerException) as caught:
        grpc_client.load_model(SIMPLE, config=json.dumps(wrong))
    assert caught.value.status() == "StatusCode.UNAVAILABLE"
    assert "configuration expects 1 inputs, model provides 2" in caught.value.message()
    assert grpc_client.is_server_ready()
    assert {c.max_batch_size for c in _configs_by_worker(server, workers, SIMPLE).values()} == {
        BATCH
    }
    assert _infer(grpc_client, SIMPLE) == "2" and _infer(grpc_client, KEEPER) == "1"
    assert _override_folders(temporary, SIMPLE) == []


def test_a_restarted_worker_loads_the_override_the_others_serve(
    start: Callable[..., tuple[ServerProcess, Path]],
) -> None:
    """The override lives in the run folder, so a worker that restarts serves it too."""
    server, temporary = start(2)
    with grpcclient.InferenceServerClient(server.target) as client:
        client.load_model(
            SENT,
            config=json.dumps({"max_batch_size": 2}),
            files={f"file:1/{ONNX_FILE}": MODEL_BYTES},
        )
        client.load_model(SIMPLE, config=json.dumps({"max_batch_size": 4}))
        victim = 1
        pid = {int(i): int(p) for i, p, _ in WORKER_LINE.findall(server.log)}[victim]
        os.kill(pid, signal.SIGKILL)
        server.wait_for(re.compile(rf"worker {victim} is serving again"), timeout=90)
        configs = _configs_by_worker(server, 2, SENT)
        assert {w: c.max_batch_size for w, c in configs.items()} == {0: 2, 1: 2}
        configs = _configs_by_worker(server, 2, SIMPLE)
        assert {w: c.max_batch_size for w, c in configs.items()} == {0: 4, 1: 4}
        assert client.is_server_ready() and client.is_model_ready(SENT)
        assert _infer(client, SENT) == "1" and _infer(client, KEEPER) == "1"
    assert len(_override_folders(temporary, SENT)) == 1
