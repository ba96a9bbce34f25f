"""`python -m server --model-repository DIR`: serve a model repository over gRPC.

With more than one worker (`--workers N`, or auto with several usable CPUs) this process is
the supervisor of N worker processes sharing the ports (server.processes.supervisor); with one it is
the server itself.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence

from server.app import serve
from server.config import parse_settings
from server.errors import StartupError
from server.observability import logs
from server.processes.cpus import usable_cpus

log = logging.getLogger("server")


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = parse_settings(argv)
    logs.configure(settings.log_format, settings.log_level)
    workers = settings.workers
    if not workers:
        workers = usable_cpus()
        log.info("--workers auto: %d worker(s), one per usable CPU", workers)
    try:
        if workers > 1:
            from server.processes.supervisor import supervise

            return asyncio.run(supervise(settings, workers, argv))
        return asyncio.run(serve(settings))
    except StartupError as exc:
        log.error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:  # a signal before the handlers were installed
        return 130


if __name__ == "__main__":
    sys.exit(main())
