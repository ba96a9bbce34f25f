"""`python -m server.worker`: one worker process of `python -m server --workers N`.

Its role (index, ports, run folder, pipes) comes from the supervisor in the environment; the
contract between the two is server.processes.contract.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from collections.abc import Sequence

from server.processes.contract import ROLE_ENV, WorkerRole


def main(argv: Sequence[str] | None = None) -> int:
    from server.app import serve
    from server.config import parse_settings
    from server.errors import StartupError
    from server.observability import logs

    role = WorkerRole.from_env(os.environ)
    if role is None:
        print(
            f"python -m server.worker runs under `python -m server --workers N` only "
            f"({ROLE_ENV} is not set)",
            file=sys.stderr,
        )
        return 2
    settings = parse_settings(argv)
    logs.configure(settings.log_format, settings.log_level, worker=role.index)
    try:
        return asyncio.run(serve(settings, role))
    except StartupError as exc:
        logging.getLogger("server").error("cannot start: %s", exc)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
