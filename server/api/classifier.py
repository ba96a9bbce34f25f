"""The native Classifier API servicer (`imgserve.classifier.v1.Classifier`)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import grpc

from server.api import codecs
from server.api.common import ApiState, Service, answer_concurrently, method_handlers, recorded
from server.api.status import Call, deadline_of, describe, guarded
from server.core.modelstats import Timing
from wire import classifier_pb2 as pb

if TYPE_CHECKING:
    import numpy as np

    from server.core.served import ServedModel

API_LABEL = "native"
# Requests whose decode cost (codecs.decode_cost: payload plus declared pixels, in bytes) is
# past this are decoded in a worker thread: decoding a few small images costs less than the
# hop (about 0.1 ms at this size), large ones would stall every other request on the event loop.
DECODE_INLINE_COST = 64 * 1024


class ClassifierServicer:
    def __init__(self, state: ApiState) -> None:
        self._state = state

    @guarded
    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        with self._state.call(API_LABEL, context) as call:
            return await self._classify(request, deadline_of(context), call)

    @guarded
    async def ClassifyStream(
        self, requests: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        async def answer(request: pb.ClassifyRequest) -> pb.ClassifyStreamResponse:
            with self._state.call(API_LABEL, context) as call:
                response = await self._classify(request, deadline_of(context), call)
            return pb.ClassifyStreamResponse(id=request.id, response=response)

        def fail(request: pb.ClassifyRequest, exc: Exception) -> pb.ClassifyStreamResponse:
            code, message = describe(exc)
            error = pb.StreamError(code=code.name, message=message)
            return pb.ClassifyStreamResponse(id=request.id, error=error)

        async for response in answer_concurrently(requests, answer, fail):
            yield response

    @guarded
    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        served = {(m.name, str(m.version)): m for m in self._state.manager.served()}
        models = []
        for state in (await self._state.cluster.view()).index():
            info = pb.ModelInfo(
                name=state.name, version=state.version, state=state.state, reason=state.reason
            )
            model = served.get((state.name, state.version))
            if model is not None:
                info.platform = model.platform
                info.precision = model.precision
                info.input_shape.extend(model.input_shape)
                info.labels.extend(model.labels)
            models.append(info)
        return pb.ListModelsResponse(models=models)

    async def _classify(
        self, request: pb.ClassifyRequest, deadline: float | None, call: Call
    ) -> pb.ClassifyResponse:
        timing = Timing()
        served = self._state.resolve(request.model, request.version, call)
        try:
            served, images = await self._decode(request, served, call)
        except Exception:  # images that cannot be decoded: a failed request of the model
            served.stats.failed(timing)
            raise
        with recorded(served, timing):
            timing.decoded()
            probabilities = await served.classify(images, deadline, timing=timing)
            response = pb.ClassifyResponse(
                model=served.name, version=str(served.version), id=request.id
            )
            codecs.add_classifications(
                response.results, probabilities, served.labels, request.top_k
            )
            return response

    async def _decode(
        self, request: pb.ClassifyRequest, served: ServedModel, call: Call
    ) -> tuple[ServedModel, np.ndarray]:
        """The version to ask and the request's images decoded for its input shape.

        Costly images (codecs.decode_cost) decode in a worker thread, and a reload meanwhile
        may replace (and close) the version they were decoded for: the model is looked up
        again afterwards, so the version serving by then answers instead of a refusal.
        """
        resolve = self._state.resolve
        if codecs.decode_cost(request.images) <= DECODE_INLINE_COST:
            return served, codecs.decode_images(request.images, served.input_shape)
        images = await asyncio.to_thread(codecs.decode_images, request.images, served.input_shape)
        current = resolve(request.model, request.version, call)
        if current.input_shape != served.input_shape:
            images = await asyncio.to_thread(
                codecs.decode_images, request.images, current.input_shape
            )
        return current, images


def service(servicer: ClassifierServicer) -> Service:
    described = pb.DESCRIPTOR.services_by_name["Classifier"]
    return method_handlers(described, servicer, described.full_name)
