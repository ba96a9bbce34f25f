"""Logging setup: human-readable text lines, or one JSON object per line for log collectors.

Every line logged while a request is served carries that request's id (`request_id`, set by
server.api.status from the caller's `x-request-id` metadata or generated): the id lives in a
context variable, so the batcher's tasks and threads spawned for the request inherit it, and
a filter on the handler copies it onto each record for both formats.

With tracing on (server.observability.tracing), the lines of a sampled request also carry its
trace id (`trace_id`, and `span_id` in JSON: the request's span), so a log line leads to its trace.

With several worker processes, every line of a worker names it (`worker`: its index), so
lines of workers sharing one stream can be told apart.
"""

from __future__ import annotations

import itertools
import json
import logging
import secrets
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

TEXT_FORMAT = "%(asctime)s %(levelname)-7s%(worker_tag)s %(name)s:%(request_tag)s %(message)s"
# Libraries that would drown the server's own lines at INFO.
_QUIET = ("grpc", "asyncio", "PIL", "opentelemetry")

# The id of the request being served in this context; None outside requests.
REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
# (trace id, span id) of the sampled request being served in this context, as hex; else None.
TRACE: ContextVar[tuple[str, str] | None] = ContextVar("trace", default=None)
# A caller's id is kept only if it is this short and printable ASCII: it goes into log lines
# and response metadata, so control characters or megabytes of it must not.
MAX_REQUEST_ID_LENGTH = 128


# Generated ids: a random 64-bit prefix per process, then a counter (32 hex digits in all):
# unique across processes and restarts without a uuid4's syscall and object per request.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def valid_request_id(value: str | bytes | None) -> str | None:
    """`value` when it is a usable id (1..MAX_REQUEST_ID_LENGTH printable ASCII), else None."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not value or len(value) > MAX_REQUEST_ID_LENGTH:
        return None
    if not all(" " <= ch <= "~" for ch in value):
        return None
    return value


class RequestIdFilter(logging.Filter):
    """Adds `request_id` (None outside requests), `trace_id` and `span_id` (None unless the
    request is traced) and `request_tag` (" [ID]", " [ID trace=TRACE_ID]" or "") to records,
    and `worker` (the worker's index, None in a lone server) and `worker_tag` (" wN" or "")."""

    def __init__(self, worker: int | None = None) -> None:
        super().__init__()
        self.worker = worker
        self.worker_tag = "" if worker is None else f" w{worker}"

    def filter(self, record: logging.LogRecord) -> bool:
        request_id = getattr(record, "request_id", None) or REQUEST_ID.get()
        record.request_id = request_id
        trace = TRACE.get()
        record.trace_id, record.span_id = trace if trace is not None else (None, None)
        if trace is not None:
            record.request_tag = f" [{request_id} trace={trace[0]}]"
        else:
            record.request_tag = f" [{request_id}]" if request_id else ""
        record.worker = self.worker
        record.worker_tag = self.worker_tag
        return True


class JsonFormatter(logging.Formatter):
    """{"time", "level", "logger", "message"}, plus "worker" in a worker process,
    "request_id" inside a request, "trace_id" and "span_id" inside a traced one, and
    "exception" (the traceback) when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        worker = getattr(record, "worker", None)
        if worker is not None:
            entry["worker"] = worker
        request_id = getattr(record, "request_id", None)
        if request_id:
            entry["request_id"] = request_id
        trace_id = getattr(record, "trace_id", None)
        if trace_id:
            entry["trace_id"] = trace_id
            entry["span_id"] = getattr(record, "span_id", None)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def configure(log_format: str = "text", level: str = "info", worker: int | None = None) -> None:
    """Send every log record to stderr in `log_format` ("text" or "json") from `level` up;
    `worker`: the index of this worker process, named on each line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(RequestIdFilter(worker))
    handler.setFormatter(
        JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
