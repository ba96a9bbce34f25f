"""The server's start-up log lines, a contract: scripts and tests read the ports chosen for
port 0 from the LISTENING line, and wait for the STARTED line, which also shows how to call
the server."""

from __future__ import annotations

import os
import re
import sys

from server.config import Settings

STARTED = "startup complete"
# Logged once the ports are bound: "serving on grpc HOST:PORT metrics http://HOST:PORT/metrics
# rest http://HOST:PORT; ..." ("rest off" with --disable-http, "https" with TLS). Scripts read
# the ports chosen for port 0 from it with parse_listening() and parse_rest_port().
LISTENING_PREFIX = "serving on grpc "
_LISTENING = re.compile(
    re.escape(LISTENING_PREFIX)
    + r"(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^\s:\[\]]+)):(?P<grpc>\d+)"
    + r" metrics http://(?:\[[^\]]*\]|[^\s:\[\]]+):(?P<metrics>\d+)/metrics"
)
_REST = re.compile(r" rest (?:https?://(?:\[[^\]]*\]|[^\s:\[\]/]+):(?P<port>\d+)|off)")


def hostport(host: str, port: int) -> str:
    """HOST:PORT with an IPv6 host in brackets, as gRPC dials it and the server logs it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listening_line(grpc_at: str, metrics_at: str, rest_url: str) -> str:
    """The start of the LISTENING line (rest_url "" when HTTP is off)."""
    rest = rest_url or "off"
    return f"{LISTENING_PREFIX}{grpc_at} metrics http://{metrics_at}/metrics rest {rest}"


def http_url(settings: Settings, port: int) -> str:
    """The HTTP/REST API's address as the log shows it (https with TLS)."""
    scheme = "https" if settings.tls_cert is not None else "http"
    return f"{scheme}://{hostport(settings.host, port)}"


def parse_rest_port(line: str) -> int | None:
    """The HTTP/REST port of a LISTENING line: 0 when HTTP is off, None for another line."""
    if parse_listening(line) is None:
        return None
    match = _REST.search(line)
    return None if match is None else int(match["port"] or 0)


def parse_listening(line: str) -> tuple[str, int, int] | None:
    """(gRPC host, gRPC port, metrics port) from the server's "serving on grpc ..." log line.

    Works on text and JSON log lines; the host comes without IPv6 brackets (hostport() adds
    them back). None for any other line.
    """
    match = _LISTENING.search(line)
    if match is None:
        return None
    return match["v6"] or match["host"], int(match["grpc"]), int(match["metrics"])


def started_line(
    served: int, ready: bool, grpc_at: str, example: str, rest_url: str = "", workers: int = 1
) -> str:
    """The STARTED line: what serves, whether the server is ready, and how to call it
    (rest_url "" when HTTP is off)."""
    dial = _dial_address(grpc_at)
    on = f" on {workers} workers" if workers > 1 else ""
    rest = ""
    if rest_url:
        scheme, _, bound = rest_url.partition("://")
        rest = f", or over HTTP/REST (curl {scheme}://{_dial_address(bound)}/v2/models/{example})"
    return (
        f"{STARTED}: {served} model version(s) serving{on}, "
        f"{'ready' if ready else 'NOT ready (see the models above)'}; call it with the native "
        f"API ({_python()} -m client classify --server {dial} --model {example} IMAGE.png) or "
        f"the KServe v2 protocol (tritonclient.grpc.InferenceServerClient({dial!r})){rest}"
    )


def _python() -> str:
    """The interpreter to show in the hint: the project's venv as a path the user can type."""
    relative = os.path.relpath(sys.executable)
    return "python" if relative.startswith("..") else relative


def _dial_address(bound: str) -> str:
    """A wildcard bind address is not one a client can dial: show localhost instead."""
    host, _, port = bound.rpartition(":")
    return f"localhost:{port}" if host in ("0.0.0.0", "[::]", "") else bound
