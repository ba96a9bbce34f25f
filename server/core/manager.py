"""Loads model versions from the repository and serves them through batchers.

A version serves only after server.core.loading has created, warmed up and checked its runtimes;
a version (or model) that fails any step is recorded as UNAVAILABLE with the reason, and
other models keep serving. Blocking work (reading files, creating sessions, warm-up) runs
in threads so the event loop keeps answering health checks and requests while models load.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from server.config import Settings
from server.core.loading import (
    SYNTHETIC_WARNING,
    LoadCancelled,
    hide_paths,
    is_synthetic,
    prepare_version,
)
from server.core.overrides import OverrideFolders
from server.core.repository import ModelSpec, RepositoryError, model_names, read_model
from server.core.served import ServedModel
from server.errors import ModelNotFoundError, ModelUnavailableError
from server.observability.metrics import Metrics

log = logging.getLogger(__name__)

READY = "READY"
UNAVAILABLE = "UNAVAILABLE"
LOADING = "LOADING"


@dataclass(eq=False)
class PreparedLoad:
    """Versions of one model loaded by ModelManager.prepare, not yet serving."""

    name: str
    ready: dict[int, ServedModel]
    failures: dict[int, str]  # version -> why it cannot serve
    states_before: dict[str, ModelState] | None  # shown again if the load is aborted
    lock: asyncio.Lock  # the model's lock, held until commit or abort
    released: bool = False

    @property
    def versions(self) -> list[int]:
        return sorted(self.ready)

    def release(self) -> None:
        if not self.released:
            self.released = True
            self.lock.release()


@dataclass(frozen=True)
class ModelState:
    name: str
    version: str  # "" when no version is loaded
    state: str  # "READY" | "UNAVAILABLE" | "LOADING"
    reason: str  # why not ready ("" when READY)


class ModelManager:
    def __init__(
        self, settings: Settings, metrics: Metrics, overrides: OverrideFolders | None = None
    ) -> None:
        self._settings = settings
        self._metrics = metrics
        # Loads with a config or files of their own (server.core.overrides).
        self.overrides = OverrideFolders() if overrides is None else overrides
        self._served: dict[str, dict[int, ServedModel]] = {}
        self._latest: dict[str, ServedModel] = {}  # highest ready version: the hot path of get()
        self._states: dict[str, dict[str, ModelState]] = {}  # name -> version ("" model-wide)
        self._locks: dict[str, asyncio.Lock] = {}
        self._required: set[str] = set()
        self._started = False
        self._closing = False
        # Set by close(): load threads check it between steps and give up (see server.core.loading).
        self._cancel = threading.Event()

    # -- loading ---------------------------------------------------------------------------

    async def start(
        self,
        on_change: Callable[[], Awaitable[None]] | None = None,
        names: Iterable[str] | None = None,
    ) -> None:
        """Load `names` (default: settings.models, or every model folder); failures are
        recorded, not raised.

        `on_change` (say, refreshing health statuses) is awaited once every model to load is
        known, and again after each model's load, so callers see each model as it turns ready.
        """
        repository = self._settings.model_repository
        if names is not None:
            names = list(names)
        else:
            names = list(self._settings.models) or await asyncio.to_thread(model_names, repository)
        if not names:
            log.warning("no model folders in the repository %s", repository)
        self._required = set(names)
        for name in names:  # known (not ready) from now on, not unknown until its turn comes
            self._states.setdefault(name, {"": ModelState(name, "", LOADING, "")})
        await _notify(on_change)
        for name in names:
            if self._closing:
                break
            try:  # a restarted worker loads the overrides the others serve
                await self.load(name, self.overrides.current(name))
            except ModelNotFoundError as exc:
                log.error("model %s not loaded: %s", name, exc)
                self._states[name] = {"": ModelState(name, "", UNAVAILABLE, str(exc))}
            except ModelUnavailableError:
                pass  # logged and recorded by load()
            except Exception as exc:  # a fault with one model must not stop the server
                log.exception("model %s not loaded", name)
                if name not in self._served:
                    reason = self._hidden(f"cannot load: {type(exc).__name__}: {exc}")
                    self._set_states(name, {"": ModelState(name, "", UNAVAILABLE, reason)}, {})
            await _notify(on_change)
        self._started = True

    async def load(self, name: str, override: Path | None = None) -> None:
        """(Re)load a model; the versions it serves are replaced only once new ones are ready."""
        detail = await self.commit(await self.prepare(name, override))
        if detail:
            raise ModelUnavailableError(f"model {name!r}: {detail}")

    async def prepare(self, name: str, override: Path | None = None) -> PreparedLoad:
        """Load the versions of `name` beside those serving now; `commit` or `abort` follows.

        `override`: a folder of server.core.overrides.OverrideFolders to load from instead of
        the repository's (None: the repository).

        The model's lock is held from here until then, so loads of one model never interleave.
        With several workers, every worker prepares before any commits (server.processes.cluster).
        Raises ModelUnavailableError when the model's folder or config cannot be read.
        """
        lock = self._lock(name)
        await lock.acquire()
        try:
            if self._closing:
                raise ModelUnavailableError("the server is shutting down")
            return await self._prepare(name, lock, override)
        except BaseException:
            lock.release()
            raise

    async def _prepare(self, name: str, lock: asyncio.Lock, override: Path | None) -> PreparedLoad:
        settings = self._settings
        try:
            spec = await asyncio.to_thread(
                read_model, settings.model_repository, name, settings, override
            )
        except (RepositoryError, OSError) as exc:
            log.error("model %s not loaded: %s", name, exc)
            reason = self._hidden(str(exc), override)
            if name not in self._served:
                self._states[name] = {"": ModelState(name, "", UNAVAILABLE, reason)}
            raise ModelUnavailableError(f"model {name!r}: {reason}") from None
        if is_synthetic(spec):
            log.warning("model %s was %s", name, SYNTHETIC_WARNING)
        old = self._served.get(name, {})
        before = self._states.get(name)
        loading = {str(v): ModelState(name, str(v), LOADING, "") for v in spec.versions}
        self._states[name] = loading | {str(v): _ready(name, v) for v in old}

        ready: dict[int, ServedModel] = {}
        try:
            failures = await self._load_versions(spec, ready)
        except asyncio.CancelledError:  # nobody will serve what is ready: free it
            await _close_all(ready.values())
            raise
        if self._closing:  # close() ran while this load was in a thread: serve nothing new
            await _close_all(ready.values())
            self._states[name] = {
                v: ModelState(name, v, UNAVAILABLE, "server stopped") if s.state == LOADING else s
                for v, s in self._states.get(name, {}).items()
            }
            raise ModelUnavailableError("the server is shutting down")
        for version, reason in sorted(failures.items()):
            log.error("model %s version %d not served: %s", name, version, reason)
        return PreparedLoad(name, ready, failures, before, lock)

    async def commit(self, prepared: PreparedLoad) -> str:
        """Serve what `prepared` loaded; returns why versions failed ("" when none did).

        When no version loaded, what served before keeps serving.
        """
        name, ready, failures = prepared.name, prepared.ready, prepared.failures
        try:
            old = self._served.get(name, {})
            states = {str(v): ModelState(name, str(v), UNAVAILABLE, r) for v, r in failures.items()}
            if ready:
                self._served[name] = ready
                self._latest[name] = ready[max(ready)]
                self._required.add(name)
                states |= {str(v): _ready(name, v) for v in ready}
                replaced = list(old.values())
            else:  # nothing new is ready: what served before keeps serving
                states |= {str(v): _ready(name, v) for v in old}
                replaced = []
            self._set_states(name, states, previous=old)
            # Requests already accepted by the replaced copies finish before their runtimes close.
            await _close_all(replaced)
        finally:
            prepared.release()
        return "; ".join(f"version {v}: {r}" for v, r in sorted(failures.items()))

    async def abort(self, prepared: PreparedLoad) -> None:
        """Drop what `prepared` loaded: the model serves, and shows, what it did before."""
        try:
            if prepared.states_before is None:
                self._states.pop(prepared.name, None)
            else:
                self._states[prepared.name] = prepared.states_before
            await _close_all(prepared.ready.values())
        finally:
            prepared.release()

    async def _load_versions(
        self, spec: ModelSpec, ready: dict[int, ServedModel]
    ) -> dict[int, str]:
        """Load each version of `spec` into `ready`; returns {version: why it cannot serve}."""
        name, settings = spec.name, self._settings
        failures = {v: f"version folder {v} not found" for v in spec.missing_versions}
        for version in spec.versions:
            if self._closing:
                break
            began = time.monotonic()
            try:
                loaded = await asyncio.to_thread(
                    prepare_version, spec, version, settings, self._cancel
                )
            except LoadCancelled:
                log.info("model %s version %d: load abandoned (shutting down)", name, version)
                break
            except Exception as exc:  # any failure to load is this version's, not the server's
                raw = str(exc) or type(exc).__name__
                log.debug("model %s version %d failed to load: %s", name, version, raw)
                failures[version] = self._hidden(raw, spec.directory)
            else:
                served = ServedModel(spec, version, loaded, settings, self._metrics)
                served.start()
                ready[version] = served
                log.info(
                    "model %s version %d ready on %s (%d instance(s), max batch %d, "
                    "batches of up to %d run inline; %s)",
                    name, version, served.device, len(served.runtimes), spec.max_batch_size,
                    served.inline_rows, served.describe_wait(),
                )  # fmt: skip
            self._metrics.load_duration.labels(name, str(version)).set(time.monotonic() - began)
        return failures

    def _hidden(self, reason: str, folder: Path | None = None) -> str:
        """A reason fit for clients: no paths of the server's file system. `folder`: the model's
        folder, when it is not in the repository (an override's), named as "NAME/..." too."""
        reason = hide_paths(reason, self._settings.model_repository)
        return reason if folder is None else hide_paths(reason, folder.parent)

    async def unload(self, name: str) -> None:
        """Stop serving every version of `name` once their accepted requests finish."""
        async with self._lock(name):
            served = self._served.pop(name, None)
            self._latest.pop(name, None)
            if not served:
                raise ModelNotFoundError(f"model {name!r} is not loaded")
            self._required.discard(name)
            states = {str(v): ModelState(name, str(v), UNAVAILABLE, "unloaded") for v in served}
            self._set_states(name, states, previous=served)
            await asyncio.gather(*(model.close() for model in served.values()))
            log.info("model %s unloaded", name)

    async def close(self) -> None:
        """Stop loading; let every batcher finish its accepted work, then close the runtimes."""
        self._closing = True
        self._cancel.set()
        served = [m for versions in self._served.values() for m in versions.values()]
        for name, versions in list(self._served.items()):
            states = {
                str(v): ModelState(name, str(v), UNAVAILABLE, "server stopped") for v in versions
            }
            self._set_states(name, states, previous=versions)
        self._served.clear()
        self._latest.clear()
        await _close_all(served)
        self.overrides.close()

    def _set_states(
        self, name: str, states: dict[str, ModelState], previous: dict[int, ServedModel]
    ) -> None:
        self._states[name] = states
        for version in {*states, *(str(v) for v in previous)} - {""}:
            ready = version in states and states[version].state == READY
            self._metrics.model_ready.labels(name, version).set(1 if ready else 0)
            model = self._served.get(name, {}).get(int(version)) if ready else None
            if model is not None:
                self._metrics.describe_version(name, version, model.platform, model.precision)
                self._metrics.serving(name, version)
            else:
                self._metrics.describe_version(name, version)

    def _lock(self, name: str) -> asyncio.Lock:
        return self._locks.setdefault(name, asyncio.Lock())

    # -- lookups ---------------------------------------------------------------------------

    def get(self, name: str, version: str = "") -> ServedModel:
        """version "" = highest ready version."""
        versions = self._served.get(name)
        if versions:
            if not version:
                return self._latest[name]
            number = int(version) if version.isdigit() else -1
            model = versions.get(number)
            if model is not None:
                return model
            state = self._states.get(name, {}).get(str(number))
            if state is not None and state.state != READY:
                raise ModelUnavailableError(
                    f"model {name!r} version {version} is {state.state.lower()}: {state.reason}"
                )
            loaded = ", ".join(str(v) for v in sorted(versions))
            raise ModelNotFoundError(  # Triton's words, then the versions loaded
                f"Request for unknown model: '{name}' version {version} is not found "
                f"(loaded: {loaded})"
            )
        states = self._states.get(name)
        if states:
            reasons = sorted({s.reason for s in states.values() if s.reason})
            detail = "; ".join(reasons) or "loading"
            raise ModelUnavailableError(f"model {name!r} is not ready: {detail}")
        raise ModelNotFoundError(f"Request for unknown model: '{name}' is not found")

    def served(self) -> list[ServedModel]:
        """Every ready version, sorted by (name, version)."""
        return [
            self._served[name][version]
            for name in sorted(self._served)
            for version in sorted(self._served[name])
        ]

    def index(self) -> list[ModelState]:
        """Every model folder in the repository, plus any model known to the manager."""
        names = {*model_names(self._settings.model_repository), *self._states, *self._served}
        result: list[ModelState] = []
        for name in sorted(names):
            states = self._states.get(name)
            if not states:
                result.append(ModelState(name, "", UNAVAILABLE, "not loaded"))
                continue
            result.extend(sorted(states.values(), key=lambda s: (len(s.version), s.version)))
        return result

    @property
    def all_ready(self) -> bool:
        """start() finished and every model asked for (at start, or loaded since) serves.

        An explicit unload removes a model from what is asked for.
        """
        return self._started and all(name in self._served for name in self._required)


def _ready(name: str, version: int) -> ModelState:
    return ModelState(name, str(version), READY, "")


async def _close_all(models: Iterable[ServedModel]) -> None:
    await asyncio.gather(*(model.close() for model in models))


async def _notify(on_change: Callable[[], Awaitable[None]] | None) -> None:
    if on_change is None:
        return
    try:
        await on_change()
    except Exception:  # a listener's fault is not a reason to stop loading models
        log.exception("model state listener failed")
