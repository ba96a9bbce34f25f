"""`python -m server --workers N` (N > 1): a supervisor and N worker processes on the same ports.

Why processes: grpc.aio does each call's work under one GIL, so one process serves what one
core can, however many the machine has. Each worker is a whole server (server.app: its own
event loop, batchers and runtime sessions), and they share the ports through Linux's
SO_REUSEPORT, as gRPC's own multiprocessing example does: the kernel spreads new connections
over the workers' listening sockets, nothing sits between client and worker, and a worker
that dies leaves the group with its socket. A connection stays on the worker that accepted
it: clients that want several cores open several channels.

The supervisor owns the workers' lifecycle and nothing else: it never answers a call, loads a
model or touches a metric. It
- reserves the ports (gRPC, metrics and, unless --disable-http, HTTP/REST): it binds, and
  never listens on, a SO_REUSEPORT socket per port, so that
  port 0 becomes one port for every worker and the ports stay the server's while a worker
  restarts; a port that another program holds is refused before any worker starts;
- makes a private run folder (mode 0700) for the workers' control sockets, the model-control
  lock and the metric files (PROMETHEUS_MULTIPROC_DIR), and removes it at exit;
- starts each worker in a session of its own, so a terminal's Ctrl-C reaches the supervisor,
  which drains the workers, rather than every process at once; a worker whose supervisor is
  gone stops by itself (server.worker's lifeline);
- restarts a worker that dies, after a backoff that doubles while it keeps dying young,
  logging the cause; the restarted worker counts itself in imgserve_worker_restarts_total;
- stops the server when a worker fails during the first start (a bad setting would only fail
  again), with exit status 1;
- on SIGTERM or SIGINT passes SIGTERM to every worker, each draining within the grace period,
  and waits for them; a second signal is passed on too (workers then exit at once), and
  workers still running STOP_SLACK_S after the grace period are killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.multiprocess import mark_process_dead

from server.config import Settings
from server.errors import StartupError
from server.observability.metrics import MULTIPROCESS_ENV
from server.processes.contract import BOUND, ROLE_ENV, WorkerRole
from server.processes.contract import STARTED as WORKER_STARTED
from server.processes.sockets import bind_tcp
from server.startlines import hostport, http_url, listening_line, started_line

log = logging.getLogger("server.processes.supervisor")

# Restart delays: doubled from BACKOFF_MIN_S while a worker dies within STABLE_S of its start.
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 30.0
STABLE_S = 30.0
# How long past the grace period the supervisor waits for draining workers before killing them.
STOP_SLACK_S = 5.0


def cause_of(returncode: int) -> str:
    """Why a worker died, for the log: the signal's name or the exit status."""
    if returncode < 0:
        try:
            return signal.Signals(-returncode).name
        except ValueError:
            return f"signal {-returncode}"
    return f"exit {returncode}"


def reserve_port(host: str, port: int, what: str) -> socket.socket:
    """A bound, never listening, SO_REUSEPORT socket on (host, port): the workers join its group.

    Raises StartupError when another program already holds the port.
    """
    try:
        if port:  # without SO_REUSEPORT: fails if anyone holds it, even another such group
            bind_tcp(host, port, reuse_port=False).close()
        return bind_tcp(host, port, reuse_port=True)
    except OSError as exc:
        where = hostport(host, port)
        reason = exc.strerror or str(exc)
        raise StartupError(f"cannot listen for {what} on {where}: {reason}") from None


@dataclass(frozen=True)
class _Ports:
    """The ports the supervisor reserved, which every worker serves (http 0: off)."""

    grpc: int
    metrics: int
    http: int


class Supervisor:
    def __init__(self, settings: Settings, count: int, argv: Sequence[str]) -> None:
        self.settings = settings
        self.count = count
        self.argv = list(argv)
        self._stopping = False
        self._failed = False
        self._stop = asyncio.Event()
        self._signals = 0
        self._pids: dict[int, int] = {}  # worker index -> pid of its live process
        self._bound = False
        self._started: dict[int, dict[str, object]] = {}  # first start: index -> its report
        self._whole = False
        self._grpc_at = ""
        self._metrics_at = ""
        self._http_url = ""

    async def run(self) -> int:
        settings = self.settings
        wanted = [("gRPC", settings.grpc_port), ("metrics", settings.metrics_port)]
        if not settings.disable_http:
            wanted.append(("HTTP", settings.http_port))
        sockets: list[socket.socket] = []
        try:
            for what, port in wanted:
                sockets.append(reserve_port(settings.host, port, what))
        except StartupError:
            for sock in sockets:
                sock.close()
            raise
        grpc_port, metrics_port, *http = (sock.getsockname()[1] for sock in sockets)
        ports = _Ports(grpc_port, metrics_port, http[0] if http else 0)
        self._grpc_at = hostport(settings.host, grpc_port)
        self._metrics_at = hostport(settings.host, metrics_port)
        self._http_url = http_url(settings, ports.http) if ports.http else ""
        run_dir = Path(tempfile.mkdtemp(prefix="imgserve-"))  # mode 0700
        (run_dir / "metrics").mkdir()
        try:
            self._on_signals()
            log.info(
                "starting %d workers on grpc %s, http %s and metrics %s",
                self.count, self._grpc_at, self._http_url or "(off)", self._metrics_at,
            )  # fmt: skip
            keepers = [
                asyncio.create_task(self._keep(i, run_dir, ports)) for i in range(self.count)
            ]
            await self._stop.wait()
            statuses = await self._wait_for(keepers)
        finally:
            for sock in sockets:
                sock.close()
            shutil.rmtree(run_dir, ignore_errors=True)
        if self._failed:
            return 1
        return 0 if all(status == 0 for status in statuses) else 1

    async def _wait_for(self, keepers: list[asyncio.Task[int]]) -> list[int]:
        """Each worker's exit status; those still running past the grace period are killed."""
        limit = self.settings.grace_period_s + STOP_SLACK_S
        _done, pending = await asyncio.wait(keepers, timeout=limit)
        if pending:
            log.warning("%d worker(s) still running %gs after the signal: killing them",
                        len(pending), limit)  # fmt: skip
            self._send(signal.SIGKILL)
            await asyncio.wait(pending)
        return [task.result() for task in keepers]

    # -- one worker, kept running --------------------------------------------------------

    async def _keep(self, index: int, run_dir: Path, ports: _Ports) -> int:
        """Run worker `index` until the server stops, restarting it when it dies."""
        cause: str | None = None
        failures = 0
        while True:
            began = time.monotonic()
            returncode = await self._run_once(index, run_dir, ports, cause)
            if self._stopping:
                return returncode
            cause = cause_of(returncode)
            if not self._whole:
                log.error(
                    "worker %d exited during the first start (%s): stopping the server",
                    index, cause,
                )  # fmt: skip
                self._failed = True
                self._begin_stop()
                return returncode
            failures = failures + 1 if time.monotonic() - began < STABLE_S else 1
            delay = min(BACKOFF_MIN_S * 2 ** (failures - 1), BACKOFF_MAX_S)
            log.error("worker %d died (%s): restarting it in %.1fs", index, cause, delay)
            try:
                await asyncio.wait_for(self._stop.wait(), timeout=delay)
            except TimeoutError:
                continue
            return returncode

    async def _run_once(self, index: int, run_dir: Path, ports: _Ports, cause: str | None) -> int:
        notify_r, notify_w = os.pipe()
        lifeline_r, lifeline_w = os.pipe()
        role = WorkerRole(
            index=index,
            count=self.count,
            run_dir=str(run_dir),
            grpc_port=ports.grpc,
            metrics_port=ports.metrics,
            notify_fd=notify_w,
            lifeline_fd=lifeline_r,
            restart_cause=cause,
            http_port=ports.http,
        )
        env = {**os.environ, ROLE_ENV: role.to_env(), MULTIPROCESS_ENV: str(run_dir / "metrics")}
        try:
            process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.worker", *self.argv,
                env=env, stdin=asyncio.subprocess.DEVNULL, pass_fds=(notify_w, lifeline_r),
                start_new_session=True,
            )  # fmt: skip
        finally:
            os.close(notify_w)
            os.close(lifeline_r)
        self._pids[index] = process.pid
        if self._stopping:  # a signal came while it was being started
            process.send_signal(signal.SIGTERM)
        try:
            await self._read_events(index, notify_r)
            returncode = await process.wait()
        finally:
            os.close(lifeline_w)
            self._pids.pop(index, None)
            mark_process_dead(process.pid, str(run_dir / "metrics"))
        return returncode

    async def _read_events(self, index: int, fd: int) -> None:
        """The worker's lifecycle events, until it exits (its end of the pipe closes)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(fd, "rb")
        )
        try:
            async for line in reader:
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                self._on_event(index, event)
        finally:
            transport.close()

    def _on_event(self, index: int, event: dict[str, object]) -> None:
        kind = event.get("event")
        if kind == BOUND and not self._bound:
            self._bound = True
            log.info(
                "%s; %d workers loading models from %s",
                listening_line(self._grpc_at, self._metrics_at, self._http_url), self.count,
                self.settings.model_repository,
            )  # fmt: skip
        elif kind == WORKER_STARTED:
            if self._whole:
                log.info("worker %d is serving again", index)
                return
            self._started[index] = event
            if len(self._started) == self.count:
                self._whole = True
                first = self._started[0]
                ready = all(bool(e.get("ready")) for e in self._started.values())
                log.info(
                    started_line(
                        int(first.get("served", 0)),  # type: ignore[call-overload]
                        ready,
                        self._grpc_at,
                        str(first.get("example", "MODEL")),
                        self._http_url,
                        self.count,
                    )
                )

    # -- stopping ------------------------------------------------------------------------

    def _on_signals(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, self._signalled, signum)

    def _signalled(self, signum: int) -> None:
        self._signals += 1
        name = signal.Signals(signum).name
        if self._signals == 1:
            log.info("%s received: stopping %d workers", name, len(self._pids))
            self._begin_stop()
        else:
            log.warning("%s received again: workers exit now", name)
            self._send(signal.SIGTERM)  # a worker's second signal: it exits at once

    def _begin_stop(self) -> None:
        if not self._stopping:
            self._stopping = True
            self._send(signal.SIGTERM)
            self._stop.set()

    def _send(self, signum: int) -> None:
        for pid in list(self._pids.values()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


async def supervise(settings: Settings, count: int, argv: Sequence[str]) -> int:
    """Run `count` workers until SIGTERM/SIGINT; the exit status. Raises StartupError."""
    return await Supervisor(settings, count, argv).run()
