"""The KServe v2 / Open Inference Protocol servicer (`inference.GRPCInferenceService`).

Each method hands its message to the protocol's operations (server.api.kserve), shared with
the HTTP/REST servicer; errors are the core's exceptions, mapped to status codes by
server.api.status.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc

from server.api.common import ApiState, Service, answer_concurrently, method_handlers
from server.api.kserve import KServe
from server.api.status import deadline_of, describe, guarded
from wire import grpc_service_pb2 as pb

WIRE_SERVICE = "inference.GRPCInferenceService"
API_LABEL = "kserve"
Context = grpc.aio.ServicerContext


class InferenceServicer:
    def __init__(self, state: ApiState, kserve: KServe) -> None:
        self._state = state
        self._kserve = kserve

    # --- health and metadata ---

    @guarded
    async def ServerLive(
        self, request: pb.ServerLiveRequest, context: Context
    ) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    @guarded
    async def ServerReady(
        self, request: pb.ServerReadyRequest, context: Context
    ) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self._kserve.server_ready())

    @guarded
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        ready = await self._kserve.model_ready(request.name, request.version)
        return pb.ModelReadyResponse(ready=ready)

    @guarded
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return self._kserve.server_metadata()

    @guarded
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        return self._kserve.model_metadata(request.name, request.version)

    @guarded
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        return self._kserve.model_config(request.name, request.version)

    @guarded
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        return await self._kserve.statistics(request.name, request.version)

    # --- model repository extension ---

    @guarded
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        return await self._kserve.repository_index(request.ready)

    @guarded
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        await self._kserve.load(request.model_name, request.parameters)
        return pb.RepositoryModelLoadResponse()

    @guarded
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        await self._kserve.unload(request.model_name)
        return pb.RepositoryModelUnloadResponse()

    # --- inference ---

    @guarded
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        with self._state.call(API_LABEL, context) as call:
            return await self._kserve.infer(request, deadline_of(context), call)

    @guarded
    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            with self._state.call(API_LABEL, context) as call:
                response = await self._kserve.infer(request, deadline_of(context), call)
            return pb.ModelStreamInferResponse(infer_response=response)

        def fail(request: pb.ModelInferRequest, exc: Exception) -> pb.ModelStreamInferResponse:
            _, message = describe(exc)
            echo = pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            )
            return pb.ModelStreamInferResponse(error_message=message, infer_response=echo)

        async for response in answer_concurrently(requests, answer, fail):
            yield response


def services(servicer: InferenceServicer) -> list[Service]:
    """The service under its wire name, and under our package's name for stubs built from
    wire.grpc_service_pb2_grpc (same messages, same servicer)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return [
        method_handlers(service, servicer, WIRE_SERVICE),
        method_handlers(service, servicer, service.full_name),
    ]
