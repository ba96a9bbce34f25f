"""The KServe v2 / Open Inference Protocol operations, whichever transport carried the call.

Both the gRPC servicer (server.api.inference) and the HTTP/REST one (server.api.rest) convert
their wire format to and from the protocol's messages (wire.grpc_service_pb2, the protocol's
own schema) and call these, so the two answer alike: same validation, same statistics, same
errors (the core's exceptions; each transport maps them with server.api.status).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from importlib import metadata
from typing import TypeVar

from server.api import codecs
from server.api.common import ApiState, recorded
from server.api.health import Health
from server.api.status import Call
from server.core.modelstats import Timing
from server.core.overrides import CONFIG_PARAMETER, FILE_PREFIX, POLL_FAILED, parse_override
from server.errors import (
    InvalidInputError,
    ModelControlDisabledError,
    ModelNotFoundError,
    ModelUnavailableError,
)
from wire import grpc_service_pb2 as pb

SERVER_NAME = "imgserve"
# The protocol extensions this server implements, by their Triton names (binary_tensor_data
# is HTTP's: gRPC always carries raw bytes).
EXTENSIONS = (
    "binary_tensor_data",
    "classification",
    "model_configuration",
    "model_repository",
    "schedule_policy",
    "statistics",
)
MODEL_CONTROL_DISABLED = "model control is disabled; start the server with --enable-model-control"

T = TypeVar("T")


def _server_version() -> str:
    try:
        return metadata.version(SERVER_NAME)
    except metadata.PackageNotFoundError:
        return "0+unknown"


def _same(response: pb.ModelInferResponse) -> pb.ModelInferResponse:
    return response


def _override_parameters(
    parameters: Mapping[str, pb.ModelRepositoryParameter],
) -> tuple[str | None, dict[str, bytes]]:
    """A load's `config` and `file:` parameters, with the value types and the messages of
    Triton's gRPC front-end (its HTTP one reads every value as a string)."""
    config: str | None = None
    files: dict[str, bytes] = {}
    for key in sorted(parameters):
        value = parameters[key]
        kind = value.WhichOneof("parameter_choice")
        if key == CONFIG_PARAMETER:
            if kind != "string_param":
                raise InvalidInputError(
                    f"invalid value type for load parameter '{key}', expected string_param."
                )
            config = value.string_param
        elif key.startswith(FILE_PREFIX):
            if kind != "bytes_param":
                raise InvalidInputError(
                    f"invalid value type for load parameter '{key}', expected bytes_param."
                )
            files[key] = value.bytes_param
        else:
            raise InvalidInputError(f"unrecognized load parameter '{key}'.")
    return config, files


class KServe:
    """The protocol's operations on the core (this worker's models, the whole server)."""

    def __init__(self, state: ApiState, health: Health, model_control: bool = False) -> None:
        self._state = state
        self._health = health
        self._model_control = model_control
        self.version = _server_version()

    # --- health and metadata ---

    async def server_ready(self) -> bool:
        if self._state.draining:
            return False
        return (await self._state.cluster.view()).ready

    async def model_ready(self, name: str, version: str) -> bool:
        try:
            served = self._state.manager.get(name, version)
        except (ModelNotFoundError, ModelUnavailableError):
            return False
        if self._state.draining:
            return False
        view = await self._state.cluster.view()
        return view.model_ready(served.name, str(served.version))

    def server_metadata(self) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(
            name=SERVER_NAME, version=self.version, extensions=EXTENSIONS
        )

    def model_metadata(self, name: str, version: str) -> pb.ModelMetadataResponse:
        manager = self._state.manager
        served = manager.get(name, version)
        versions = [str(m.version) for m in manager.served() if m.name == served.name]
        tensor = pb.ModelMetadataResponse.TensorMetadata
        signature = served.signature
        batched = signature.batched
        return pb.ModelMetadataResponse(
            name=served.name,
            versions=versions if not version else [str(served.version)],
            platform=served.platform,
            inputs=[
                tensor(name=t.name, datatype=t.datatype.name, shape=t.shown_dims(batched))
                for t in signature.inputs
            ],
            outputs=[
                tensor(name=t.name, datatype=t.datatype.name, shape=t.shown_dims(batched))
                for t in signature.outputs
            ],
        )

    def model_config(self, name: str, version: str) -> pb.ModelConfigResponse:
        return pb.ModelConfigResponse(config=self._state.manager.get(name, version).config)

    async def statistics(self, name: str, version: str) -> pb.ModelStatisticsResponse:
        stats = await self._state.cluster.statistics(name, version)
        return pb.ModelStatisticsResponse(model_stats=stats)

    # --- model repository extension ---

    async def repository_index(self, ready_only: bool) -> pb.RepositoryIndexResponse:
        entry = pb.RepositoryIndexResponse.ModelIndex
        view = await self._state.cluster.view()
        return pb.RepositoryIndexResponse(
            models=[
                entry(name=s.name, version=s.version, state=s.state, reason=s.reason)
                for s in view.index()
                if not ready_only or s.state == "READY"
            ]
        )

    async def load(
        self, name: str, parameters: Mapping[str, pb.ModelRepositoryParameter] | None = None
    ) -> None:
        """Load (or reload) `name` on every worker. `parameters`: Triton's `config` (a JSON
        ModelConfig instead of config.pbtxt) and `file:<path>` (the model folder's files),
        checked as Triton checks them (server.core.overrides)."""
        self._check_model_control()
        override = parse_override(name, *_override_parameters(parameters or {}))
        try:
            await self._state.cluster.load(name, override)
        except ModelNotFoundError as exc:  # Triton's words first: its clients look for them
            raise ModelNotFoundError(f"{POLL_FAILED.format(name=name)}: {exc}") from None
        finally:
            await self._health.refresh()

    async def unload(self, name: str) -> None:
        # `unload_dependents` means nothing here: models have no dependents.
        self._check_model_control()
        try:
            await self._state.cluster.unload(name)
        finally:
            await self._health.refresh()

    def _check_model_control(self) -> None:
        if not self._model_control:
            raise ModelControlDisabledError(MODEL_CONTROL_DISABLED)

    # --- inference ---

    async def infer(
        self,
        request: pb.ModelInferRequest,
        deadline: float | None,
        call: Call,
        *,
        timing: Timing | None = None,
        render: Callable[[pb.ModelInferResponse], T] = _same,  # type: ignore[assignment]
    ) -> T:
        """Answer one inference request.

        `timing`: the request's clock, when the transport started it before its own decoding
        (that counts as compute_input); `render`: turns the response into the transport's
        answer, timed as compute_output. Outputs always travel in raw_output_contents, as
        Triton answers, whether the inputs came raw or in typed contents.
        """
        timing = Timing() if timing is None else timing
        served = self._state.resolve(request.model_name, request.model_version, call)
        with recorded(served, timing):
            schedule = codecs.request_schedule(request)
            signature = served.signature
            tensors = codecs.decode_infer_inputs(request, signature, served.image)
            outputs = codecs.requested_outputs(request, signature)
            timing.decoded()
            results = await served.infer(
                tensors, deadline,
                priority=schedule.priority, timeout_us=schedule.timeout_us, timing=timing,
            )  # fmt: skip
            response = pb.ModelInferResponse(
                model_name=served.name, model_version=str(served.version), id=request.id
            )
            codecs.encode_infer_outputs(response, results, outputs, signature, served.output_labels)
            return render(response)
