"""The requests the load generator sends, built once up front so workers spend CPU on gRPC only.

Each call returns the gRPC status code name ("OK" on success) instead of raising, so a
worker can count failures without a try block of its own.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import numpy as np

from benchmarks.common import BenchError, Config
from client.api import address_problem
from modelrepo.layout import INPUT_NAME, OUTPUT_NAME

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

Call = Callable[[], Awaitable[str]]
# How long a model may take to turn READY (a server started here has already loaded it).
READY_WAIT_S = 10.0


def _pixels(shape: Sequence[int], batch: int) -> np.ndarray:
    """Fixed pseudo-random pixels: every run and configuration sends the same bytes."""
    return np.random.default_rng(0).random((batch, *shape), dtype=np.float32)


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    pixels = (image * 255).round().astype(np.uint8)
    picture = (
        Image.fromarray(pixels[0], "L")
        if pixels.shape[0] == 1
        else Image.fromarray(np.moveaxis(pixels, 0, -1), "RGB")
    )
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()


def error_code(error: grpc.RpcError) -> str:
    code = error.code() if hasattr(error, "code") else None
    return code.name if code is not None else "UNKNOWN"


def kserve_modules() -> tuple[Any, Any]:
    """The KServe v2 messages and stubs: the standard client's (`tritonclient`) when installed,
    else this project's own (wire/), which our server also answers under its package's name.
    So the load runs on a machine that lacks tritonclient (the GPU check's bare Python)."""
    try:
        from tritonclient.grpc import service_pb2, service_pb2_grpc
    except ImportError:
        from wire import grpc_service_pb2 as service_pb2
        from wire import grpc_service_pb2_grpc as service_pb2_grpc
    return service_pb2, service_pb2_grpc


def native_request(config: Config, model: ModelInfo) -> Any:
    """The ClassifyRequest every native call sends (no id: streams add their own)."""
    from wire import classifier_pb2

    shape = model.shape
    batch = _pixels(shape, config.batch)
    if config.encoding == "png":
        images = [classifier_pb2.Image(encoded=_png(image)) for image in batch]
    else:
        images = [
            classifier_pb2.Image(
                tensor=classifier_pb2.Tensor(
                    shape=list(shape), datatype="FP32", data=image.astype("<f4").tobytes()
                )
            )
            for image in batch
        ]
    return classifier_pb2.ClassifyRequest(model=config.model, images=images, top_k=config.top_k)


def native_call(
    channel: grpc.aio.Channel, config: Config, model: ModelInfo, timeout: float
) -> Call:
    from wire import classifier_pb2_grpc

    request = native_request(config, model)
    stub = classifier_pb2_grpc.ClassifierStub(channel)

    async def call() -> str:
        try:
            await stub.Classify(request, timeout=timeout)
        except grpc.RpcError as error:
            return error_code(error)
        return "OK"

    return call


def kserve_request(config: Config, model: ModelInfo) -> Any:
    """The KServe v2 ModelInferRequest every KServe call sends (no id: streams add their own)."""
    service_pb2, _ = kserve_modules()

    batch = _pixels(model.shape, config.batch)
    return service_pb2.ModelInferRequest(
        model_name=config.model,
        inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name=model.input_name, datatype="FP32", shape=list(batch.shape)
            )
        ],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=model.output_name)],
        raw_input_contents=[batch.astype("<f4").tobytes()],
    )


def kserve_call(
    channel: grpc.aio.Channel, config: Config, model: ModelInfo, timeout: float
) -> Call:
    """KServe v2 ModelInfer through the standard client's generated stubs."""
    _, service_pb2_grpc = kserve_modules()

    request = kserve_request(config, model)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def call() -> str:
        try:
            await stub.ModelInfer(request, timeout=timeout)
        except grpc.RpcError as error:
            return error_code(error)
        return "OK"

    return call


@dataclass(frozen=True)
class ModelInfo:
    """What a request needs to know of the model: from the v2 ModelMetadata of any server."""

    shape: tuple[int, ...]  # C x H x W
    input_name: str = INPUT_NAME
    output_name: str = OUTPUT_NAME


async def model_info(
    channel: grpc.aio.Channel,
    target: str,
    model: str,
    wait_s: float = READY_WAIT_S,
    check: Callable[[], None] = lambda: None,
    settled: bool = False,
) -> ModelInfo:
    """The model's input shape and tensor names once it is ready (polled for up to wait_s).

    Asks through the KServe v2 protocol (ModelReady, ModelMetadata), so it works against any
    v2 server. `check` raises BenchError when waiting is pointless (the started server died).
    With `settled` the server has finished loading, so a model that is not ready never will be.
    """
    service_pb2, service_pb2_grpc = kserve_modules()
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
    deadline = time.monotonic() + wait_s
    last = "no answer"
    while True:
        check()
        try:
            ready = await stub.ModelReady(service_pb2.ModelReadyRequest(name=model), timeout=5.0)
            if ready.ready:
                meta = await stub.ModelMetadata(
                    service_pb2.ModelMetadataRequest(name=model), timeout=5.0
                )
                return _info(model, meta)
            # Not ready: the metadata call says why (NOT_FOUND, UNAVAILABLE and the reason).
            await stub.ModelMetadata(service_pb2.ModelMetadataRequest(name=model), timeout=5.0)
            last = "not ready"
        except grpc.RpcError as error:
            details = (error.details() if hasattr(error, "details") else None) or str(error)
            if (problem := address_problem(details)) is not None:
                raise BenchError(f"invalid server address {target!r}: {problem}") from None
            code = error_code(error)
            if code == "NOT_FOUND":
                raise BenchError(f"the server has no model {model!r} ({details})") from None
            last = f"{code}: {details}"
        if settled:
            raise BenchError(f"model {model!r} is not ready after start-up ({last})")
        if time.monotonic() >= deadline:
            raise BenchError(f"model {model!r} not ready after {wait_s:g} s ({last})")
        await asyncio.sleep(0.2)


def _info(model: str, meta: Any) -> ModelInfo:
    if len(meta.inputs) != 1 or not meta.outputs:
        raise BenchError(f"model {model!r} must have one image input and an output")
    dims = tuple(int(d) for d in meta.inputs[0].shape)
    shape = dims[1:] if len(dims) == 4 else dims  # [-1, C, H, W] when the model batches
    if len(shape) != 3 or min(shape) < 1:
        raise BenchError(f"model {model!r} input shape {list(dims)} is not [N, C, H, W]")
    return ModelInfo(shape, meta.inputs[0].name, meta.outputs[0].name)
