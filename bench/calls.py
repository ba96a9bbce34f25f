"""The requests the load generator sends, built once up front so workers spend CPU on gRPC only.

Each call returns the gRPC status code name ("OK" on success) instead of raising, so a
worker can count failures without a try block of its own.
"""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import grpc
import numpy as np

from bench.common import BenchError, Config
from client.api import address_problem

CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]

Call = Callable[[], Awaitable[str]]


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


def native_request(config: Config, shape: Sequence[int]) -> Any:
    """The ClassifyRequest every native call sends (no id: streams add their own)."""
    from wire import classifier_pb2

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
    channel: grpc.aio.Channel, config: Config, shape: Sequence[int], timeout: float
) -> Call:
    from wire import classifier_pb2_grpc

    request = native_request(config, shape)
    stub = classifier_pb2_grpc.ClassifierStub(channel)

    async def call() -> str:
        try:
            await stub.Classify(request, timeout=timeout)
        except grpc.RpcError as error:
            return error_code(error)
        return "OK"

    return call


def kserve_request(config: Config, shape: Sequence[int]) -> Any:
    """The KServe v2 ModelInferRequest every KServe call sends (no id: streams add their own)."""
    from tritonclient.grpc import service_pb2

    from modelrepo.layout import INPUT_NAME, OUTPUT_NAME

    batch = _pixels(shape, config.batch)
    return service_pb2.ModelInferRequest(
        model_name=config.model,
        inputs=[
            service_pb2.ModelInferRequest.InferInputTensor(
                name=INPUT_NAME, datatype="FP32", shape=list(batch.shape)
            )
        ],
        outputs=[service_pb2.ModelInferRequest.InferRequestedOutputTensor(name=OUTPUT_NAME)],
        raw_input_contents=[batch.astype("<f4").tobytes()],
    )


def kserve_call(
    channel: grpc.aio.Channel, config: Config, shape: Sequence[int], timeout: float
) -> Call:
    """KServe v2 ModelInfer through the standard client's generated stubs."""
    from tritonclient.grpc import service_pb2_grpc

    request = kserve_request(config, shape)
    stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)

    async def call() -> str:
        try:
            await stub.ModelInfer(request, timeout=timeout)
        except grpc.RpcError as error:
            return error_code(error)
        return "OK"

    return call


async def model_shape(
    channel: grpc.aio.Channel,
    target: str,
    model: str,
    wait_s: float,
    check: Callable[[], None] = lambda: None,
    settled: bool = False,
) -> tuple[int, ...]:
    """The model's C x H x W, once the server says it is READY (polled for up to wait_s).

    `check` raises BenchError when waiting is pointless (the started server died). With
    `settled` the server has finished loading, so a model that is not READY never will be.
    """
    from wire import classifier_pb2, classifier_pb2_grpc

    stub = classifier_pb2_grpc.ClassifierStub(channel)
    deadline = time.monotonic() + wait_s
    last = "no answer"
    while True:
        check()
        try:
            reply = await stub.ListModels(classifier_pb2.ListModelsRequest(), timeout=5.0)
            found = [m for m in reply.models if m.name == model]
            if not found:
                names = ", ".join(sorted({m.name for m in reply.models})) or "none"
                raise BenchError(f"the server has no model {model!r} (it has: {names})")
            ready = [m for m in found if m.state == "READY"]
            if ready:
                return tuple(ready[-1].input_shape)
            last = f"{model} is {found[-1].state} {found[-1].reason}".strip()
            if settled:
                raise BenchError(f"model {model!r} is not ready after start-up ({last})")
        except grpc.RpcError as error:
            details = (error.details() if hasattr(error, "details") else None) or str(error)
            if (problem := address_problem(details)) is not None:
                raise BenchError(f"invalid server address {target!r}: {problem}") from None
            last = f"{error_code(error)}: {details}"
        if time.monotonic() >= deadline:
            raise BenchError(f"model {model!r} not ready after {wait_s:g} s ({last})")
        await asyncio.sleep(0.2)
