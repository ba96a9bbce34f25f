"""What the tuner searches: one serving setting, and the values each of its dimensions may take.

A setting has one server-level dimension (worker processes: a flag of the server, the same
for every model) and four per-model ones that config.pbtxt holds (max_batch_size, the queue
delay, the instance count and the onnxruntime intra-op threads of each instance).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields, replace

# The order the coordinate search visits them in: workers and instances first, since on a
# CPU they decide how many cores serve at all; then how the batches form.
DIMENSIONS = ("workers", "instances", "threads", "max_batch_size", "max_queue_delay_us")
# Defaults of the per-model dimensions (the model's current values are always added).
DEFAULT_BATCH_SIZES = (8, 16, 32, 64, 128)
DEFAULT_QUEUE_DELAYS_US = (0, 100, 500, 2000)
# Settings whose compute threads (workers x instances x threads) exceed this many per usable
# CPU are not tried: they only queue for the same cores.
MAX_THREADS_PER_CPU = 2


@dataclass(frozen=True)
class Setting:
    workers: int
    instances: int
    threads: int  # intra-op threads per instance (0: the runtime's default)
    max_batch_size: int
    max_queue_delay_us: int

    @property
    def key(self) -> str:
        """A short name, as tables and the journal write it: w2 i1 t1 b64 d0."""
        return (
            f"w{self.workers} i{self.instances} t{self.threads} b{self.max_batch_size} "
            f"d{self.max_queue_delay_us}"
        )

    @classmethod
    def from_key(cls, key: str) -> Setting:
        values = dict(zip("witbd", (int(part[1:]) for part in key.split()), strict=True))
        return cls(values["w"], values["i"], values["t"], values["b"], values["d"])

    def describe(self) -> str:
        threads = "the runtime's default" if self.threads == 0 else str(self.threads)
        return (
            f"{self.workers} worker(s), {self.instances} instance(s) of {threads} intra-op "
            f"thread(s), max_batch_size {self.max_batch_size}, max_queue_delay "
            f"{self.max_queue_delay_us} us"
        )

    def compute_threads(self) -> int:
        return self.workers * self.instances * max(self.threads, 1)

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(frozen=True)
class Space:
    """The values of each dimension, ascending; a dimension with one value is not searched."""

    workers: tuple[int, ...]
    instances: tuple[int, ...]
    threads: tuple[int, ...]
    max_batch_size: tuple[int, ...]
    max_queue_delay_us: tuple[int, ...]
    cpus: int

    def values(self, dimension: str) -> tuple[int, ...]:
        return getattr(self, dimension)

    def searched(self) -> list[str]:
        return [d for d in DIMENSIONS if len(self.values(d)) > 1]

    def allowed(self, setting: Setting) -> bool:
        """Inside the space and not oversubscribing the CPUs (see MAX_THREADS_PER_CPU)."""
        inside = all(getattr(setting, d) in self.values(d) for d in DIMENSIONS)
        return inside and setting.compute_threads() <= MAX_THREADS_PER_CPU * self.cpus

    def with_start(self, start: Setting) -> Space:
        """The space with the start's per-model values added (the model's current config), so
        the search can stay where it began."""
        return replace(
            self,
            **{
                d: tuple(sorted({*self.values(d), getattr(start, d)}))
                for d in DIMENSIONS
                if d != "workers"
            },
        )

    def size(self) -> int:
        count = 1
        for dimension in DIMENSIONS:
            count *= len(self.values(dimension))
        return count

    def as_dict(self) -> dict[str, list[int]]:
        return {f.name: list(getattr(self, f.name)) for f in fields(self) if f.name != "cpus"}


def powers_of_two(limit: int, cap: int | None = None) -> tuple[int, ...]:
    """1, 2, 4, ... up to `limit` (and `limit` itself), at most `cap`."""
    top = limit if cap is None else min(limit, cap)
    values = {1, max(top, 1)}
    value = 2
    while value < top:
        values.add(value)
        value *= 2
    return tuple(sorted(values))


def default_space(cpus: int, threads_searched: bool) -> Space:
    """Workers up to the usable CPUs; instances and threads up to 4 (and the CPUs); the batch
    sizes and delays above. Without threads_searched (TorchScript: torch's threads belong
    to the process) the threads dimension is the start's alone."""
    return Space(
        workers=powers_of_two(cpus),
        instances=powers_of_two(max(cpus, 2), cap=4),
        threads=powers_of_two(cpus, cap=4) if threads_searched else (),
        max_batch_size=DEFAULT_BATCH_SIZES,
        max_queue_delay_us=DEFAULT_QUEUE_DELAYS_US,
        cpus=cpus,
    )


def start_workers(space: Space) -> int:
    """Where the workers dimension starts: the server's default (--workers auto: the usable
    CPUs) when it is a value to try, else the largest value to try."""
    return space.cpus if space.cpus in space.workers else space.workers[-1]


def overridden(space: Space, chosen: dict[str, Sequence[int] | None]) -> Space:
    """The space with the dimensions the operator named replaced by their values."""
    return replace(space, **{d: tuple(sorted(set(v))) for d, v in chosen.items() if v})
