"""The HTTP/REST endpoints of the KServe v2 protocol, with Triton's paths and bodies.

Each handler reads its path and body, calls the protocol's operations (server.api.kserve,
shared with gRPC) and writes the answer as Triton writes it (messages.to_json). Errors are
the core's exceptions, answered by the application's middleware (server.api.rest.app).
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from aiohttp import web

from server.api.common import ApiState
from server.api.kserve import KServe
from server.api.rest import codec
from server.api.rest.messages import to_json
from server.core.modelstats import Timing
from server.core.overrides import FILE_PREFIX
from server.errors import InvalidInputError, UnsupportedError
from wire import grpc_service_pb2 as pb

API_LABEL = "http"
# Triton answers a probe that says "no" with 400 and no body; the OIP's JSON goes with both.
NOT_READY = 400


def json_response(document: Any, status: int = 200) -> web.Response:
    body = json.dumps(document, separators=(",", ":")).encode()
    return web.Response(body=body, status=status, content_type=codec.JSON_TYPE)


def _model(request: web.Request) -> tuple[str, str]:
    return request.match_info["model"], request.match_info.get("version", "")


async def _json_body(request: web.Request) -> dict[str, Any]:
    """The body of a control call: a JSON object, or nothing."""
    data = await request.read()
    if not data.strip():
        return {}
    try:
        document = json.loads(data)
    except (RecursionError, UnicodeDecodeError, ValueError):
        raise InvalidInputError("the body is not valid JSON") from None
    if not isinstance(document, dict):
        raise InvalidInputError("the body must be a JSON object")
    return document


def _load_parameters(parameters: Any) -> dict[str, pb.ModelRepositoryParameter]:
    """A load's JSON parameters as the protocol's: every value a string, as Triton reads them;
    a `file:` parameter's base64 decoded (Triton's decoder, too, skips characters outside the
    alphabet such as line breaks)."""
    if not isinstance(parameters, dict):
        raise InvalidInputError("'parameters' must be a JSON object")
    found = {}
    for key, value in parameters.items():
        if not isinstance(value, str):
            raise InvalidInputError(
                f"invalid value type for load parameter '{key}', expected a string."
            )
        if key.startswith(FILE_PREFIX):
            try:
                content = base64.b64decode(value)
            except (binascii.Error, ValueError) as exc:
                raise InvalidInputError(f"'{key}' is not valid base64: {exc}") from None
            found[key] = pb.ModelRepositoryParameter(bytes_param=content)
        else:
            found[key] = pb.ModelRepositoryParameter(string_param=value)
    return found


class Handlers:
    def __init__(self, state: ApiState, kserve: KServe) -> None:
        self._state = state
        self._kserve = kserve

    def add_routes(self, app: web.Application) -> None:
        model = "/v2/models/{model}"
        versioned = "/v2/models/{model}/versions/{version}"
        app.router.add_get("/v2/health/live", self.live)
        app.router.add_get("/v2/health/ready", self.ready)
        app.router.add_get("/v2", self.server_metadata)
        app.router.add_get("/v2/models/stats", self.statistics)  # before {model}: not a model
        for base in (model, versioned):
            app.router.add_get(base, self.model_metadata)
            app.router.add_get(f"{base}/ready", self.model_ready)
            app.router.add_get(f"{base}/config", self.model_config)
            app.router.add_get(f"{base}/stats", self.statistics)
            app.router.add_post(f"{base}/infer", self.infer)
        app.router.add_post("/v2/repository/index", self.repository_index)
        app.router.add_post("/v2/repository/models/{model}/load", self.load)
        app.router.add_post("/v2/repository/models/{model}/unload", self.unload)
        # Triton's shared-memory extensions: answered 501 with a reason, not a bare 404.
        for kind in ("systemsharedmemory", "cudasharedmemory"):
            app.router.add_route("*", f"/v2/{kind}{{tail:(/.*)?}}", self.shared_memory)

    # --- health and metadata ---

    async def live(self, request: web.Request) -> web.Response:
        return json_response({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = await self._kserve.server_ready()
        return json_response({"ready": ready}, 200 if ready else NOT_READY)

    async def model_ready(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        ready = await self._kserve.model_ready(name, version)
        return json_response({"name": name, "ready": ready}, 200 if ready else NOT_READY)

    async def server_metadata(self, request: web.Request) -> web.Response:
        return json_response(to_json(self._kserve.server_metadata()))

    async def model_metadata(self, request: web.Request) -> web.Response:
        return json_response(to_json(self._kserve.model_metadata(*_model(request))))

    async def model_config(self, request: web.Request) -> web.Response:
        return json_response(to_json(self._kserve.model_config(*_model(request)).config))

    async def statistics(self, request: web.Request) -> web.Response:
        name, version = request.match_info.get("model", ""), request.match_info.get("version", "")
        return json_response(to_json(await self._kserve.statistics(name, version)))

    # --- model repository extension ---

    async def repository_index(self, request: web.Request) -> web.Response:
        ready = (await _json_body(request)).get("ready", False)
        if not isinstance(ready, bool):
            raise InvalidInputError("'ready' must be a boolean")
        index = await self._kserve.repository_index(ready)
        # As Triton writes it: a field that is empty (no version, no reason) is left out.
        entries = [
            {key: value for key, value in to_json(entry).items() if value} for entry in index.models
        ]
        return json_response(entries)

    async def load(self, request: web.Request) -> web.Response:
        parameters = _load_parameters((await _json_body(request)).get("parameters") or {})
        await self._kserve.load(request.match_info["model"], parameters)
        return web.Response(status=200)

    async def unload(self, request: web.Request) -> web.Response:
        await _json_body(request)  # `unload_dependents` means nothing here: no dependents
        await self._kserve.unload(request.match_info["model"])
        return web.Response(status=200)

    async def shared_memory(self, request: web.Request) -> web.Response:
        raise UnsupportedError(
            "shared memory is not supported; send the tensors in the request instead"
        )

    # --- inference ---

    async def infer(self, request: web.Request) -> web.Response:
        name, version = _model(request)
        body = await request.read()  # past --max-message-bytes: 413, never counted
        # The span is named after the route; the caller's trace context comes in the headers.
        span = f"POST {request.path}"
        with self._state.call(API_LABEL, None, name=span, carrier=request.headers.items()) as call:
            timing = Timing()
            length = codec.header_length(request.headers.get(codec.HEADER_LENGTH), len(body))
            signature = self._state.manager.get(name, version).signature
            if length == 0:  # Triton's raw binary request: the one input's bytes, no JSON
                decoded = codec.decode_raw(body, name, version, signature)
            else:
                decoded = codec.decode_infer(body, length, name, version, signature)

            def render(response: pb.ModelInferResponse) -> web.Response:
                data, header = codec.encode_infer(response, decoded)
                kind = codec.JSON_TYPE if header is None else codec.BINARY_TYPE
                answer = web.Response(body=data, content_type=kind)
                if header is not None:
                    answer.headers[codec.HEADER_LENGTH] = str(header)
                if request.headers.get("Accept-Encoding"):
                    answer.enable_compression()  # gzip or deflate, as the client accepts
                return answer

            return await self._kserve.infer(
                decoded.request, None, call, timing=timing, render=render
            )
