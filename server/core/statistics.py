"""KServe statistics (the statistics extension): one worker's share, and the sum of shares.

Each worker counts what it served (server.core.modelstats says what each figure measures); with
several workers the one asked sums every worker's share (server.processes.cluster), batch_stats by
batch size, so ModelStatistics answers for the whole server.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

from google.protobuf.message import Message

from server.core.modelstats import Duration
from wire import grpc_service_pb2 as pb

if TYPE_CHECKING:
    from server.core.manager import ModelManager
    from server.core.served import ServedModel

# Fields that are not counts: combined by max (last_inference) or kept (the names).
_LATEST = "last_inference"
_KEYS = ("name", "version", "batch_size")


def local_statistics(manager: ModelManager, name: str, version: str) -> list[pb.ModelStatistics]:
    """This worker's statistics of the served versions asked for ("" = all).

    Raises the reason a named model is missing (ModelNotFoundError, ModelUnavailableError).
    """
    chosen = [
        m
        for m in manager.served()
        if (not name or m.name == name) and (not version or str(m.version) == version)
    ]
    if name and not chosen:
        manager.get(name, version)  # raises the reason it is missing
    return [_statistics(m) for m in chosen]


def _statistics(served: ServedModel) -> pb.ModelStatistics:
    s = served.stats
    return pb.ModelStatistics(
        name=served.name,
        version=str(served.version),
        last_inference=s.last_inference_ms,
        inference_count=s.inference_count,
        execution_count=s.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(s.success),
            fail=_duration(s.fail),
            queue=_duration(s.queue),
            compute_input=_duration(s.compute_input),
            compute_infer=_duration(s.compute_infer),
            compute_output=_duration(s.compute_output),
            cache_hit=pb.StatisticDuration(),
            cache_miss=pb.StatisticDuration(),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(batch.compute_input),
                compute_infer=_duration(batch.compute_infer),
                compute_output=_duration(batch.compute_output),
            )
            for size, batch in sorted(s.batches.items())
        ],
    )


def _duration(duration: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=duration.count, ns=duration.ns)


def merge(shares: Iterable[Sequence[pb.ModelStatistics]]) -> list[pb.ModelStatistics]:
    """The sum of several workers' shares, one entry per (model, version), in that order."""
    totals: dict[tuple[str, str], pb.ModelStatistics] = {}
    for share in shares:
        for stats in share:
            key = (stats.name, stats.version)
            total = totals.get(key)
            if total is None:
                totals[key] = total = pb.ModelStatistics()
                total.CopyFrom(stats)
            else:
                _add(total, stats)
    for total in totals.values():
        total.batch_stats.sort(key=lambda entry: entry.batch_size)
    return [totals[key] for key in sorted(totals, key=_order)]


def _order(key: tuple[str, str]) -> tuple[str, int, str]:
    name, version = key
    return name, int(version) if version.isdigit() else -1, version


def _add(total: Message, share: Message) -> None:
    """Adds `share`'s counts into `total`, field by field (batch_stats matched by size)."""
    for field, value in share.ListFields():
        name = field.name
        if name in _KEYS:
            continue
        if name == _LATEST:
            setattr(total, name, max(getattr(total, name), value))
        elif name == "batch_stats":
            by_size = {entry.batch_size: entry for entry in total.batch_stats}
            for entry in value:
                mine = by_size.get(entry.batch_size)
                if mine is None:
                    total.batch_stats.add().CopyFrom(entry)
                else:
                    _add(mine, entry)
        elif field.message_type is not None and not field.is_repeated:
            _add(getattr(total, name), value)
        elif field.type in (field.TYPE_UINT64, field.TYPE_INT64):
            setattr(total, name, getattr(total, name) + value)
