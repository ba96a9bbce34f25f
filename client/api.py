"""A typed wrapper over the native Classifier API that hides protobuf and gRPC from callers."""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import numpy as np

from client.credentials import Credentials
from wire import classifier_pb2, classifier_pb2_grpc

DEFAULT_TARGET = "localhost:8001"
DEFAULT_TIMEOUT = 10.0
# Responses of large batches carry every class probability; keep well clear of gRPC's 4 MiB.
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

# How gRPC words a target it cannot resolve ("errors resolving X: [...lookup error: WHY]", or
# "DNS resolution failed for X: ... WHY" in older releases), and the WHYs worth rewording.
_RESOLVE_MARKERS = ("errors resolving", "DNS resolution failed", "lookup error")
_RESOLVE_REASONS = (
    ("parse port", "the port is not a number"),
    ("Misformatted domain name", "not a valid host name"),
    ("Domain name not found", "unknown host"),
)

# How gRPC words a failed TLS set-up (matched in any case), and what to tell the user instead
# (first match wins).
_TLS_PROBLEMS = (
    ("CERTIFICATE_VERIFY_FAILED", "its certificate is not signed by a CA this client trusts"),
    ("Hostname Verification", "its certificate is not issued for this host name"),
    ("WRONG_VERSION_NUMBER", "it does not speak TLS; connect without TLS"),
    ("handshake", "the TLS handshake failed"),
    ("Socket closed", "it closed the connection: it may require TLS or a client certificate"),
)

# A path to a PNG/JPEG file, its bytes, or pixels shaped C x H x W (or H x W for one channel).
ImageInput = str | os.PathLike | bytes | np.ndarray


@dataclass(frozen=True)
class Prediction:
    index: int
    label: str
    probability: float


@dataclass(frozen=True)
class Result:
    """The answer for one image."""

    model: str
    version: str
    probabilities: np.ndarray
    top: list[Prediction]

    @property
    def label(self) -> str:
        """The most probable label: what most callers want."""
        return self.top[0].label if self.top else ""


@dataclass(frozen=True)
class ModelInfo:
    name: str
    version: str
    state: str
    reason: str
    platform: str
    input_shape: tuple[int, ...]
    labels: tuple[str, ...] = field(default_factory=tuple)
    precision: str = ""  # "fp32", "fp16", "int8"; "" when not ready (or an older server)

    @property
    def ready(self) -> bool:
        return self.state == "READY"


@dataclass(frozen=True)
class StreamResult:
    """The outcome of one batch of a stream; `batch` is its position in the caller's iterable."""

    batch: int
    results: list[Result]
    error: ClientError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class ClientError(Exception):
    """A failed call: the gRPC status code name and a message meant for people.

    `details` keeps the raw gRPC text for debugging; `message` rewrites the transport
    failures (unreachable server, deadline) whose raw text is mostly gRPC internals.
    """

    def __init__(self, code: str, message: str, details: str = "") -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details = details or message


def address_problem(details: str) -> str | None:
    """Why gRPC could not turn the target into an address, if that is what `details` says.

    gRPC reports such targets as UNAVAILABLE, like a server that is down; told apart, the
    user fixes the address instead of looking for a server that is running fine.
    """
    if "target uri is not valid" in details:
        return "not a gRPC target"
    if not any(marker in details for marker in _RESOLVE_MARKERS):
        return None
    for marker, reason in _RESOLVE_REASONS:
        if marker in details:
            return reason
    return "cannot resolve it"


def error_from_rpc(error: grpc.RpcError, target: str, timeout: float | None) -> ClientError:
    """Translate a gRPC failure into a ClientError with a readable message."""
    code_obj = error.code() if hasattr(error, "code") else None
    code = code_obj.name if code_obj is not None else "UNKNOWN"
    details = (error.details() if hasattr(error, "details") else None) or str(error)
    message = details
    problem = address_problem(details) if code in ("UNAVAILABLE", "UNKNOWN") else None
    if problem is not None:
        message = f"invalid server address {target!r}: {problem} (expected HOST:PORT)"
    elif code == "UNAVAILABLE":
        folded = details.lower()
        tls = next((why for marker, why in _TLS_PROBLEMS if marker.lower() in folded), None)
        message = f"cannot reach the server at {target} (is it running?)"
        if tls is not None:
            message = f"cannot connect to the server at {target}: {tls}"
    elif code in ("UNAUTHENTICATED", "PERMISSION_DENIED"):
        message = f"the server refused the call: {details}"
    elif code == "DEADLINE_EXCEEDED":
        message = f"no answer from {target} within {timeout:g} s" if timeout else details
    return ClientError(code, message, details)


def encode_image(image: ImageInput) -> classifier_pb2.Image:
    """One request image: encoded files go as they are, arrays as FP32/UINT8 tensors."""
    if isinstance(image, np.ndarray):
        return classifier_pb2.Image(tensor=_tensor(image))
    if isinstance(image, (bytes, bytearray, memoryview)):
        return classifier_pb2.Image(encoded=bytes(image))
    if isinstance(image, (str, os.PathLike)):
        return classifier_pb2.Image(encoded=Path(image).read_bytes())
    raise TypeError(
        f"an image must be a file path, PNG/JPEG bytes or a numpy array, not {type(image).__name__}"
    )


def _tensor(array: np.ndarray) -> classifier_pb2.Tensor:
    if array.ndim == 2:
        array = array[np.newaxis]
    if array.ndim != 3:
        raise ValueError(f"an image array must be C x H x W (or H x W), got shape {array.shape}")
    if array.dtype == np.uint8:
        datatype, data = "UINT8", np.ascontiguousarray(array).tobytes()
    elif np.issubdtype(array.dtype, np.floating):
        datatype, data = "FP32", np.ascontiguousarray(array, dtype="<f4").tobytes()
    else:
        raise ValueError(f"image pixels must be float (in [0, 1]) or uint8, not {array.dtype}")
    return classifier_pb2.Tensor(shape=list(array.shape), datatype=datatype, data=data)


def _as_list(images: ImageInput | Iterable[ImageInput]) -> list[ImageInput]:
    """Accept one image as well as many; a 4-D array is a batch of C x H x W images."""
    if isinstance(images, (str, os.PathLike, bytes, bytearray, memoryview)):
        return [images]
    if isinstance(images, np.ndarray):
        return list(images) if images.ndim == 4 else [images]
    return list(images)


def build_request(
    model: str,
    images: ImageInput | Iterable[ImageInput],
    top_k: int = 5,
    version: str = "",
    request_id: str = "",
) -> classifier_pb2.ClassifyRequest:
    batch = _as_list(images)
    if not batch:
        raise ValueError("no images to classify")
    if top_k < 0:
        raise ValueError("top_k cannot be negative")
    return classifier_pb2.ClassifyRequest(
        model=model,
        version=version,
        images=[encode_image(image) for image in batch],
        top_k=top_k,
        id=request_id,
    )


def results_from_response(response: classifier_pb2.ClassifyResponse) -> list[Result]:
    return [
        Result(
            model=response.model,
            version=response.version,
            probabilities=np.asarray(item.probabilities, dtype=np.float32),
            top=[Prediction(p.index, p.label, p.probability) for p in item.top],
        )
        for item in response.results
    ]


def model_from_proto(info: classifier_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        name=info.name,
        version=info.version,
        state=info.state,
        reason=info.reason,
        platform=info.platform,
        input_shape=tuple(info.input_shape),
        labels=tuple(info.labels),
        precision=info.precision,
    )


def _open_channels(module: Any, target: str, credentials: Credentials, count: int) -> list[Any]:
    """`count` channels of `module` (grpc or grpc.aio), TLS when the credentials ask for it.

    Each has a connection of its own: gRPC otherwise shares one connection among channels to
    the same target, and a server with several workers (--workers) serves one connection on
    one worker, so several connections are how one client uses several of its cores.
    """
    if count < 1:
        raise ValueError(f"channels must be at least 1, got {count}")
    options = (
        [*_CHANNEL_OPTIONS, ("grpc.use_local_subchannel_pool", 1)]
        if count > 1
        else _CHANNEL_OPTIONS
    )
    secure = credentials.channel_credentials()
    if secure is None:
        return [module.insecure_channel(target, options=options) for _ in range(count)]
    return [module.secure_channel(target, secure, options=options) for _ in range(count)]


class ClassifierClient:
    """Connections to one server; thread-safe, reuse it for many calls.

    `channels` > 1 opens that many connections and takes them in turn, call by call: a
    server with several workers serves each connection on one worker, so a busy client
    spreads its calls over the workers this way.

    >>> with ClassifierClient("localhost:8001") as client:
    ...     print(client.classify("fashion_mnist", ["shoe.png"])[0].label)
    """

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float | None = DEFAULT_TIMEOUT,
        credentials: Credentials | None = None,
        channels: int = 1,
    ):
        self.target = target
        self.timeout = timeout
        credentials = credentials or Credentials()
        self._channels = _open_channels(grpc, target, credentials, channels)
        self._metadata = credentials.metadata
        stubs = [classifier_pb2_grpc.ClassifierStub(channel) for channel in self._channels]
        self._next_stub = itertools.cycle(stubs).__next__

    @property
    def _stub(self) -> classifier_pb2_grpc.ClassifierStub:
        """The next connection's stub, in turn."""
        return self._next_stub()

    def __enter__(self) -> ClassifierClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def _error(self, error: grpc.RpcError, timeout: float | None) -> ClientError:
        return error_from_rpc(error, self.target, timeout)

    def classify(
        self,
        model: str,
        images: ImageInput | Iterable[ImageInput],
        top_k: int = 5,
        version: str = "",
    ) -> list[Result]:
        """One result per image, in order; all images go in one request (batched together)."""
        request = build_request(model, images, top_k, version)
        try:
            response = self._stub.Classify(request, timeout=self.timeout, metadata=self._metadata)
        except grpc.RpcError as error:
            raise self._error(error, self.timeout) from None
        return results_from_response(response)

    def list_models(self) -> list[ModelInfo]:
        try:
            response = self._stub.ListModels(
                classifier_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise self._error(error, self.timeout) from None
        return [model_from_proto(info) for info in response.models]

    def classify_stream(
        self,
        model: str,
        batches: Iterable[Sequence[ImageInput]],
        top_k: int = 5,
        version: str = "",
        timeout: float | None = None,
    ) -> Iterator[StreamResult]:
        """Send every batch on one stream and yield each outcome as soon as it arrives.

        Outcomes may come out of order: `StreamResult.batch` says which batch answered. A
        failed batch yields a StreamResult with `error` set and the stream goes on. The
        stream has no deadline unless `timeout` is given, since its length is the caller's.
        An image that cannot be read stops sending; it is raised once the answers of the
        batches already sent are in.
        """
        failure: list[BaseException] = []
        sent = 0
        lock = threading.Lock()

        def requests() -> Iterator[classifier_pb2.ClassifyRequest]:
            nonlocal sent
            for index, batch in enumerate(batches):
                try:
                    request = build_request(model, batch, top_k, version, request_id=str(index))
                except Exception as exc:  # handed to the caller's thread below
                    failure.append(exc)
                    return
                with lock:
                    sent += 1
                yield request

        answered = 0
        try:
            replies = self._stub.ClassifyStream(
                requests(), timeout=timeout, metadata=self._metadata
            )
            for reply in replies:
                answered += 1
                index = int(reply.id) if reply.id.isdigit() else -1
                if reply.HasField("error"):
                    error = ClientError(reply.error.code, reply.error.message)
                    yield StreamResult(index, [], error)
                else:
                    yield StreamResult(index, results_from_response(reply.response))
        except grpc.RpcError as error:
            raise self._error(error, timeout) from None
        if failure:
            raise failure[0]
        with lock:
            missing = sent - answered
        if missing > 0:
            raise ClientError("UNKNOWN", f"the stream ended with {missing} batches unanswered")


class AsyncClassifierClient:
    """The asyncio twin of ClassifierClient, for callers already running an event loop."""

    def __init__(
        self,
        target: str = DEFAULT_TARGET,
        timeout: float | None = DEFAULT_TIMEOUT,
        credentials: Credentials | None = None,
        channels: int = 1,
    ):
        self.target = target
        self.timeout = timeout
        credentials = credentials or Credentials()
        self._channels = _open_channels(grpc.aio, target, credentials, channels)
        self._metadata = credentials.metadata
        stubs = [classifier_pb2_grpc.ClassifierStub(channel) for channel in self._channels]
        self._next_stub = itertools.cycle(stubs).__next__

    @property
    def _stub(self) -> classifier_pb2_grpc.ClassifierStub:
        return self._next_stub()

    async def __aenter__(self) -> AsyncClassifierClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        for channel in self._channels:
            await channel.close()

    async def classify(
        self,
        model: str,
        images: ImageInput | Iterable[ImageInput],
        top_k: int = 5,
        version: str = "",
    ) -> list[Result]:
        request = build_request(model, images, top_k, version)
        try:
            response = await self._stub.Classify(
                request, timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.target, self.timeout) from None
        return results_from_response(response)

    async def list_models(self) -> list[ModelInfo]:
        try:
            response = await self._stub.ListModels(
                classifier_pb2.ListModelsRequest(), timeout=self.timeout, metadata=self._metadata
            )
        except grpc.RpcError as error:
            raise error_from_rpc(error, self.target, self.timeout) from None
        return [model_from_proto(info) for info in response.models]
