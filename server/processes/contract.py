"""The contract between the supervisor (server.processes.supervisor) and its workers.

The supervisor starts each worker (`python -m server.worker`) with the user's own command line
plus its role in IMGSERVE_WORKER: its index, the ports the supervisor reserved, the run folder
(control sockets, metric files), and two pipes. The worker reports its lifecycle on the notify
pipe (one JSON line per event: its ports are bound, its start-up is complete); the lifeline
pipe is held open by the supervisor, so end-of-file on it means the supervisor is gone and the
worker stops as on SIGTERM instead of serving on unsupervised.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROLE_ENV = "IMGSERVE_WORKER"
BOUND = "bound"
STARTED = "started"

log = logging.getLogger("server")


@dataclass(frozen=True)
class WorkerRole:
    index: int
    count: int
    run_dir: str
    grpc_port: int
    metrics_port: int
    notify_fd: int
    lifeline_fd: int
    # Why the previous worker of this index died; None in the first start.
    restart_cause: str | None = None
    http_port: int = 0  # 0: HTTP/REST is off

    @property
    def restarted(self) -> bool:
        return self.restart_cause is not None

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def to_env(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerRole | None:
        text = env.get(ROLE_ENV)
        return None if not text else cls(**json.loads(text))

    def notify(self, event: str, **fields: Any) -> None:
        """Tell the supervisor about a lifecycle event (one line: atomic on a pipe)."""
        line = json.dumps({"event": event, **fields}) + "\n"
        try:
            os.write(self.notify_fd, line.encode())
        except OSError:  # the supervisor is gone: the lifeline says so too
            log.debug("cannot notify the supervisor of %s", event)

    def watch_lifeline(self, on_gone: Any) -> None:
        """Call `on_gone()` on the running loop once the supervisor's end of the lifeline closes."""
        loop = asyncio.get_running_loop()

        def readable() -> None:
            try:
                data = os.read(self.lifeline_fd, 64)
            except BlockingIOError:
                return
            if not data:
                loop.remove_reader(self.lifeline_fd)
                on_gone()

        os.set_blocking(self.lifeline_fd, False)
        loop.add_reader(self.lifeline_fd, readable)
