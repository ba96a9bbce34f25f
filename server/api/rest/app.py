"""The HTTP/REST port: an aiohttp application on the server's own event loop.

Why aiohttp: it serves on the event loop that already runs gRPC, the batchers and the control
channel, in the same process (no second loop, thread or process to hand requests to), takes
a socket bound by the caller (so a worker joins the SO_REUSEPORT group of the port the
supervisor reserved, as gRPC does: server.processes.sockets), speaks TLS with the standard library's
ssl contexts, bounds request bodies, and cancels a handler whose client hangs up, so a
queued request is dropped as over gRPC. Its parser is C (llhttp).

Middleware gives every answer what gRPC's give it: a request id (the caller's `x-request-id`
header when usable) and the worker that answered in the response headers, the token check
with the same scopes (server.api.security), and errors as the core's table says
(server.api.status.HTTP_STATUS) with Triton's body, `{"error": "..."}`; an unexpected error
answers 500 with a generic message and its traceback goes to the log.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import grpc
from aiohttp import web

from server.api.common import ApiState
from server.api.kserve import KServe
from server.api.rest.handlers import Handlers, json_response
from server.api.security import (
    PERMISSION_DENIED_MESSAGE,
    UNAUTHENTICATED_MESSAGE,
    Security,
    bearer_token,
    required_http_scope,
)
from server.api.status import HTTP_STATUS, REQUEST_ID_KEY, answer_metadata, choose_request_id
from server.api.status import describe as describe_error
from server.observability.logs import REQUEST_ID
from server.processes.sockets import bind_tcp

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class _Refused(Exception):
    """A call the token check refuses."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def _error(status: int, message: str) -> web.Response:
    return json_response({"error": message}, status)


@web.middleware
async def _answers(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id and worker headers on every answer; exceptions as JSON errors."""
    request_id = choose_request_id(request.headers.get(REQUEST_ID_KEY))
    REQUEST_ID.set(request_id)  # this request's task: its log lines carry the id
    try:
        response = await handler(request)
    except _Refused as exc:
        response = _error(HTTP_STATUS[exc.code], str(exc))
        if exc.code is grpc.StatusCode.UNAUTHENTICATED:
            response.headers["WWW-Authenticate"] = "Bearer"
        log.debug("refused %s %s: %s", request.method, request.path, exc.code.name)
    except web.HTTPException as exc:  # aiohttp's own: unknown path or method, body too large
        response = _error(exc.status, exc.text or exc.reason)
    except Exception as exc:
        code, message = describe_error(exc)
        response = _error(HTTP_STATUS.get(code, 500), message)
    for key, value in answer_metadata(request_id):
        response.headers[key] = value
    return response


def _authenticate(security: Security) -> Callable[..., Awaitable[web.StreamResponse]]:
    tokens = security.tokens
    assert tokens is not None

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        needed = required_http_scope(request.path)
        if request.match_info.http_exception is not None or needed is None:
            return await handler(request)  # no such endpoint (answered 404/405), or open
        headers = [
            ("authorization", value) for value in request.headers.getall("Authorization", [])
        ]
        granted = tokens.scope_of(bearer_token(headers))
        if granted is None:
            code, message = grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE
        elif granted < needed:
            code, message = grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE
        else:
            return await handler(request)
        tokens.refused(code)
        raise _Refused(code, message)  # the body is never read

    return authenticate


class RestServer:
    """The HTTP/REST API of one serving process."""

    def __init__(
        self,
        state: ApiState,
        kserve: KServe,
        security: Security,
        max_body_bytes: int,
        shutdown_timeout: float,
    ) -> None:
        middlewares = [_answers]
        if security.tokens is not None:
            middlewares.append(_authenticate(security))
        app = web.Application(client_max_size=max_body_bytes, middlewares=middlewares)
        Handlers(state, kserve).add_routes(app)
        self._ssl = security.ssl_context
        self._runner = web.AppRunner(
            app, handler_cancellation=True, access_log=None, shutdown_timeout=shutdown_timeout
        )

    async def start(self, host: str, port: int, *, reuse_port: bool) -> int:
        """Listen on (host, port); returns the port. `reuse_port`: join the supervisor's group.
        Raises OSError when the port cannot be bound."""
        sock = bind_tcp(host, port, reuse_port=reuse_port)
        try:
            await self._runner.setup()
            await web.SockSite(self._runner, sock, ssl_context=self._ssl).start()
        except BaseException:
            sock.close()
            raise
        return int(sock.getsockname()[1])

    async def stop(self) -> None:
        """Stop listening, let the calls in progress finish (up to the shutdown timeout)."""
        await self._runner.cleanup()
