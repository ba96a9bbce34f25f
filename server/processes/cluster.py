"""The whole server as one worker sees it, so that every worker answers for all of them.

With --workers N, whichever worker takes a call about the server as a whole (readiness, model
states, statistics, model load and unload) asks the others over the control channel
(server.processes.control) and combines their answers. A lone server has no peers and answers alone,
through the same code.

- Ready: the server's first start is over (every worker had started and was ready at once,
  seen by this worker or by a peer: `whole`) and every worker whose client ports are bound is
  ready. A restarted worker binds its ports only once its models are loaded, so no connection
  reaches a loading worker while the server says it is ready; a worker that cannot answer in
  time counts as not ready. Each worker answers the control channel before it loads anything
  and says it has started (LocalWorker.started) only once it has, so a caller told "ready"
  (or a script that read the supervisor's "startup complete ... ready", logged once every
  worker reported its start) finds every worker started: model control is not refused.
- Model states: READY where every worker with bound ports serves the version; otherwise the
  states of the first worker that does not.
- Exemplars (tracing on): every answering worker's, for the worker answering a scrape.
- Statistics: the sum of every answering worker's share. A worker that died took its share
  with it (the Prometheus counters keep theirs: server.observability.metrics).
- Load and unload: every worker or none. Under a lock that spans the workers (flock on a file
  in the run folder; the kernel drops it if its holder dies), every worker prepares the load
  beside what it serves; only if all prepared the same versions do all commit, otherwise all
  abort and the caller gets one reason. Refused while a worker is (re)starting: it could miss
  the change. A load's override (its config and files) is written once, by the worker that
  took the call, into a folder in the run folder that every worker loads from; it stays the
  model's while the model serves it, so a restarted worker loads it too
  (server.core.overrides).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from server.core.manager import READY, ModelState
from server.core.overrides import Override
from server.core.statistics import merge
from server.errors import ModelNotFoundError, ModelUnavailableError
from server.observability.exemplars import Exemplar
from server.processes.control import LocalWorker, RemoteWorker, WorkerGone
from wire import control_pb2 as pb
from wire import grpc_service_pb2 as inference_pb

log = logging.getLogger(__name__)

T = TypeVar("T")
Worker = LocalWorker | RemoteWorker


@dataclass(frozen=True)
class View:
    """The workers' statuses at one moment, and what they add up to."""

    statuses: tuple[pb.WorkerStatus, ...]  # the workers that answered, this one first
    count: int  # workers the server runs

    @property
    def ready(self) -> bool:
        accepting = [s for s in self.statuses if s.accepting]
        if not accepting or not all(s.ready for s in accepting):
            return False
        return self.whole

    @property
    def whole(self) -> bool:
        """The first start is over: all workers had started and were ready at once (now, or
        seen before). Started, not just ready: model control asks for every worker started."""
        if any(s.whole for s in self.statuses):
            return True
        ready = {s.index for s in self.statuses if s.started and s.ready}
        return len(ready) == self.count

    def model_ready(self, name: str, version: str = "") -> bool:
        accepting = [s for s in self.statuses if s.accepting]
        return bool(accepting) and all(
            not s.draining and _serves(s, name, version) for s in accepting
        )

    def index(self) -> list[ModelState]:
        """Every model's states, the same whichever worker is asked (see the module doc)."""
        sources = [s for s in self.statuses if s.accepting] or list(self.statuses)
        by_worker = [_states_by_model(s) for s in sources]
        names = sorted({name for states in by_worker for name in states})
        result: list[ModelState] = []
        for name in names:
            chosen = [states.get(name, []) for states in by_worker]
            whole = next((c for c in chosen if not _all_ready(c)), chosen[0])
            result.extend(whole)
        return result

    def served_names(self) -> list[str]:
        """Models with a ready version on some worker: what a restarted worker loads."""
        return sorted({m.name for s in self.statuses for m in s.models if m.state == READY})


def _serves(status: pb.WorkerStatus, name: str, version: str) -> bool:
    return any(
        m.name == name and m.state == READY and (not version or m.version == version)
        for m in status.models
    )


def _states_by_model(status: pb.WorkerStatus) -> dict[str, list[ModelState]]:
    states: dict[str, list[ModelState]] = {}
    for m in status.models:
        states.setdefault(m.name, []).append(ModelState(m.name, m.version, m.state, m.reason))
    return states


def _all_ready(states: list[ModelState]) -> bool:
    return bool(states) and all(s.state == READY for s in states)


class Cluster:
    """This worker and its peers (none for a lone server)."""

    def __init__(
        self,
        local: LocalWorker,
        peers: Sequence[RemoteWorker] = (),
        lock_path: Path | None = None,
    ) -> None:
        self.local = local
        self.peers = tuple(peers)
        self.count = 1 + len(self.peers)
        self._lock_path = lock_path
        # One load or unload of a model at a time in this process (the lock file orders them
        # across processes): its override folder changes after the workers commit.
        self._changing: dict[str, asyncio.Lock] = {}

    # -- what the server is --------------------------------------------------------------

    async def view(self) -> View:
        statuses = [await self.local.status()]
        for peer, answer in zip(
            self.peers, await self._each_peer(lambda w: w.status()), strict=True
        ):
            if isinstance(answer, pb.WorkerStatus):
                statuses.append(answer)
            elif isinstance(answer, WorkerGone) and not answer.absent and peer.accepting:
                # Its ports take connections but it cannot say how it is: not ready, as far
                # as callers can tell. One that was not accepting (starting) is left out.
                log.debug("worker %d counts as not ready: %s", peer.index, answer)
                statuses.append(pb.WorkerStatus(index=peer.index, accepting=True))
        view = View(tuple(statuses), self.count)
        if not self.local.whole and view.whole:
            self.local.whole = True
        return view

    async def statistics(self, name: str, version: str) -> list[inference_pb.ModelStatistics]:
        shares = [await self.local.statistics(name, version)]  # raises for an unknown model
        for answer in await self._each_peer(lambda w: w.statistics(name, version)):
            if isinstance(answer, list):
                shares.append(answer)
            elif not isinstance(answer, WorkerGone | ModelNotFoundError | ModelUnavailableError):
                raise answer
        return merge(shares)

    async def exemplars(self) -> list[Exemplar]:
        """Every answering worker's exemplars, merged per bucket (observability.exemplars)."""
        found = await self.local.exemplars()
        for answer in await self._each_peer(lambda w: w.exemplars()):
            if isinstance(answer, list):
                found.extend(answer)
            elif not isinstance(answer, WorkerGone):
                raise answer
        return found

    # -- changing what it serves ---------------------------------------------------------

    async def load(self, name: str, override: Override | None = None) -> None:
        """Load (or reload) `name` on every worker, or on none; see the module doc.

        `override`: the load's config and files, instead of the repository's. A caller that
        goes away does not stop it half-way: it runs to its end regardless.
        """
        await asyncio.shield(asyncio.ensure_future(self._load(name, override)))

    async def unload(self, name: str) -> None:
        """Stop serving `name` on every worker (each finishes what it accepted first)."""
        await asyncio.shield(asyncio.ensure_future(self._unload(name)))

    async def _load(self, name: str, override: Override | None) -> None:
        async with self._changing.setdefault(name, asyncio.Lock()), self.exclusive():
            await self._check_all_started("loaded")
            folders = self.local.overrides
            staged = None
            if override is not None:
                staged = await asyncio.to_thread(folders.stage, name, override)
            kept = False
            try:
                workers: list[Worker] = [self.local, *self.peers]
                answers = await _each(workers, lambda w: w.prepare(name, staged))
                prepared = [
                    w
                    for w, a in zip(workers, answers, strict=True)
                    if isinstance(a, pb.PrepareResponse)
                ]
                problem = _disagreement(name, workers, answers)
                if problem is not None:
                    await _each(prepared, lambda w: w.abort(name))
                    raise problem
                for worker, answer in zip(
                    workers, await _each(workers, lambda w: w.commit(name)), strict=True
                ):
                    if isinstance(answer, BaseException):  # died since: reloads when restarted
                        log.error(
                            "model %s: worker %d did not commit: %s", name, worker.index, answer
                        )
                first = answers[0]  # every worker prepared the same versions
                if isinstance(first, pb.PrepareResponse) and first.versions:
                    # The new versions serve: a worker that restarts loads them too.
                    await asyncio.to_thread(folders.keep, name, staged)
                    kept = True
            finally:
                if staged is not None and not kept:
                    await asyncio.to_thread(folders.discard, staged)
            await self.announce()
            failure = answers[0].failure if isinstance(answers[0], pb.PrepareResponse) else ""
            if failure:
                raise ModelUnavailableError(f"model {name!r}: {failure}")

    async def _unload(self, name: str) -> None:
        async with self._changing.setdefault(name, asyncio.Lock()), self.exclusive():
            await self._check_all_started("unloaded")
            answers = await _each([self.local, *self.peers], lambda w: w.unload(name))
            if any(a is True for a in answers):  # Triton, too, removes the override on unload
                await asyncio.to_thread(self.local.overrides.drop, name)
            await self.announce()
            for answer in answers:
                if isinstance(answer, BaseException):
                    raise answer
            if not any(answers):
                raise ModelNotFoundError(f"model {name!r} is not loaded")

    async def served_names(self) -> list[str] | None:
        """What the other workers serve (None when none answers): a restarted worker's models."""
        async with self.exclusive():  # not in the middle of a load or unload
            view = await self.view()
        return view.served_names() if len(view.statuses) > 1 else None

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the lock that serializes model control across the workers (none when alone)."""
        if self._lock_path is None:
            yield
            return
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        taking = asyncio.ensure_future(asyncio.to_thread(fcntl.flock, fd, fcntl.LOCK_EX))
        try:
            await asyncio.shield(taking)
        except BaseException:
            # The thread may still take the lock: close (and so release) it once it has.
            taking.add_done_callback(lambda _: os.close(fd))
            raise
        try:
            yield
        finally:
            os.close(fd)  # releases the lock

    async def close(self) -> None:
        for peer in self.peers:
            await peer.close()

    async def _check_all_started(self, what: str) -> None:
        if not self.peers:
            return
        view = await self.view()
        started = {s.index for s in view.statuses if s.started}
        missing = sorted(set(range(self.count)) - started)
        if missing:
            which = ", ".join(str(i) for i in missing)
            raise ModelUnavailableError(
                f"worker(s) {which} are starting or restarting: nothing was {what}; "
                "retry once the server is ready"
            )

    async def announce(self) -> None:
        """Tell every worker that states changed (each recomputes its health statuses)."""
        await _each([self.local, *self.peers], lambda w: w.changed())

    async def _each_peer(self, call: Callable[[Any], Awaitable[T]]) -> list[T | BaseException]:
        return await _each(self.peers, call)


async def _each(
    workers: Sequence[Worker], call: Callable[[Any], Awaitable[T]]
) -> list[T | BaseException]:
    """`call` on every worker at once; each answer or exception, in the workers' order."""
    return await asyncio.gather(*(call(w) for w in workers), return_exceptions=True)


def _disagreement(name: str, workers: Sequence[Worker], answers: Sequence[Any]) -> Exception | None:
    """Why the prepared loads cannot all be committed, or None when they can."""
    failed = [(w, a) for w, a in zip(workers, answers, strict=True) if isinstance(a, BaseException)]
    if failed:
        _, first = failed[0]
        same = len(failed) == len(workers) and all(str(a) == str(first) for _, a in failed)
        if len(workers) == 1 or same:
            return first  # the same reason everywhere (or a lone server): say it as it is
        detail = "; ".join(f"worker {w.index}: {a}" for w, a in failed)
        return ModelUnavailableError(
            f"model {name!r} could not be loaded on every worker ({detail}); "
            "nothing changed: every worker serves what it served before"
        )
    versions = {tuple(a.versions) for a in answers}
    if len(versions) > 1:
        detail = "; ".join(
            f"worker {w.index}: versions {list(a.versions)}" + (f" ({a.failure})" * bool(a.failure))
            for w, a in zip(workers, answers, strict=True)
        )
        return ModelUnavailableError(
            f"model {name!r}: the workers loaded different versions ({detail}); "
            "nothing changed: every worker serves what it served before"
        )
    return None
