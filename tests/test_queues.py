"""Triton's schedule policy: priority levels and queue policies, from config.pbtxt to the queue."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from modelrepo.config import parse_config
from server.core.queues import PriorityQueue, QueuePolicy, SchedulePolicy
from server.core.repository import RepositoryError, schedule_policy


@dataclass(eq=False)
class Item:
    name: str
    level: int
    enqueued: float = 0.0
    expires: float | None = None
    size: int = 1
    queued: bool = False
    key: object = None

    @property
    def rows(self) -> int:
        return self.size


def _queue(schedule: SchedulePolicy, capacity: int = 100) -> PriorityQueue[Item]:
    return PriorityQueue(schedule, capacity)


def _names(items: list[Item]) -> list[str]:
    return [item.name for item in items]


def test_levels_are_taken_highest_first_and_in_order_within_a_level() -> None:
    schedule = SchedulePolicy(levels=3, default_level=2)
    assert [schedule.level_of(p) for p in (0, 1, 2, 3, 4, 99)] == [2, 1, 2, 3, 2, 2]
    queue = _queue(schedule)
    queue.push([Item("low-a", 3), Item("mid-a", 2), Item("low-b", 3)])
    queue.push([Item("high-a", 1), Item("mid-b", 2), Item("high-b", 1)])
    assert len(queue) == 6 and queue.rows == 6
    batch, rejected = queue.take(max_rows=4, now=0.0)
    assert _names(batch) == ["high-a", "high-b", "mid-a", "mid-b"] and not rejected
    batch, _ = queue.take(max_rows=4, now=0.0)
    assert _names(batch) == ["low-a", "low-b"]
    assert not queue and queue.rows == 0 and not any(i.queued for i in batch)


def test_a_request_that_does_not_fit_starts_the_next_batch() -> None:
    queue = _queue(SchedulePolicy(levels=2, default_level=2))
    queue.push([Item("big", 2, size=3), Item("small", 1, size=2)])
    batch, _ = queue.take(max_rows=4, now=0.0)
    assert _names(batch) == ["small"]  # higher priority first; "big" does not fit beside it
    assert _names(queue.take(max_rows=4, now=0.0)[0]) == ["big"]


def test_without_levels_one_fifo() -> None:
    schedule = SchedulePolicy()
    assert schedule.level_of(5) == 0
    queue = _queue(schedule)
    queue.push([Item("a", 0), Item("b", 0)])
    assert _names(queue.take(10, 0.0)[0]) == ["a", "b"]


def test_max_queue_size_bounds_each_level_and_capacity_the_whole() -> None:
    schedule = SchedulePolicy(
        levels=2, default_level=2, per_level={1: QueuePolicy(max_queue_size=2)}
    )
    queue = _queue(schedule, capacity=5)
    assert (queue.limit(1), queue.limit(2)) == (2, 5)
    queue.push([Item("h1", 1), Item("l1", 2), Item("l2", 2)])
    assert (queue.free(1), queue.free(2)) == (1, 2)
    queue.push([Item("h2", 1)])
    assert (queue.free(1), queue.free(2)) == (0, 1)


def test_expired_requests_are_rejected_or_delayed_as_their_level_says() -> None:
    schedule = SchedulePolicy(
        levels=2,
        default_level=2,
        default=QueuePolicy(default_timeout_us=1000, delay=True),
        per_level={1: QueuePolicy(default_timeout_us=1000)},
    )
    queue = _queue(schedule)
    assert queue.timeout_s(1, 0) == pytest.approx(0.001)
    queue.push(
        [
            Item("high-expired", 1, expires=1.0),
            Item("high", 1, expires=9.0),
            Item("low-expired", 2, expires=1.0),
            Item("low", 2, expires=9.0),
        ]
    )
    batch, rejected = queue.take(max_rows=10, now=2.0)
    # REJECT at level 1; DELAY at level 2: after the level's requests in time, still taken.
    assert _names(rejected) == ["high-expired"]
    assert _names(batch) == ["high", "low", "low-expired"]
    assert not queue


def test_delayed_requests_wait_for_their_level_but_not_for_lower_levels() -> None:
    schedule = SchedulePolicy(
        levels=2, default_level=1, default=QueuePolicy(default_timeout_us=1, delay=True)
    )
    queue = _queue(schedule)
    queue.push([Item("late", 1, expires=1.0), Item("on-time", 1, expires=9.0)])
    queue.push([Item("lower", 2, expires=9.0)])
    batch, _ = queue.take(max_rows=1, now=2.0)
    assert _names(batch) == ["on-time"]
    assert _names(queue.take(max_rows=1, now=2.0)[0]) == ["late"]
    assert _names(queue.take(max_rows=1, now=2.0)[0]) == ["lower"]


def test_expire_applies_the_policies_without_forming_a_batch() -> None:
    schedule = SchedulePolicy(
        levels=2, default_level=2, default=QueuePolicy(delay=True), per_level={1: QueuePolicy()}
    )
    queue = _queue(schedule)
    assert queue.next_expiry() is None and queue.expire(5.0) == []
    queue.push([Item("h", 1, expires=2.0), Item("h-late", 1, expires=1.0), Item("h-none", 1)])
    queue.push([Item("l-late", 2, expires=1.5), Item("l", 2, expires=3.0)])
    assert queue.next_expiry() == 1.0
    assert _names(queue.expire(1.8)) == ["h-late"]  # REJECT at level 1; level 2 DELAYs
    assert queue.next_expiry() == 2.0 and len(queue) == 4
    assert _names(queue.take(10, now=1.8)[0]) == ["h", "h-none", "l", "l-late"]
    assert queue.next_expiry() is None and not queue


@pytest.mark.parametrize(
    ("policy", "requested", "expected"),
    [
        (QueuePolicy(), 0, 0),
        (QueuePolicy(), 500, 500),  # no default: any request timeout counts
        (QueuePolicy(default_timeout_us=1000), 500, 500),
        (QueuePolicy(default_timeout_us=1000), 5000, 1000),  # may shorten, never lengthen
        (QueuePolicy(default_timeout_us=1000, allow_timeout_override=False), 500, 1000),
        (QueuePolicy(allow_timeout_override=False), 500, 0),
    ],
)
def test_request_timeouts_override_only_when_allowed_and_shorter(
    policy: QueuePolicy, requested: int, expected: int
) -> None:
    assert policy.timeout_us(requested) == expected


def test_removed_items_leave_the_counts() -> None:
    queue = _queue(SchedulePolicy())
    a, b = Item("a", 0, size=3), Item("b", 0, size=2)
    queue.push([a, b])
    queue.remove(a)
    assert len(queue) == 1 and queue.rows == 2 and not a.queued and b.queued
    assert list(queue) == [b]


def test_config_pbtxt_schedule_policy_is_read_with_tritons_names() -> None:
    config = parse_config(
        """
        dynamic_batching {
          priority_levels: 3
          default_priority_level: 3
          default_queue_policy { max_queue_size: 8 default_timeout_microseconds: 2000
                                 allow_timeout_override: true timeout_action: DELAY }
          priority_queue_policy { key: 1 value { max_queue_size: 2 } }
        }
        """
    )
    schedule = schedule_policy(config.dynamic_batching)
    assert (schedule.levels, schedule.default_level) == (3, 3)
    assert schedule.default == QueuePolicy(8, 2000, True, True)
    assert schedule.policy(1) == QueuePolicy(2, 0, False, False)  # Triton's defaults
    assert schedule.policy(2) is schedule.default
    # No default_queue_policy: the request's `timeout` keeps its meaning (documented).
    assert schedule_policy(parse_config("").dynamic_batching).default == QueuePolicy()


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("priority_levels: 2 default_priority_level: 3", "default_priority_level 3"),
        ("priority_levels: 2", "default_priority_level 0"),
        ("default_priority_level: 1", "needs priority_levels"),
        (
            "priority_levels: 2 default_priority_level: 1 "
            "priority_queue_policy { key: 5 value { } }",
            "priority_queue_policy level 5",
        ),
    ],
)
def test_inconsistent_schedule_policies_are_refused(text: str, problem: str) -> None:
    config = parse_config(f"dynamic_batching {{ {text} }}")
    with pytest.raises(RepositoryError, match=problem):
        schedule_policy(config.dynamic_batching)


def test_a_request_of_other_tensor_shapes_ends_the_batch() -> None:
    """Variable dims: requests whose shapes differ cannot be stacked, so the first of
    another key ends the batch and starts the next one, in arrival order."""
    queue = _queue(SchedulePolicy())
    queue.push([Item("a", 0, key=(8,)), Item("b", 0, key=(8,)), Item("c", 0, key=(16,))])
    queue.push([Item("d", 0, key=(8,))])
    assert _names(queue.take(max_rows=10, now=0.0)[0]) == ["a", "b"]
    assert _names(queue.take(max_rows=10, now=0.0)[0]) == ["c"]
    assert _names(queue.take(max_rows=10, now=0.0)[0]) == ["d"]
