"""The KServe v2 / Open Inference Protocol servicer (`inference.GRPCInferenceService`).

Converts messages with server.codecs and calls the core; errors are the core's exceptions,
mapped to status codes by server.api.status.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from importlib import metadata

import grpc

from modelrepo.layout import INPUT_NAME, OUTPUT_NAME
from server import codecs
from server.api.common import ApiState, answer_concurrently, generic_handler
from server.api.health import Health
from server.api.status import Call, deadline_of, describe, guarded
from server.errors import (
    ModelControlDisabledError,
    ModelNotFoundError,
    ModelUnavailableError,
    UnsupportedError,
)
from wire import grpc_service_pb2 as pb

WIRE_SERVICE = "inference.GRPCInferenceService"
SERVER_NAME = "imgserve"
# The protocol extensions this server implements, by their Triton names.
EXTENSIONS = ("classification", "model_configuration", "model_repository", "statistics")
API_LABEL = "kserve"
MODEL_CONTROL_DISABLED = "model control is disabled; start the server with --enable-model-control"
Context = grpc.aio.ServicerContext


def _server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _timeout_deadline(request: pb.ModelInferRequest, deadline: float | None) -> float | None:
    """The earlier of the RPC deadline and Triton's `timeout` parameter (microseconds)."""
    param = request.parameters.get("timeout")
    if param is None or param.WhichOneof("parameter_choice") not in ("int64_param", "uint64_param"):
        return deadline
    micros = param.int64_param or param.uint64_param
    if micros <= 0:
        return deadline
    own = time.monotonic() + micros / 1e6
    return own if deadline is None else min(own, deadline)


def _check_parameters(request: pb.ModelInferRequest) -> None:
    sequence = request.parameters.get("sequence_id")
    if sequence is not None and (sequence.int64_param or sequence.string_param):
        raise UnsupportedError("sequence batching is not supported: the models are stateless")


class InferenceServicer:
    def __init__(self, state: ApiState, health: Health, model_control: bool = False) -> None:
        self._state = state
        self._health = health
        self._model_control = model_control
        self._version = _server_version()

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
        if self._state.draining:
            return pb.ServerReadyResponse(ready=False)
        return pb.ServerReadyResponse(ready=(await self._state.cluster.view()).ready)

    @guarded
    async def ModelReady(
        self, request: pb.ModelReadyRequest, context: Context
    ) -> pb.ModelReadyResponse:
        try:
            served = self._state.manager.get(request.name, request.version)
        except (ModelNotFoundError, ModelUnavailableError):
            return pb.ModelReadyResponse(ready=False)
        if self._state.draining:
            return pb.ModelReadyResponse(ready=False)
        view = await self._state.cluster.view()
        return pb.ModelReadyResponse(ready=view.model_ready(served.name, str(served.version)))

    @guarded
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Context
    ) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self._version, extensions=EXTENSIONS
        )

    @guarded
    async def ModelMetadata(
        self, request: pb.ModelMetadataRequest, context: Context
    ) -> pb.ModelMetadataResponse:
        served = self._state.manager.get(request.name, request.version)
        versions = [str(m.version) for m in self._state.manager.served() if m.name == served.name]
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=served.name,
            versions=versions if not request.version else [str(served.version)],
            platform=served.platform,
            inputs=[tensor(name=INPUT_NAME, datatype="FP32", shape=[-1, *served.input_shape])],
            outputs=[tensor(name=OUTPUT_NAME, datatype="FP32", shape=[-1, served.num_classes])],
        )

    @guarded
    async def ModelConfig(
        self, request: pb.ModelConfigRequest, context: Context
    ) -> pb.ModelConfigResponse:
        served = self._state.manager.get(request.name, request.version)
        return pb.ModelConfigResponse(config=served.config)

    @guarded
    async def ModelStatistics(
        self, request: pb.ModelStatisticsRequest, context: Context
    ) -> pb.ModelStatisticsResponse:
        stats = await self._state.cluster.statistics(request.name, request.version)
        return pb.ModelStatisticsResponse(model_stats=stats)

    # --- model repository extension ---

    @guarded
    async def RepositoryIndex(
        self, request: pb.RepositoryIndexRequest, context: Context
    ) -> pb.RepositoryIndexResponse:
        entry = pb.RepositoryIndexResponse.ModelIndex
        view = await self._state.cluster.view()
        models = [
            entry(name=s.name, version=s.version, state=s.state, reason=s.reason)
            for s in view.index()
            if not request.ready or s.state == "READY"
        ]
        return pb.RepositoryIndexResponse(models=models)

    @guarded
    async def RepositoryModelLoad(
        self, request: pb.RepositoryModelLoadRequest, context: Context
    ) -> pb.RepositoryModelLoadResponse:
        self._check_model_control()
        if request.parameters:
            raise UnsupportedError(
                "loading with a config override or files is not supported; "
                "edit the repository and load by name"
            )
        try:
            await self._state.cluster.load(request.model_name)
        finally:
            await self._health.refresh()
        return pb.RepositoryModelLoadResponse()

    @guarded
    async def RepositoryModelUnload(
        self, request: pb.RepositoryModelUnloadRequest, context: Context
    ) -> pb.RepositoryModelUnloadResponse:
        # `unload_dependents` is accepted and means nothing here: models have no dependents.
        self._check_model_control()
        try:
            await self._state.cluster.unload(request.model_name)
        finally:
            await self._health.refresh()
        return pb.RepositoryModelUnloadResponse()

    def _check_model_control(self) -> None:
        if not self._model_control:
            raise ModelControlDisabledError(MODEL_CONTROL_DISABLED)

    # --- inference ---

    @guarded
    async def ModelInfer(
        self, request: pb.ModelInferRequest, context: Context
    ) -> pb.ModelInferResponse:
        with self._state.call(API_LABEL, context) as call:
            return await self._infer(request, deadline_of(context), call)

    @guarded
    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Context
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async def answer(request: pb.ModelInferRequest) -> pb.ModelStreamInferResponse:
            with self._state.call(API_LABEL, context) as call:
                response = await self._infer(request, deadline_of(context), call)
            return pb.ModelStreamInferResponse(infer_response=response)

        def fail(request: pb.ModelInferRequest, exc: Exception) -> pb.ModelStreamInferResponse:
            _, message = describe(exc)
            echo = pb.ModelInferResponse(
                model_name=request.model_name, model_version=request.model_version, id=request.id
            )
            return pb.ModelStreamInferResponse(error_message=message, infer_response=echo)

        async for response in answer_concurrently(requests, answer, fail):
            yield response

    async def _infer(
        self, request: pb.ModelInferRequest, deadline: float | None, call: Call
    ) -> pb.ModelInferResponse:
        served = self._state.resolve(request.model_name, request.model_version, call)
        _check_parameters(request)
        inputs = codecs.decode_infer_inputs(request, served.input_shape)
        outputs = codecs.requested_outputs(request, served.num_classes)
        probabilities = await served.infer(inputs.images, _timeout_deadline(request, deadline))
        response = pb.ModelInferResponse(
            model_name=served.name, model_version=str(served.version), id=request.id
        )
        codecs.encode_infer_outputs(response, probabilities, outputs, served.labels, inputs.raw)
        return response


def handlers(servicer: InferenceServicer) -> list[grpc.GenericRpcHandler]:
    """The service under its wire name, and under our package's name for stubs built from
    wire.grpc_service_pb2_grpc (same messages, same servicer)."""
    service = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    return [
        generic_handler(service, servicer, WIRE_SERVICE),
        generic_handler(service, servicer, service.full_name),
    ]
