"""What carries the gRPC port: grpcio's grpc.aio server, or pygrpc-native's (--grpc-transport).

grpc.aio spends most of a small request's CPU in its own Python (a do-nothing server on it:
about 0.27 ms of CPU a call here, against 0.03 ms on pygrpc-native; docs/benchmarks.md).
pygrpc-native (`pygrpc_native.aio.server()`, grpc.aio's API) runs HTTP/2, framing, flow
control, deadlines and cancellation on Rust threads outside the GIL and hands each call to the
same handlers on the event loop. It serves the unary and server-streaming methods registered
as method handlers (register below); bidirectional streams (ModelStreamInfer, ClassifyStream)
and reflection go to a grpc.aio server behind it on a Unix socket. Interceptors (tokens,
tracing) run on both. It serves no TLS: `auto` takes grpcio then and logs why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import grpc

from server.api.common import Service
from server.config import Settings

NATIVE, GRPCIO, AUTO = "native", "grpcio", "auto"
NATIVE_PACKAGE = "pygrpc-native"
# How long the native transport's writer threads get to send the last answers before its
# connections close (measured here: 20 ms sent 64 answers on 64 connections every time).
FLUSH_S = 0.1


@dataclass(frozen=True)
class Transport:
    """The transport chosen: `name` NATIVE or GRPCIO; `why` says why auto took grpcio."""

    name: str
    why: str = ""

    def server(
        self, options: Sequence[tuple[str, Any]], interceptors: Sequence[Any]
    ) -> grpc.aio.Server:
        """A server not yet bound, on this transport (grpc.aio.server()'s arguments)."""
        if self.name == NATIVE:
            import pygrpc_native.aio

            return pygrpc_native.aio.server(options=options, interceptors=interceptors)
        return grpc.aio.server(options=options, interceptors=interceptors)

    def line(self) -> str:
        """The start-up log line naming the transport (and why, when auto fell back)."""
        if self.name == NATIVE:
            return (
                f"gRPC transport: native ({NATIVE_PACKAGE} {metadata.version(NATIVE_PACKAGE)}; "
                "bidirectional streams and reflection through grpcio behind it)"
            )
        why = f" ({AUTO}: {self.why})" if self.why else ""
        return f"gRPC transport: grpcio{why}"


def choose(settings: Settings) -> Transport:
    """native or grpcio as asked; auto is native unless it cannot serve the configuration."""
    asked = settings.grpc_transport
    if asked != AUTO:
        return Transport(asked)
    if settings.tls_cert is not None:
        return Transport(GRPCIO, f"{NATIVE_PACKAGE} serves no TLS, and --tls-cert is set")
    try:
        import pygrpc_native.aio  # noqa: F401
    except ImportError as exc:  # a platform it has no wheel for
        return Transport(GRPCIO, f"{NATIVE_PACKAGE} cannot be imported here ({exc})")
    return Transport(NATIVE)


def register(server: grpc.aio.Server, services: Iterable[Service]) -> None:
    """Add each service's methods the way its transport serves them fastest.

    The native front serves a method itself only when it is registered (a generic handler's
    methods go to the grpcio server behind it). grpc.aio 1.85 spends more per call on
    registered methods than on a generic handler's (measured here: 7-9% fewer requests/s,
    served and do-nothing alike; grpc/grpc #43461), so grpcio gets a generic handler.
    """
    native = is_native(server)
    for name, handlers in services:
        if native:
            server.add_registered_method_handlers(name, handlers)
        else:
            server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(name, handlers)])


def is_native(server: grpc.aio.Server) -> bool:
    """Whether `server` is pygrpc-native's (from Transport.server)."""
    return type(server).__module__.startswith("pygrpc_native")


async def stop(server: grpc.aio.Server, grace: float) -> None:
    """server.stop(grace), without losing the answers of the calls in flight on native.

    pygrpc-native 0.5.0 closes its connections as soon as the last handler returns, and
    answers handed to its writer threads just before can go down with them (seen here: a few
    of 24 calls in flight at SIGTERM got UNAVAILABLE "GOAWAY received"). So on native the
    calls in flight now (those accepted: by now new ones are refused) and the streams of its
    grpcio fallback are finished first, and the writers get FLUSH_S to send their answers
    before the connections close.
    """
    if not is_native(server):
        await server.stop(grace)
        return
    began = time.monotonic()
    # Private to pygrpc-native 0.5.0 (pinned): call id -> call with its handler's task, and
    # the grpc.aio server behind it; without them this is server.stop() after FLUSH_S.
    calls = getattr(server, "_calls", {})
    finishing: list[asyncio.Future[Any]] = [
        call.task for call in list(calls.values()) if call.task is not None
    ]
    fallback = getattr(server, "_fallback", None)
    if fallback is not None:
        finishing.append(asyncio.ensure_future(fallback.stop(grace)))
    if finishing:
        await asyncio.wait(finishing, timeout=grace)

    def left() -> float:
        return max(grace - (time.monotonic() - began), 0)

    await asyncio.sleep(min(FLUSH_S, left()))
    await server.stop(left())
