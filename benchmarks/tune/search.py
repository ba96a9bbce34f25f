"""How the tuner chooses: a coordinate search from the current settings, then finals.

1. The start (the model's config as it is, the server's default worker count) is measured:
   it is the reference every score is relative to, and the setting to beat.
2. Coordinate search: one dimension at a time (DIMENSIONS' order), the others held at the
   best setting so far, the next value up is tried, and the one after while each improves
   (by more than min_gain); only when the first step up does not improve, the values below
   are walked the same way. A dimension's values are assumed to rise and then fall, so a
   direction is abandoned at its first step that does not improve. Passes repeat until one
   moves nothing. Measurements stop early at a load point that shows the setting cannot
   win: over the p99 budget (or answering errors) where the best so far is not, or, from
   the second point on, below EARLY_STOP_RATIO of the best so far's throughput over the
   points measured (geometric mean).
3. Finals (successive halving): the start and the best challengers of the search are
   measured again, round after round, interleaved; after each round the worse half of the
   challengers leaves, until one challenger faces the start, for FINAL_PAIR_ROUNDS rounds
   in all. Figures are medians of a setting's rounds (the search's included). A challenger
   replaces the start only if it still beats it by more than min_gain on those medians and
   won most of the finals' rounds against it side by side (each round measures both within
   minutes): on a noisy machine a lucky measurement or two do not rewrite a config.

Score: the geometric mean over load points of images/s relative to the start's, so every load
point counts alike whatever its scale. A setting meets the budget when its p99 at every load
point is within it and it answered no errors; one that does beats one that does not.
Deterministic given the measurements: a resumed run replays the recorded ones and goes on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from benchmarks.common import BenchError
from benchmarks.tune.load import PointResult, median_result
from benchmarks.tune.space import Setting, Space

MEASURED, STOPPED, REJECTED = "measured", "stopped early", "rejected"
# Points this far below the best setting so far (geometric mean) end the measurement.
EARLY_STOP_RATIO = 0.5
MAX_PASSES = 3
# The last challenger and the start are measured in this many rounds of the finals (budget
# permitting; the search's round besides): a median of several rounds, since one round on a
# shared machine can be off by tens of percent.
FINAL_PAIR_ROUNDS = 3


@dataclass
class Trial:
    """One measurement of one setting: round 0 in the search, 1, 2, ... in the finals."""

    setting: Setting
    round: int
    status: str  # MEASURED | STOPPED | REJECTED
    points: dict[str, PointResult] = field(default_factory=dict)  # by LoadPoint.label
    reason: str = ""
    seconds: float = 0.0


@dataclass
class Evaluation:
    """A setting's measurements so far, as one: each figure the median of its rounds."""

    setting: Setting
    status: str
    points: dict[str, PointResult]
    rounds: int
    reason: str = ""

    def feasible(self, p99_budget_ms: float) -> bool:
        return self.status == MEASURED and all(
            r.ok and r.p99_ms is not None and r.p99_ms <= p99_budget_ms
            for r in self.points.values()
        )

    def worst_p99_ms(self) -> float:
        known = [r.p99_ms for r in self.points.values() if r.p99_ms is not None]
        return max(known) if known else math.inf


def evaluate(trials: Sequence[Trial]) -> Evaluation:
    """A setting's trials as one: the complete ones if any (early stops and rejections say
    only that it lost)."""
    complete = [t for t in trials if t.status == MEASURED]
    if not complete:
        last = trials[-1]
        return Evaluation(last.setting, last.status, dict(last.points), 0, last.reason)
    labels = list(complete[0].points)
    points = {label: median_result([t.points[label] for t in complete]) for label in labels}
    return Evaluation(complete[0].setting, MEASURED, points, len(complete))


def score(evaluation: Evaluation, reference: Evaluation) -> float:
    """Geometric mean over load points of images/s relative to the reference's."""
    ratios = []
    for label, ref in reference.points.items():
        mine = evaluation.points.get(label)
        if mine is None or ref.images_per_s <= 0:
            return 0.0
        ratios.append(max(mine.images_per_s, 1e-9) / ref.images_per_s)
    return math.exp(sum(math.log(r) for r in ratios) / len(ratios)) if ratios else 0.0


def early_stop(
    results: dict[str, PointResult], bar: Evaluation | None, p99_budget_ms: float
) -> str | None:
    """Why the measurement of a setting can stop after the load points in `results` (the last
    one just measured), or None to go on.

    Only against a bar that meets the budget: a point with errors, or with p99 over the
    budget, loses to it whatever comes next. Throughput decides only from the second point
    on, on the geometric mean of the points so far, so that one point disturbed by the
    machine's other load does not end a measurement alone.
    """
    if bar is None or not bar.feasible(p99_budget_ms):
        return None
    label, result = list(results.items())[-1]
    if not result.ok:
        return f"errors at {label}: {result.errors or 'no answers'}"
    if result.p99_ms is not None and result.p99_ms > p99_budget_ms:
        return f"p99 {result.p99_ms:.1f} ms over the budget at {label}"
    if len(results) < 2:
        return None
    ratios = [r.images_per_s / bar.points[key].images_per_s for key, r in results.items()]
    mean = math.exp(sum(math.log(max(r, 1e-9)) for r in ratios) / len(ratios))
    if mean < EARLY_STOP_RATIO:
        return f"{mean:.2f}x the best setting's images/s over {', '.join(results)}"
    return None


def finals_measurements(finalists: int) -> int:
    """Measurements the finals take (the start and the challengers, halving round by round,
    the last pair for FINAL_PAIR_ROUNDS rounds): what the budget keeps for them."""
    challengers, rounds, total = finalists - 1, 0, 0
    while challengers > 0:
        rounds += 1
        total += 1 + challengers
        if challengers == 1 and rounds >= FINAL_PAIR_ROUNDS:
            break
        challengers = math.ceil(challengers / 2)
    return total


class Budget:
    """Wall-clock seconds for the whole run; `reserve` of them kept for the finals."""

    def __init__(
        self, seconds: float, reserve: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.seconds = seconds
        self.reserve = reserve
        self._clock = clock
        self._began = clock()

    def elapsed(self) -> float:
        return self._clock() - self._began

    def allows(self, cost: float, final: bool) -> bool:
        limit = self.seconds if final else self.seconds - self.reserve
        return self.elapsed() + cost <= limit


Measure = Callable[[Setting, int, Evaluation | None], Trial]


@dataclass
class Move:
    dimension: str
    before: Setting
    after: Setting
    gain: float  # score ratio, after / before


@dataclass
class Outcome:
    start: Setting
    chosen: Setting
    feasible: bool  # whether the chosen setting met the budget
    trials: list[Trial]
    evaluations: dict[Setting, Evaluation]
    moves: list[Move]
    finalists: list[Setting]
    final_rounds: int
    stopped_by_budget: bool
    # The chosen setting's rounds of the finals won against the start, of those both ran.
    paired_wins: tuple[int, int] | None = None

    def score(self, setting: Setting) -> float:
        return score(self.evaluations[setting], self.evaluations[self.start])


class Search:
    def __init__(
        self,
        space: Space,
        start: Setting,
        p99_budget_ms: float,
        min_gain: float,
        finalists: int,
        measure: Measure,
        estimate: Callable[[Setting], float],
        budget: Budget,
        recorded: Sequence[Trial] = (),
        on_trial: Callable[[Trial], None] = lambda _trial: None,
    ) -> None:
        self.space = space
        self.start = start
        self.p99_budget_ms = p99_budget_ms
        self.min_gain = min_gain
        self.finalists = finalists
        self._measure = measure
        self._estimate = estimate
        self.budget = budget
        self._recorded = {(t.setting, t.round): t for t in recorded}
        self._on_trial = on_trial
        self.trials: list[Trial] = []
        self.moves: list[Move] = []
        self.stopped_by_budget = False

    # --- measurements ---

    def _trials(self, setting: Setting) -> list[Trial]:
        return [t for t in self.trials if t.setting == setting]

    def evaluation(self, setting: Setting) -> Evaluation:
        return evaluate(self._trials(setting))

    def _known(self, setting: Setting, round_: int) -> bool:
        return (setting, round_) in self._recorded or any(
            t.round == round_ for t in self._trials(setting)
        )

    def _run(self, setting: Setting, round_: int, bar: Evaluation | None) -> Trial:
        trial = self._recorded.get((setting, round_))
        if trial is None:
            trial = self._measure(setting, round_, bar)
        self.trials.append(trial)
        self._on_trial(trial)
        return trial

    def _affords(self, settings: Sequence[Setting], round_: int, final: bool) -> bool:
        cost = sum(self._estimate(s) for s in settings if not self._known(s, round_))
        if cost and not self.budget.allows(cost, final):
            self.stopped_by_budget = True
            return False
        return True

    # --- ranking ---

    def rank(self, evaluation: Evaluation, reference: Evaluation) -> tuple[int, float]:
        """Higher is better: meets the budget (by score), then measured over it (by how far
        over), then errors, early stops and rejections."""
        if evaluation.feasible(self.p99_budget_ms):
            return 3, score(evaluation, reference)
        if evaluation.status == MEASURED and all(r.ok for r in evaluation.points.values()):
            return 2, -evaluation.worst_p99_ms()
        return (1 if evaluation.status == MEASURED else 0), 0.0

    def better(self, a: Evaluation, b: Evaluation, reference: Evaluation) -> bool:
        """Whether `a` beats `b` by more than min_gain (or belongs to a better class)."""
        (tier_a, value_a), (tier_b, value_b) = self.rank(a, reference), self.rank(b, reference)
        if tier_a != tier_b:
            return tier_a > tier_b
        if tier_a == 3:
            return value_a > value_b * (1 + self.min_gain)
        if tier_a == 2:  # values are -p99: lower p99 by more than the gain
            return -value_a * (1 + self.min_gain) < -value_b
        return False

    # --- the search ---

    def run(self) -> Outcome:
        first = self._run(self.start, 0, None)
        if first.status == REJECTED:
            raise BenchError(f"cannot tune the model as it is configured now: {first.reason}")
        incumbent = self.start
        for _ in range(MAX_PASSES):
            moved = False
            for dimension in self.space.searched():
                best = self._line(dimension, incumbent)
                if best is None:
                    break
                if best != incumbent:
                    reference = self.evaluation(self.start)
                    gain = score(self.evaluation(best), reference) / max(
                        score(self.evaluation(incumbent), reference), 1e-9
                    )
                    self.moves.append(Move(dimension, incumbent, best, gain))
                    incumbent, moved = best, True
            if self.stopped_by_budget or not moved:
                break
        return self._finals(incumbent)

    def _line(self, dimension: str, incumbent: Setting) -> Setting | None:
        """The best setting along `dimension` through `incumbent`; None when the budget ran
        out (the best so far stands)."""
        values = self.space.values(dimension)
        here = values.index(getattr(incumbent, dimension))
        best = incumbent
        for direction in (1, -1):
            index = here + direction
            while 0 <= index < len(values):
                candidate = replace(incumbent, **{dimension: values[index]})
                index += direction
                if not self.space.allowed(candidate):
                    continue
                if any(t.round == 0 for t in self._trials(candidate)):
                    outcome = self.evaluation(candidate)  # seen on an earlier line or pass
                else:
                    if not self._affords([candidate], 0, final=False):
                        return None if best == incumbent else best
                    self._run(candidate, 0, self.evaluation(best))
                    outcome = self.evaluation(candidate)
                if not self.better(outcome, self.evaluation(best), self.evaluation(self.start)):
                    break
                best = candidate
            if best != incumbent:  # rising this way: the other way falls
                break
        return best

    def _finals(self, incumbent: Setting) -> Outcome:
        reference = self.evaluation(self.start)
        evaluated = {t.setting for t in self.trials}
        ranked = sorted(
            (s for s in evaluated if s != self.start),
            key=lambda s: self.rank(self.evaluation(s), reference),
            reverse=True,
        )
        # Worth measuring again: complete measurements, and where the start meets the budget,
        # only settings that met it too.
        start_feasible = reference.feasible(self.p99_budget_ms)
        challengers = [
            s
            for s in ranked
            if self.evaluation(s).status == MEASURED
            and (self.evaluation(s).feasible(self.p99_budget_ms) or not start_feasible)
        ][: max(self.finalists - 1, 0)]
        if incumbent != self.start and incumbent not in challengers and challengers:
            challengers[-1] = incumbent
        finalists = [self.start, *challengers]
        round_ = 0
        while challengers:
            group = [self.start, *challengers]
            if not self._affords(group, round_ + 1, final=True):
                break
            round_ += 1
            shift = round_ % len(group)  # each round in another order: drift falls on all
            for setting in group[shift:] + group[:shift]:
                self._run(setting, round_, None)
            if len(challengers) == 1 and round_ >= FINAL_PAIR_ROUNDS:
                break
            if len(challengers) == 1:
                continue
            reference = self.evaluation(self.start)
            challengers.sort(key=lambda s: self.rank(self.evaluation(s), reference), reverse=True)
            challengers = challengers[: math.ceil(len(challengers) / 2)]
        return self._decide(challengers or [incumbent], finalists, round_)

    def _decide(self, last: list[Setting], finalists: list[Setting], rounds: int) -> Outcome:
        reference = self.evaluation(self.start)
        best = max([self.start, *last], key=lambda s: self.rank(self.evaluation(s), reference))
        if best != self.start and not self.better(self.evaluation(best), reference, reference):
            best = self.start
        wins = self.paired_wins(best)
        both_within = reference.feasible(self.p99_budget_ms)
        if best != self.start and both_within and wins is not None and 2 * wins[0] <= wins[1]:
            best = self.start  # ahead on the medians, not in most rounds side by side
        evaluations = {t.setting: self.evaluation(t.setting) for t in self.trials}
        return Outcome(
            start=self.start,
            chosen=best,
            feasible=evaluations[best].feasible(self.p99_budget_ms),
            trials=list(self.trials),
            evaluations=evaluations,
            moves=list(self.moves),
            finalists=finalists,
            final_rounds=rounds,
            stopped_by_budget=self.stopped_by_budget,
            paired_wins=self.paired_wins(best),
        )

    def paired_wins(self, setting: Setting) -> tuple[int, int] | None:
        """(rounds of the finals `setting` won against the start, rounds both measured whole):
        a round's two measurements are minutes apart at most, so the machine's drift falls
        on both; None for the start itself or without finals."""
        if setting == self.start:
            return None
        mine = {t.round: t for t in self._trials(setting) if t.round and t.status == MEASURED}
        theirs = {t.round: t for t in self._trials(self.start) if t.status == MEASURED}
        paired = [(evaluate([mine[r]]), evaluate([theirs[r]])) for r in sorted(mine) if r in theirs]
        if not paired:
            return None
        return sum(score(a, b) > 1 for a, b in paired), len(paired)
