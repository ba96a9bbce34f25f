"""Plain HTTP calls to a started server's REST port, answering (status, headers, body)
whatever the status: the tests read error answers as closely as successful ones."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from server_process import ServerProcess


def http_post(
    server: ServerProcess, path: str, body: Any, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """POST `body` (bytes as they are, anything else as JSON)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        server.http_url + path, data=data, headers=headers or {}, method="POST"
    )
    return http_open(request)


def http_get(server: ServerProcess, path: str) -> tuple[int, dict[str, str], bytes]:
    return http_open(urllib.request.Request(server.http_url + path))


def http_open(request: urllib.request.Request) -> tuple[int, dict[str, str], bytes]:
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()
