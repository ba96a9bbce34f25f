"""Runs `python -m server` as a real subprocess on 127.0.0.1 with ports picked by the OS.

Every wait is bounded: start-up, readiness, and stop raise (after killing the process)
instead of hanging a test run. The server's log is kept, for assertions and for failures.
The ports come from the server's own log line, read with the server's own parser.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypeVar

import grpc
import numpy as np
import onnxruntime as ort
from google.protobuf import message_factory
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client.parser import text_string_to_metric_families

from modelrepo.config import load_config, write_config
from modelrepo.layout import CONFIG_FILE
from server.startlines import STARTED, hostport, parse_listening, parse_rest_port
from wire import classifier_pb2, grpc_service_pb2

PROJECT_ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


class ServerProcess:
    def __init__(
        self,
        repository: Path,
        *args: str,
        grace_period_s: float = 5.0,
        until_started: bool = True,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.repository = repository
        # Variables added to this process's environment (e.g. SERVER_AUTH_TOKENS).
        self.env = {**os.environ, **(env or {})}
        # False: start() returns once the ports are known, while models may still load.
        self.until_started = until_started
        # One worker unless a test asks for more: most tests are about one server process.
        workers = () if any(a.startswith("--workers") for a in args) else ("--workers", "1")
        self.command = [
            sys.executable, "-m", "server",
            "--model-repository", str(repository),
            "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
            "--grace-period-s", str(grace_period_s),
            *workers,
            *args,
        ]  # fmt: skip
        self.host = "127.0.0.1"
        self.grpc_port = 0
        self.metrics_port = 0
        self.http_port = 0  # 0 until started, and with --disable-http
        self.process: subprocess.Popen[str] | None = None
        self._lines: list[str] = []
        self._changed = threading.Condition()
        self._reader: threading.Thread | None = None

    # --- lifecycle ---

    def start(self, timeout: float = 90.0) -> ServerProcess:
        """Start and wait until start-up has finished (models loaded or failed)."""
        self.process = subprocess.Popen(
            self.command,
            cwd=PROJECT_ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        try:
            (self.host, self.grpc_port, self.metrics_port), self.http_port = self.wait_for_line(
                _ports, "the ports it listens on", timeout
            )
            if self.until_started:
                self.wait_for(re.compile(re.escape(STARTED)), timeout)
        except BaseException:
            self.kill()
            raise
        return self

    def send_signal(self, signum: int = signal.SIGTERM) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """The exit status; kills the process and raises if it has not exited in time."""
        assert self.process is not None
        try:
            status = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"server did not exit within {timeout}s:\n{self.log}") from None
        self._close_output()
        return status

    def exit_after(self, signum: int, timeout: float) -> tuple[int, float]:
        """Send `signum`; (exit status, seconds from the signal to the exit)."""
        signalled = time.monotonic()
        self.send_signal(signum)
        status = self.wait(timeout)
        return status, time.monotonic() - signalled

    def stop(self, timeout: float = 20.0) -> int:
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.send_signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        self._close_output()

    def _close_output(self) -> None:
        if self._reader is not None:
            self._reader.join(10)  # the pipe ends with the process
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # --- output ---

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            with self._changed:
                self._lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    @property
    def log(self) -> str:
        with self._changed:
            return "".join(self._lines)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        """The first match of `pattern` in the log; raises if the server exits or time runs out."""
        return self._wait(
            lambda lines: pattern.search("".join(lines)), repr(pattern.pattern), timeout
        )

    def wait_for_line(self, parse: Callable[[str], T | None], what: str, timeout: float) -> T:
        """`parse` of the first log line it does not answer None for."""

        def first(lines: list[str]) -> T | None:
            return next((found for line in lines if (found := parse(line)) is not None), None)

        return self._wait(first, what, timeout)

    def _wait(self, find: Callable[[list[str]], T | None], what: str, timeout: float) -> T:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = find(self._lines)
                if found is not None:
                    return found
                exited = self.process is not None and self.process.poll() is not None
                left = deadline - time.monotonic()
                if exited or left <= 0:
                    why = "exited" if exited else f"did not log {what} in {timeout}s"
                    raise AssertionError(f"server {why}:\n{''.join(self._lines)}")
                self._changed.wait(min(left, 0.5))

    # --- addresses and metrics ---

    @property
    def target(self) -> str:
        return hostport(self.host, self.grpc_port)

    @property
    def http_url(self) -> str:
        """The HTTP/REST API's base URL (plain HTTP; TLS tests build their own)."""
        return f"http://{hostport(self.host, self.http_port)}"

    @property
    def http_target(self) -> str:
        """HOST:PORT of the HTTP/REST API, as tritonclient.http takes it."""
        return hostport(self.host, self.http_port)

    @property
    def metrics_url(self) -> str:
        return f"http://{hostport(self.host, self.metrics_port)}/metrics"

    def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Every sample of /metrics: (name, sorted labels) -> value."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the samples named `name` whose labels include `labels` (0 if none)."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample, sample_labels), value in self.metrics().items()
            if sample == name and wanted <= set(sample_labels)
        )


def _ports(line: str) -> tuple[tuple[str, int, int], int] | None:
    """((host, gRPC port, metrics port), HTTP port) of the server's LISTENING line."""
    found, rest = parse_listening(line), parse_rest_port(line)
    return None if found is None or rest is None else (found, rest)


class ServerGroup:
    """Servers for one test module, each on its own copy of (some models of) a repository.

    Stopped in two steps: `signal_all` sends every server SIGTERM, `wait_all` waits for them
    to exit. Between the two the servers finish exiting on their own (mostly idle waiting),
    so a session can signal at the end of a module and wait once at its own end.
    """

    def __init__(self, source: Path, workspace: Callable[[], Path]) -> None:
        self._source = source
        self._workspace = workspace  # a new empty folder per call
        self._servers: list[ServerProcess] = []

    def start(
        self,
        *args: str,
        models: Sequence[str] | None = None,
        prepare: Callable[[Path], None] | None = None,
        grace_period_s: float = 5.0,
        env: Mapping[str, str] | None = None,
    ) -> ServerProcess:
        """Copy `models` (default: all), let `prepare` change the copy, serve it with `args`."""
        repository = copy_repository(self._source, self._workspace() / "repository", models)
        if prepare is not None:
            prepare(repository)
        server = ServerProcess(repository, *args, grace_period_s=grace_period_s, env=env)
        self._servers.append(server)
        return server.start()

    def signal_all(self) -> None:
        for server in self._servers:
            if server.process is not None and server.process.poll() is None:
                server.send_signal(signal.SIGTERM)

    def wait_all(self, timeout: float = 20.0) -> None:
        """Wait for every server to exit (raises if one does not in time; all are ended)."""
        try:
            for server in self._servers:
                if server.process is not None:
                    server.wait(timeout)
        finally:
            for server in self._servers:
                server.kill()  # no-op for those that exited; frees their output either way
            self._servers.clear()


def copy_repository(source: Path, target: Path, models: Sequence[str] | None = None) -> Path:
    """A private copy of (some models of) a repository, for tests that change it."""
    target.mkdir(parents=True, exist_ok=True)
    for model in models or [p.name for p in source.iterdir() if p.is_dir()]:
        shutil.copytree(source / model, target / model)
    return target


def clone_model(model_dir: Path, repository: Path, name: str) -> Path:
    """Copy a model folder into `repository` under another name (config renamed too)."""
    target = repository / name
    shutil.copytree(model_dir, target)
    set_batching(target, name=name)
    return target


def set_batching(
    model_dir: Path,
    *,
    max_queue_delay_us: int | None = None,
    max_batch_size: int | None = None,
    instances: int | None = None,
    name: str | None = None,
) -> None:
    """Edit a model's config.pbtxt (batching window, batch size, instance count, name)."""
    path = model_dir / CONFIG_FILE
    config = load_config(path)
    if max_queue_delay_us is not None:
        config.dynamic_batching.max_queue_delay_microseconds = max_queue_delay_us
    if max_batch_size is not None:
        config.max_batch_size = max_batch_size
    if instances is not None:
        del config.instance_group[:]
        config.instance_group.add(count=instances)
    if name is not None:
        config.name = name
    write_config(path, config)


def kserve_method(channel: grpc.Channel, name: str) -> grpc.UnaryUnaryMultiCallable:
    """A KServe v2 method called by its wire name `inference.GRPCInferenceService/NAME`."""
    service = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return _method(channel, service, "inference.GRPCInferenceService", name)


def classifier_method(channel: grpc.Channel, name: str) -> grpc.UnaryUnaryMultiCallable:
    """A native Classifier API method by name (works on sync and grpc.aio channels)."""
    service = classifier_pb2.DESCRIPTOR.services_by_name["Classifier"]
    return _method(channel, service, service.full_name, name)


def _method(
    channel: grpc.Channel, service: ServiceDescriptor, wire_name: str, name: str
) -> grpc.UnaryUnaryMultiCallable:
    method = service.methods_by_name[name]
    request = message_factory.GetMessageClass(method.input_type)
    response = message_factory.GetMessageClass(method.output_type)
    make = channel.stream_stream if method.client_streaming else channel.unary_unary
    return make(
        f"/{wire_name}/{name}",
        request_serializer=request.SerializeToString,
        response_deserializer=response.FromString,
    )


def rss_bytes(server: ServerProcess) -> int:
    """The server process's resident memory, from /proc."""
    assert server.process is not None
    status = Path(f"/proc/{server.process.pid}/status").read_text()
    kib = next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))
    return 1024 * int(kib)


def onnx_probabilities(model_file: Path, images: np.ndarray) -> np.ndarray:
    """The model file run directly by onnxruntime: the reference the server must match."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(model_file), options, providers=["CPUExecutionProvider"])
    return session.run(["probabilities"], {"input": images.astype(np.float32)})[0]
