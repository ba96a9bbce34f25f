"""Rounds as one figure each: medians over rounds, and ratios paired within a round.

Benchmarks interleave their configurations in rounds so that a shared machine's drift falls on
all of them alike; the median of the rounds is then steadier than any one round, and a ratio of
two measurements taken in the same round (seconds apart) cancels the drift between rounds.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import TypeVar

R = TypeVar("R")
K = TypeVar("K", bound=Hashable)


def median(values: Iterable[float | None], digits: int | None = None) -> float | None:
    """The median of the known values (None where none is known), rounded to `digits`."""
    known = [value for value in values if value is not None]
    if not known:
        return None
    found = statistics.median(known)
    return found if digits is None else round(found, digits)


def medians_by(
    rounds: Iterable[R], key: Callable[[R], K], figures: Sequence[str]
) -> dict[K, dict[str, float]]:
    """Per key (in the order first met), each figure's median over its rounds, and how many
    rounds it had (`rounds`)."""
    groups: dict[K, list[R]] = {}
    for one in rounds:
        groups.setdefault(key(one), []).append(one)
    return {
        name: {
            **{figure: statistics.median(getattr(r, figure) for r in group) for figure in figures},
            "rounds": len(group),
        }
        for name, group in groups.items()
    }


def paired_ratios(
    rounds: Iterable[Sequence[R]], key: Callable[[R], K], reference: K, figures: Sequence[str]
) -> dict[K, dict[str, float]]:
    """Per key, each figure over the reference's in the same round, the median over rounds
    (to 3 decimals)."""
    found: dict[K, dict[str, list[float]]] = {}
    for one_round in rounds:
        base = next(r for r in one_round if key(r) == reference)
        for r in one_round:
            ratios = found.setdefault(key(r), {figure: [] for figure in figures})
            for figure in figures:
                ratios[figure].append(getattr(r, figure) / getattr(base, figure))
    return {
        name: {figure: round(statistics.median(values), 3) for figure, values in ratios.items()}
        for name, ratios in found.items()
    }


def ratios_of(pairs: dict[str, tuple[float | None, float | None]]) -> dict[str, float]:
    """Each named (value, reference) as value / reference to 3 decimals, where both are known
    and not zero."""
    return {name: round(value / ref, 3) for name, (value, ref) in pairs.items() if value and ref}
