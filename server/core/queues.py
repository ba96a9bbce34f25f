"""The dynamic batcher's queue: Triton's priority levels and queue policies (schedule_policy).

Requests wait in one FIFO per priority level; level 1 is the highest, and a batch takes from
the highest level that has requests, then the next, in order. A request's level is its
`priority` parameter; 0, or a value past the model's `priority_levels`, means the model's
`default_priority_level` (as Triton does). A model without priority levels has one FIFO.

Each level follows a queue policy (config.pbtxt `dynamic_batching`: `default_queue_policy`,
or the level's entry in `priority_queue_policy`):
- `max_queue_size`: requests the level may hold; past it a request is refused at once
  (QueueFullError). The server's own bound (--max-queue-size per instance) holds across all
  levels, whatever the policy, so the queue is never unbounded.
- `default_timeout_microseconds`: how long a request may wait (0: no limit). With
  `allow_timeout_override` a request's own `timeout` parameter replaces it when shorter (any
  positive value when the default is 0, read as no limit).
- `timeout_action`: what happens to a request whose timeout passes while it waits. REJECT
  fails it (DeadlineExceededError); DELAY moves it behind every request of its level that is
  still in time: it is taken only once that level has none left, still before lower levels.

A model whose config sets no `default_queue_policy` keeps the server's behaviour: the
`timeout` parameter is honoured (allow_timeout_override on) and rejects. Triton's own default
ignores it; the README lists this difference.

Nothing here knows about futures, protobuf or time sources: the batcher passes `now`.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


@dataclass(frozen=True)
class QueuePolicy:
    """One level's policy (Triton's ModelQueuePolicy)."""

    max_queue_size: int = 0  # requests; 0: only the server's own bound
    default_timeout_us: int = 0  # 0: no timeout
    allow_timeout_override: bool = True
    delay: bool = False  # timeout_action DELAY (else REJECT)

    def timeout_us(self, requested_us: int) -> int:
        """The timeout a request waits under: the default, or its own when it may override."""
        default = self.default_timeout_us
        shorter = requested_us > 0 and (default == 0 or requested_us < default)
        return requested_us if self.allow_timeout_override and shorter else default


@dataclass(frozen=True)
class SchedulePolicy:
    """A model's priority levels and their policies."""

    levels: int = 0  # priority_levels; 0: a single level
    default_level: int = 0
    default: QueuePolicy = field(default_factory=QueuePolicy)
    per_level: Mapping[int, QueuePolicy] = field(default_factory=dict)

    def level_of(self, priority: int) -> int:
        """A request's level from its `priority` parameter (0: the default level)."""
        if self.levels == 0:
            return 0
        if priority <= 0 or priority > self.levels:
            return self.default_level
        return priority

    def policy(self, level: int) -> QueuePolicy:
        return self.per_level.get(level, self.default)


class Queued(Protocol):
    """What the queue needs of an item."""

    @property
    def rows(self) -> int: ...

    enqueued: float  # the caller's clock, in seconds
    expires: float | None  # when its policy timeout passes, on the same clock
    level: int
    queued: bool
    key: object  # items ride in one batch only when their keys are equal (tensor shapes)


Item = TypeVar("Item", bound=Queued)


class _Level(Generic[Item]):
    __slots__ = ("delayed", "items", "policy")

    def __init__(self, policy: QueuePolicy) -> None:
        self.policy = policy
        self.items: deque[Item] = deque()
        self.delayed: deque[Item] = deque()  # past their timeout, with timeout_action DELAY

    def __len__(self) -> int:
        return len(self.items) + len(self.delayed)


class PriorityQueue(Generic[Item]):
    """The levels' FIFOs, bounded per level (policy) and in total (`capacity`)."""

    def __init__(self, schedule: SchedulePolicy, capacity: int) -> None:
        self.schedule = schedule
        self.capacity = capacity
        self._levels: dict[int, _Level[Item]] = {}
        levels = range(1, schedule.levels + 1) if schedule.levels else (0,)
        for level in levels:
            self._levels[level] = _Level(schedule.policy(level))
        self._order = sorted(self._levels)  # highest priority (lowest number) first
        self._size = 0
        self._expiring = 0  # items in time with a timeout: expire() has work only when > 0
        self.rows = 0

    def __len__(self) -> int:
        return self._size

    def __bool__(self) -> bool:
        return self._size > 0

    def timeout_s(self, level: int, requested_us: int) -> float | None:
        """Seconds a request of `level` may wait (None: no limit)."""
        micros = self._levels[level].policy.timeout_us(requested_us)
        return micros / 1e6 if micros else None

    def limit(self, level: int) -> int:
        """The most items `level` can ever hold: its policy's bound, and the queue's."""
        bound = self._levels[level].policy.max_queue_size
        return min(bound, self.capacity) if bound else self.capacity

    def free(self, level: int) -> int:
        """How many more items `level` takes now."""
        state = self._levels[level]
        room = self.capacity - self._size
        bound = state.policy.max_queue_size
        return min(room, bound - len(state)) if bound else room

    def push(self, items: Sequence[Item]) -> None:
        """Append items, each to its own level (the caller checked `free` first)."""
        for item in items:
            self._levels[item.level].items.append(item)
            item.queued = True
            self._size += 1
            self.rows += item.rows
            self._expiring += item.expires is not None

    def oldest(self) -> float | None:
        """When the request that has waited longest was queued (None when empty)."""
        heads = [
            queue[0].enqueued
            for level in self._levels.values()
            for queue in (level.items, level.delayed)
            if queue
        ]
        return min(heads, default=None)

    def remove(self, item: Item) -> None:
        """Take out a queued item (its caller went away)."""
        level = self._levels[item.level]
        if item in level.items:
            level.items.remove(item)
            self._expiring -= item.expires is not None
        else:
            level.delayed.remove(item)
        self._forget(item)

    def next_expiry(self) -> float | None:
        """The earliest timeout of the requests still in time (None: none has one)."""
        if not self._expiring:
            return None
        return min(
            (i.expires for level in self._levels.values() for i in level.items if i.expires),
            default=None,
        )

    def expire(self, now: float) -> list[Item]:
        """Apply the policies to every request whose timeout passed: returns those rejected
        (taken out), moves those of DELAY levels behind their level's requests in time."""
        rejected: list[Item] = []
        if not self._expiring:
            return rejected
        for state in self._levels.values():
            kept: deque[Item] = deque()
            for item in state.items:
                if item.expires is None or now < item.expires:
                    kept.append(item)
                else:
                    self._timed_out(state, item, rejected)
            state.items = kept
        return rejected

    def take(self, max_rows: int, now: float) -> tuple[list[Item], list[Item]]:
        """(the next batch, requests rejected because their timeout passed).

        Levels in priority order, each level's requests in time first, then its delayed ones;
        requests are never split, so the first that does not fit ends the batch, and so does
        the first whose key differs (tensors of other shapes cannot be stacked with these).
        """
        batch: list[Item] = []
        rejected: list[Item] = []
        rows = 0
        for level in self._order:
            state = self._levels[level]
            for queue in (state.items, state.delayed):
                while queue:
                    item = queue[0]
                    if queue is state.items and item.expires is not None and now >= item.expires:
                        queue.popleft()
                        self._timed_out(state, item, rejected)
                        continue
                    if batch and (rows + item.rows > max_rows or item.key != batch[0].key):
                        return batch, rejected
                    queue.popleft()
                    if queue is state.items:
                        self._expiring -= item.expires is not None
                    self._forget(item)
                    batch.append(item)
                    rows += item.rows
        return batch, rejected

    def _timed_out(self, state: _Level[Item], item: Item, rejected: list[Item]) -> None:
        """A request whose timeout passed, already out of its level's in-time requests: its
        level's policy delays it (behind those in time) or rejects it."""
        self._expiring -= 1
        if state.policy.delay:
            state.delayed.append(item)
        else:
            self._forget(item)
            rejected.append(item)

    def __iter__(self) -> Iterator[Item]:
        for level in self._order:
            yield from self._levels[level].items
            yield from self._levels[level].delayed

    def _forget(self, item: Item) -> None:
        item.queued = False
        self._size -= 1
        self.rows -= item.rows
