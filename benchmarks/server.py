"""Runs `python -m server` as a subprocess for one measurement, on loopback with OS-picked ports.

The measurement starts only once the server has finished loading its models, so loading
does not compete with the load for CPU; a server that dies first fails the run at once.
"""

from __future__ import annotations

import collections
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import BenchError
from server.startlines import STARTED, parse_listening

ROOT = Path(__file__).resolve().parent.parent
SERVER_START_TIMEOUT_S = 180.0
SERVER_STOP_TIMEOUT_S = 30.0
TAIL_LINES = 20
# Lines of the server's output shown when it fails: enough for a traceback's end.
SHOWN_LINES = 10


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    target: str
    tail: collections.deque[str]
    args: tuple[str, ...]
    metrics_url: str

    def cpu_seconds(self) -> float | None:
        """User + system CPU of the server so far, its worker processes included (Linux
        /proc); None elsewhere."""
        try:
            return tree_cpu_seconds(self.process.pid)
        except (OSError, ValueError, IndexError):
            return None

    def check_alive(self) -> None:
        """Raise BenchError, with the server's last output, if the server has exited."""
        code = self.process.poll()
        if code is not None:
            raise BenchError(_failure(_exited(code), self.args, self.tail))


def tree_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of `pid` and its descendants (Linux /proc). A descendant that
    exits meanwhile counts nothing; `pid`'s own must be readable (OSError otherwise)."""
    total = _cpu_seconds(pid)
    for child in _tree(pid)[1:]:
        with contextlib.suppress(OSError):
            total += _cpu_seconds(child)
    return total


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _tree(pid: int) -> list[int]:
    """`pid` and its descendants (a supervisor's workers)."""
    pids = [pid]
    for parent in pids:  # grows as children are found
        children = Path(f"/proc/{parent}/task/{parent}/children")
        try:
            pids.extend(int(child) for child in children.read_text().split())
        except OSError:  # exited meanwhile
            continue
    return pids


def _exited(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with status {code}"


def _failure(why: str, args: Sequence[str], tail: Sequence[str]) -> str:
    shown = [line for line in tail if line.strip()][-SHOWN_LINES:]
    output = "\n".join(f"  {line}" for line in shown) or "  (no output)"
    return f"the server {why} (server args: {' '.join(args) or 'none'}); its last output:\n{output}"


def _dial(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@contextmanager
def start_server(
    repository: Path, extra_args: Sequence[str], cwd: Path | None = None
) -> Iterator[ServerProcess]:
    """Run the server until the block ends, then stop it (SIGTERM, then SIGKILL if it hangs).

    `cwd`: run the server of another checkout (its `server` package); default this one's.

    Yields once the server logged that start-up finished; raises BenchError at once if it
    exits before that, or after SERVER_START_TIMEOUT_S if it never gets there.
    """
    command = [
        sys.executable, "-m", "server",
        "--model-repository", str(repository),
        "--host", "127.0.0.1", "--grpc-port", "0", "--metrics-port", "0", "--http-port", "0",
        *extra_args,
    ]  # fmt: skip
    process = subprocess.Popen(
        command,
        cwd=cwd or ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )
    tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
    started = threading.Event()
    listening: list[tuple[str, int, int]] = []

    def read() -> None:  # drains the pipe for the server's whole life so it never blocks
        assert process.stdout is not None
        for line in process.stdout:
            tail.append(line.rstrip())
            if not listening and (found := parse_listening(line)):
                listening.append(found)
            if listening and not started.is_set() and STARTED in line:
                started.set()

    reader = threading.Thread(target=read, name="server-output", daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not started.wait(0.1):
            code = process.poll()
            if code is not None:
                reader.join(1.0)  # the rest of its output, for the message
                why = f"{_exited(code)} before it was ready"
                raise BenchError(_failure(why, extra_args, tail))
            if time.monotonic() > deadline:
                what = "finish starting" if listening else "announce its ports"
                why = f"did not {what} within {SERVER_START_TIMEOUT_S:g} s"
                raise BenchError(_failure(why, extra_args, tail))
        host, grpc_port, metrics_port = listening[0]
        metrics_url = f"http://{_dial(host, metrics_port)}/metrics"
        yield ServerProcess(process, _dial(host, grpc_port), tail, tuple(extra_args), metrics_url)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(SERVER_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(2.0)
