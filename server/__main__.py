"""`python -m server --model-repository DIR`: serve a model repository over gRPC."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from server import logs
from server.app import StartupError, serve
from server.config import parse_settings


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    logs.configure(settings.log_format, settings.log_level)
    try:
        return asyncio.run(serve(settings))
    except StartupError as exc:
        logging.getLogger("server").error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 130


if __name__ == "__main__":
    sys.exit(main())
