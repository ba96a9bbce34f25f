"""grpc.health.v1 statuses kept in step with the models, and server reflection.

Health services: "" (the whole server: every model asked for is ready and the server is
not draining), each API's service name (same as ""), each model by its name, and
"liveness": SERVING from the moment the port answers until draining starts, whatever the
models do. Liveness probes ask it: a model that fails to load is a readiness matter, and
restarting the process would not fix it; a process that cannot answer at all gets restarted.

Statuses other than liveness are the whole server's (server.processes.cluster: with several workers,
every worker's): recomputed when this worker's models change, when another worker says its
changed, and on a Check when the last computation is older than CHECK_FRESH_S.

Reflection describes the KServe service under its wire name `inference.GRPCInferenceService`:
our messages live in package `imgserve.inference`, so reflection gets a private descriptor
pool holding a copy of our files with the package renamed (type references rewritten).
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from server.api.common import ApiState
from wire import classifier_pb2, grpc_service_pb2, model_config_pb2

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
LIVENESS = "liveness"
HEALTH_SERVICE = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
OUR_PACKAGE = "imgserve.inference"
WIRE_PACKAGE = "inference"
# A Check recomputes the statuses when they are older than this (they ask every worker).
CHECK_FRESH_S = 0.5


class Health:
    """The health servicer, plus `refresh` computing every status from the whole server."""

    def __init__(self, state: ApiState, api_services: Iterable[str]) -> None:
        self._state = state
        self._api_services = tuple(api_services)
        self.servicer = _Servicer(self)
        self._refreshed = float("-inf")

    def add_to_server(self, server: grpc.aio.Server) -> None:
        health_pb2_grpc.add_HealthServicer_to_server(self.servicer, server)

    async def refresh(self) -> None:
        self._refreshed = time.monotonic()
        view = await self._state.cluster.view()
        await self.servicer.set(LIVENESS, SERVING)
        overall = SERVING if view.ready and not self._state.draining else NOT_SERVING
        for service in ("", *self._api_services):
            await self.servicer.set(service, overall)
        for name in sorted({model.name for model in view.index()}):
            serves = view.model_ready(name) and not self._state.draining
            await self.servicer.set(name, SERVING if serves else NOT_SERVING)

    async def refresh_if_stale(self) -> None:
        if time.monotonic() - self._refreshed > CHECK_FRESH_S:
            await self.refresh()

    async def drain(self) -> None:
        """Every service NOT_SERVING from now on, whatever refresh would say."""
        await self.servicer.enter_graceful_shutdown()


class _Servicer(health.aio.HealthServicer):
    """grpc.health.v1, with statuses brought up to date before a Check answers."""

    def __init__(self, health: Health) -> None:
        super().__init__()
        self._health = health

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: grpc.aio.ServicerContext
    ) -> health_pb2.HealthCheckResponse:
        await self._health.refresh_if_stale()
        return await super().Check(request, context)


def _renamed(file: descriptor_pb2.FileDescriptorProto) -> descriptor_pb2.FileDescriptorProto:
    """A copy of `file` in package `inference`, with every type reference rewritten."""
    copy = descriptor_pb2.FileDescriptorProto()
    copy.CopyFrom(file)
    copy.package = WIRE_PACKAGE
    old, new = f".{OUR_PACKAGE}.", f".{WIRE_PACKAGE}."

    def fix_message(message: descriptor_pb2.DescriptorProto) -> None:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
        for nested in message.nested_type:
            fix_message(nested)

    for message in copy.message_type:
        fix_message(message)
    for service in copy.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old) :]
            method.output_type = new + method.output_type[len(old) :]
    return copy


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """The files reflection serves: KServe (as `inference`), native API, health, reflection."""
    pool = descriptor_pool.DescriptorPool()
    for module, rename in (
        (model_config_pb2, True),
        (grpc_service_pb2, True),
        (classifier_pb2, False),
        (health_pb2, False),
        (reflection_pb2, False),
    ):
        file = descriptor_pb2.FileDescriptorProto()
        module.DESCRIPTOR.CopyToProto(file)
        pool.Add(_renamed(file) if rename else file)
    return pool


def enable_reflection(server: grpc.aio.Server, services: Iterable[str]) -> None:
    names = (*services, HEALTH_SERVICE, reflection.SERVICE_NAME)
    reflection.enable_server_reflection(names, server, pool=reflection_pool())
