"""What the tuner shows: the table of every setting tried, the paragraph that explains the
choice, and results.json (also the journal a resumed run replays); its plot is drawn by
benchmarks.plots."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from benchmarks.figures import machine
from benchmarks.tune.load import LoadPoint, PointResult
from benchmarks.tune.search import MEASURED, Evaluation, Outcome, Trial, score
from benchmarks.tune.servers import write_atomically
from benchmarks.tune.space import Setting
from client.table import format_table

RESULTS_FILE = "results.json"


# --- the journal -----------------------------------------------------------------------------


def trial_to_json(trial: Trial) -> dict[str, object]:
    return {
        "setting": trial.setting.key,
        "round": trial.round,
        "status": trial.status,
        "reason": trial.reason,
        "seconds": round(trial.seconds, 2),
        "points": {label: asdict(result) for label, result in trial.points.items()},
    }


def trial_from_json(data: dict[str, object]) -> Trial:
    points = data["points"]
    assert isinstance(points, dict)
    return Trial(
        setting=Setting.from_key(str(data["setting"])),
        round=int(data["round"]),  # type: ignore[call-overload]
        status=str(data["status"]),
        points={label: PointResult(**result) for label, result in points.items()},
        reason=str(data.get("reason", "")),
        seconds=float(data.get("seconds", 0.0)),  # type: ignore[arg-type]
    )


def save(path: Path, context: dict[str, object], trials: Sequence[Trial], **extra: object) -> None:
    """results.json, replaced whole after every measurement (so an interrupted run leaves a
    complete file for --resume)."""
    body = {
        "machine": machine(),
        "context": context,
        "trials": [trial_to_json(t) for t in trials],
        **extra,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(body, indent=2) + "\n")


def recorded_trials(path: Path, context: dict[str, object]) -> list[Trial]:
    """The trials of an earlier run with the same context; ValueError saying what differs."""
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"nothing to resume: {path} does not exist") from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {path}: {error}") from None
    earlier = body.get("context", {})
    for key, value in context.items():
        if earlier.get(key) != value:
            raise ValueError(
                f"{path} was measured with another {key} ({earlier.get(key)!r}, now {value!r}): "
                "run without --resume, or with the same options"
            )
    return [trial_from_json(t) for t in body.get("trials", [])]


# --- the table -------------------------------------------------------------------------------


def _cell(result: PointResult | None) -> tuple[str, str]:
    if result is None:
        return "-", "-"
    p99 = "-" if result.p99_ms is None else f"{result.p99_ms:.1f}"
    return f"{result.images_per_s:,.0f}", p99


def ordered(outcome: Outcome) -> list[Evaluation]:
    """Chosen first, then the others by score (complete measurements before the rest)."""
    reference = outcome.evaluations[outcome.start]

    def key(evaluation: Evaluation) -> tuple[bool, bool, float]:
        return (
            evaluation.setting == outcome.chosen,
            evaluation.status == MEASURED,
            score(evaluation, reference) if evaluation.status == MEASURED else 0.0,
        )

    return sorted(outcome.evaluations.values(), key=key, reverse=True)


def format_results(outcome: Outcome, points: Sequence[LoadPoint], p99_budget_ms: float) -> str:
    headers = ["SETTING", "ROUNDS"]
    for point in points:
        headers += [f"{point.label} IMG/S", "P99 MS"]
    headers += ["X START", "NOTE"]
    reference = outcome.evaluations[outcome.start]
    rows = []
    for evaluation in ordered(outcome):
        setting = evaluation.setting
        cells: list[object] = [setting.key, evaluation.rounds or "-"]
        for point in points:
            cells += _cell(evaluation.points.get(point.label))
        measured = evaluation.status == MEASURED
        cells.append(f"{score(evaluation, reference):.2f}x" if measured else "-")
        notes = []
        if setting == outcome.chosen:
            notes.append("CHOSEN")
        if setting == outcome.start:
            notes.append("start (config as it was)")
        if measured and not evaluation.feasible(p99_budget_ms):
            notes.append("over the p99 budget" if _answered(evaluation) else "errors")
        if not measured:
            notes.append(f"{evaluation.status}: {evaluation.reason}")
        cells.append("; ".join(notes))
        rows.append(cells)
    legend = (
        "SETTING: w workers, i instances, t intra-op threads each, b max_batch_size, d "
        "max_queue_delay us; figures are medians of ROUNDS; X START: images/s relative to "
        "the start (geometric mean over load points)"
    )
    return legend + "\n" + format_table(headers, rows, right=range(1, len(headers) - 1))


def _answered(evaluation: Evaluation) -> bool:
    return all(r.ok for r in evaluation.points.values())


# --- the paragraph ---------------------------------------------------------------------------


def workers_advice(workers: int, cpus: int) -> str:
    """How to serve with `workers`: a server flag (or its variable), not a config field."""
    if workers == cpus:
        return (
            f"serve with --workers auto (the default; {cpus} here) or --workers {workers} "
            f"(SERVER_WORKERS={workers})"
        )
    return f"serve with --workers {workers} (or SERVER_WORKERS={workers})"


def noise(outcome: Outcome) -> tuple[str, float] | None:
    """The largest ratio between two rounds of the start at one load point (highest images/s
    over lowest): what the machine's own variation was during the run."""
    rounds = [t for t in outcome.trials if t.setting == outcome.start and t.status == MEASURED]
    if len(rounds) < 2:
        return None
    spreads = []
    for label in rounds[0].points:
        rates = [t.points[label].images_per_s for t in rounds]
        if min(rates) > 0:
            spreads.append((max(rates) / min(rates), label))
    if not spreads:
        return None
    ratio, label = max(spreads)
    return label, ratio


def explain(
    outcome: Outcome,
    points: Sequence[LoadPoint],
    p99_budget_ms: float,
    min_gain: float,
    budget_s: float,
    elapsed_s: float,
    cpus: int,
) -> str:
    """One paragraph: what was chosen, against what, why, and how far to trust it."""
    chosen, start = outcome.chosen, outcome.start
    evaluation = outcome.evaluations[chosen]
    tried = len(outcome.evaluations)
    rejected = sum(1 for e in outcome.evaluations.values() if e.status == "rejected")
    stopped = sum(1 for e in outcome.evaluations.values() if e.status == "stopped early")
    loads = ", ".join(f"{p.concurrency} in flight x {p.images} image(s)" for p in points)
    parts = []
    if not outcome.feasible:
        worst = evaluation.worst_p99_ms()
        parts.append(
            f"No setting tried met the p99 budget of {p99_budget_ms:g} ms at every load "
            f"point ({loads}); the closest, {chosen.key}, reached p99 {worst:.1f} ms. Nothing "
            "is applied: raise --p99-ms, or tune for less load."
        )
    elif chosen == start:
        parts.append(
            f"Keeping the settings the model has ({start.describe()}): no setting tried beat "
            f"them by more than {min_gain:.0%} of images/s (geometric mean over {loads}) "
            f"within the p99 budget of {p99_budget_ms:g} ms"
            + (
                ", once the finalists were measured again side by side."
                if outcome.final_rounds
                else "."
            )
        )
    else:
        ratios = [
            evaluation.points[p.label].images_per_s
            / outcome.evaluations[start].points[p.label].images_per_s
            for p in points
        ]
        parts.append(
            f"Chose {chosen.describe()}: it served {outcome.score(chosen):.2f}x the images/s "
            f"of the settings the model had ({start.key}), geometric mean over {loads} "
            f"(per load point {min(ratios):.2f}x to {max(ratios):.2f}x), with p99 at most "
            f"{evaluation.worst_p99_ms():.1f} ms against the budget of {p99_budget_ms:g} ms."
        )
        if outcome.paired_wins is not None:
            won, of = outcome.paired_wins
            parts.append(f"Side by side, it won {won} of the {of} rounds of the finals.")
        if outcome.moves:
            biggest = max(outcome.moves, key=lambda m: m.gain)
            before, after = (
                getattr(biggest.before, biggest.dimension),
                getattr(biggest.after, biggest.dimension),
            )
            parts.append(
                f"The largest single step of the search was {biggest.dimension} {before} -> "
                f"{after} ({biggest.gain:.2f}x)."
            )
    if outcome.final_rounds:
        parts.append(
            f"{len(outcome.finalists)} finalists (the start among them) were measured again in "
            f"up to {outcome.final_rounds} interleaved round(s); figures are medians of each "
            "setting's rounds, and a challenger had to beat the start by more than "
            f"{min_gain:.0%}."
        )
    elif len(outcome.finalists) > 1:
        parts.append("There was no time left for finals: the choice rests on single rounds.")
    else:
        parts.append(
            "No other setting qualified for the finals (a complete measurement, within the p99 "
            "budget where the start is), so there were none."
        )
    spread = noise(outcome)
    if spread is not None:
        label, ratio = spread
        parts.append(
            f"The start's own rounds differed by up to {ratio:.2f}x in images/s (at {label}): "
            + (
                f"more than the {min_gain:.0%} margin, so smaller differences between single "
                "rounds are noise on this machine (the finals' medians are steadier)."
                if ratio - 1 > min_gain
                else f"within the {min_gain:.0%} margin."
            )
        )
    parts.append(
        f"{tried} setting(s) were tried in {elapsed_s:.0f} s of the {budget_s:g} s budget"
        + (f" ({stopped} stopped early, {rejected} rejected)" if stopped or rejected else "")
        + (", and the budget ended the search" if outcome.stopped_by_budget else "")
        + ". Workers are a server flag, not part of config.pbtxt: "
        + workers_advice(chosen.workers, cpus)
        + "."
    )
    return " ".join(parts)
