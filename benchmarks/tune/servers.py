"""The real server, started once per worker count and reloaded for each setting.

The servers serve a scratch repository: a folder whose one model links to the files of the
model being tuned (versions, labels) but has a config.pbtxt of its own, which the tuner
rewrites for each setting. A server started with --enable-model-control then loads the new
config with RepositoryModelLoad (every worker, tens of milliseconds for a small model) instead
of a restart (a second or more): one server process per worker count, reused for every
per-model setting. A config the server refuses comes back as Rejected with its reason, and
the server goes on serving the previous one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from benchmarks.common import BenchError
from benchmarks.h2load import answer_codes
from benchmarks.server import ServerProcess, start_server
from benchmarks.tune.load import Target
from modelrepo.config import parse_config
from modelrepo.layout import CONFIG_FILE
from wire import grpc_service_pb2 as pb
from wire import grpc_service_pb2_grpc as pb_grpc

# Flags the tuner sets itself on the servers it starts.
OWN_FLAGS = ("--workers", "--models", "--enable-model-control", "--model-repository")
LOAD_TIMEOUT_S = 300.0


class Rejected(Exception):
    """The server would not load the setting's config; str() is its reason."""


def write_atomically(path: Path, text: str) -> None:
    """Replace `path` with `text` in one step: a reader (or a crash, or Ctrl-C) sees the old
    file or the new one, never half of one. The file keeps its permission bits."""
    mode = path.stat().st_mode & 0o7777 if path.exists() else None
    handle, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        if mode is not None:
            os.chmod(temporary, mode)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def scratch_repository(model_dir: Path, folder: Path, text: str) -> Path:
    """A repository in `folder` whose one model links to every entry of `model_dir` except
    its config.pbtxt, which is `text`; returns the repository."""
    own = folder / model_dir.name
    own.mkdir(parents=True)
    for entry in model_dir.iterdir():
        if entry.name != CONFIG_FILE:
            (own / entry.name).symlink_to(entry.resolve())
    (own / CONFIG_FILE).write_text(text, encoding="utf-8")
    return folder


class Servers:
    """Started servers by worker count, each with the config text it serves now."""

    def __init__(self, model_dir: Path, model: str, text: str, server_args: Sequence[str]) -> None:
        self.model = model
        self._folder = Path(tempfile.mkdtemp(prefix="imgserve-tune-"))
        self.repository = scratch_repository(model_dir, self._folder / "repository", text)
        self._config = self.repository / model / CONFIG_FILE
        self._server_args = tuple(server_args)
        self._stack = contextlib.ExitStack()
        self._servers: dict[int, ServerProcess] = {}
        self._loaded: dict[int, str | None] = {}
        self.start_seconds: list[float] = []  # how long each start took, for the budget

    def __enter__(self) -> Servers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def running(self, workers: int) -> bool:
        server = self._servers.get(workers)
        return server is not None and server.process.poll() is None

    def serve(self, workers: int, text: str) -> Target:
        """A server of `workers` workers serving `text`: started, or reloaded if it serves
        another config. Raises Rejected when the server will not load it."""
        if not self.running(workers):
            write_atomically(self._config, text)
            self._start(workers)
            self._loaded[workers] = text
            self._check_ready(workers)
        elif self._loaded.get(workers) != text:
            write_atomically(self._config, text)
            self._reload(workers)
            self._loaded[workers] = text
        server = self._servers[workers]
        self._check_config(server, text)
        return Target(server.target, server.cpu_seconds, answer_codes(server.metrics_url))

    def _start(self, workers: int) -> None:
        previous = self._servers.pop(workers, None)
        if previous is not None:  # it exited under an earlier setting: start a new one
            previous.process.wait()
        began = time.monotonic()
        args = ("--models", self.model, "--workers", str(workers), "--enable-model-control")
        server = self._stack.enter_context(
            start_server(self.repository, (*args, "--grace-period-s", "2", *self._server_args))
        )
        self.start_seconds.append(time.monotonic() - began)
        self._servers[workers] = server

    def _stub(self, workers: int) -> tuple[grpc.Channel, pb_grpc.GRPCInferenceServiceStub]:
        channel = grpc.insecure_channel(self._servers[workers].target)
        return channel, pb_grpc.GRPCInferenceServiceStub(channel)

    def _reload(self, workers: int) -> None:
        channel, stub = self._stub(workers)
        with channel:
            try:
                request = pb.RepositoryModelLoadRequest(model_name=self.model)
                stub.RepositoryModelLoad(request, timeout=LOAD_TIMEOUT_S)
            except grpc.RpcError as error:
                self._loaded[workers] = None  # the server keeps what it served: unknown here
                raise Rejected(
                    f"the server refused it: {error.details() or error.code().name}"
                ) from None

    def _check_ready(self, workers: int) -> None:
        """After a start: the model's load failed if it is not ready (the index says why)."""
        channel, stub = self._stub(workers)
        with channel:
            ready = stub.ModelReady(pb.ModelReadyRequest(name=self.model), timeout=10).ready
            if ready:
                return
            index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=10)
        self._loaded[workers] = None
        reasons = [m.reason for m in index.models if m.name == self.model and m.reason]
        raise Rejected(
            "the server refused it: " + ("; ".join(reasons) or "not ready after start-up")
        )

    def _check_config(self, server: ServerProcess, text: str) -> None:
        """The server reports the config it serves: it must be the one written (a check that
        the measurement is of this setting, not of the previous one)."""
        wanted = parse_config(text)
        with grpc.insecure_channel(server.target) as channel:
            stub = pb_grpc.GRPCInferenceServiceStub(channel)
            got = stub.ModelConfig(pb.ModelConfigRequest(name=self.model), timeout=10).config
        same = [
            (got.max_batch_size == wanted.max_batch_size or not wanted.max_batch_size),
            got.dynamic_batching.max_queue_delay_microseconds
            == wanted.dynamic_batching.max_queue_delay_microseconds
            or not wanted.dynamic_batching.max_queue_delay_microseconds,
            [g.count for g in got.instance_group] == [g.count for g in wanted.instance_group],
            dict(got.parameters) == dict(wanted.parameters),
        ]
        if not all(same):
            raise BenchError(f"the server serves another config than the one written:\n{got}")

    def close(self) -> None:
        self._stack.close()
        self._servers.clear()
        shutil.rmtree(self._folder, ignore_errors=True)
