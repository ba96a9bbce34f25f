"""`python -m benchmarks models`: req/s and server CPU per request of several models served
side by side under h2load, and the same models served by another checkout of the server (the
server before a change) in the same run.

Any model of the repository can be measured: the replayed request holds every required input
of the model's config, at the config's dims (a variable dim as 1), with random values. One
server of this checkout serves all the models; with --before, a server of that checkout
serves the models it can (its own copy of the repository). Each round measures every
(server, model) pair in turn (every other round in reverse order), and the figures are medians
over rounds; the ratio of this
checkout to the other is paired within each round, so a noisy machine moves both alike.

  python -m benchmarks models --model-repository model_repository \\
      --models fashion_mnist,simple,densenet_onnx
  git worktree add /tmp/before REV && make -C /tmp/before proto PY=$PWD/.venv/bin/python
  python -m benchmarks models --model-repository model_repository --models fashion_mnist \\
      --before /tmp/before --out bench-results/models
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shlex
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from benchmarks.common import BenchError, exit_code
from benchmarks.h2load import (
    Target,
    answer_codes,
    frame,
    infer_once,
    load_parser,
    measure,
    require_h2load,
)
from benchmarks.options import add_server_args_option
from benchmarks.rounds import medians_by, paired_ratios
from benchmarks.server import start_server
from server.config import parse_settings
from server.core.repository import read_model
from wire import grpc_service_pb2 as pb

RESULTS_FILE = "results.json"
THIS, BEFORE = "this", "before"
FIGURES = ("requests_per_s", "cpu_ms_per_request")


def build_request(repository: Path, model: str, images: int) -> pb.ModelInferRequest:
    """One request holding every required input of the model's config, random values."""
    spec = read_model(repository, model, parse_settings(["--model-repository", str(repository)]))
    rng = np.random.default_rng(0)
    request = pb.ModelInferRequest(model_name=model)
    batched = spec.signature.batched
    for tensor in spec.signature.inputs:
        if tensor.optional:
            continue
        if tensor.datatype.is_bytes:
            raise BenchError(f"model {model!r} takes strings: no request can be made up")
        dims = tuple(1 if d == -1 else d for d in tensor.dims)
        shape = (images, *dims) if batched else dims
        values = rng.random(shape) * (255 if tensor.datatype.dtype.kind in "iu" else 1)
        request.inputs.add(name=tensor.name, datatype=tensor.datatype.name, shape=list(shape))
        request.raw_input_contents.append(values.astype(tensor.datatype.dtype).tobytes())
    return request


def check_answer(address: str, request: pb.ModelInferRequest) -> None:
    """The replayed request must be answered, with outputs."""
    if not infer_once(address, request).outputs:
        raise BenchError(f"{address} answered {request.model_name!r} without outputs")


def build_parser() -> argparse.ArgumentParser:
    parser = load_parser("python -m benchmarks models", __doc__, rounds=3)
    parser.add_argument(
        "--models",
        required=True,
        help="Comma-separated models of the repository to measure (--model is not used).",
    )
    parser.add_argument(
        "--before",
        type=Path,
        help="Another checkout of this project (its `server` package and generated `wire`): "
        "its server measures the same models beside this one's, where it can load them.",
    )
    parser.add_argument("--out", type=Path, help="Folder for results.json (default: none).")
    add_server_args_option(parser, "both servers (this checkout's and --before's)")
    return parser


def _copy(repository: Path, models: Sequence[str], folder: Path) -> Path:
    target = folder / "repository"
    for model in models:
        shutil.copytree(repository / model, target / model)
    return target


def run(args: argparse.Namespace) -> int:
    require_h2load()
    models = [m for m in args.models.split(",") if m]
    server_args = ["--workers", "1", *shlex.split(args.server_args or "")]
    requests = {m: build_request(args.model_repository, m, args.images) for m in models}
    with contextlib.ExitStack() as stack:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="models-bench-")))
        frames = {}
        for model, request in requests.items():
            frames[model] = scratch / f"{model}.frame"
            frames[model].write_bytes(frame(request))
        checkouts = {THIS: None} | ({BEFORE: args.before} if args.before else {})
        targets: list[tuple[str, Target]] = []
        for kind, checkout in checkouts.items():
            served = stack.enter_context(
                start_server(
                    _copy(args.model_repository, models, scratch / kind), server_args, checkout
                )
            )
            codes = answer_codes(served.metrics_url)
            for model, request in requests.items():
                try:
                    check_answer(served.target, request)
                except BenchError as exc:
                    if kind == THIS:
                        raise
                    print(f"{kind}: {exc}; not measured there")
                    continue
                target = Target(kind, 1, served.target, served.cpu_seconds, codes)  # type: ignore[arg-type]
                targets.append((model, target))
        rounds: list[list[Row]] = []
        for index in range(args.rounds):
            one: list[Row] = []
            # Every other round runs the pairs in reverse, so none always goes first.
            for model, target in targets if index % 2 == 0 else targets[::-1]:
                measured = measure(target, frames[model], args)
                row = Row(target.kind, model, measured.requests_per_s, measured.cpu_ms_per_request)
                one.append(row)
                print(
                    f"round {index + 1}: {row.server:<6} {model:<16} "
                    f"{row.requests_per_s:8,.0f} req/s  {row.cpu_ms_per_request:.3f} ms CPU/request"
                )
            rounds.append(one)
    summary = summarize(rounds)
    print(format_table(summary))
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        document = {
            "args": _jsonable(vars(args)),
            "rounds": [[asdict(row) for row in one] for one in rounds],
            **summary,
        }
        (args.out / RESULTS_FILE).write_text(json.dumps(document, indent=2))
    return 0


@dataclass(frozen=True)
class Row:
    server: str  # THIS or BEFORE
    model: str
    requests_per_s: float
    cpu_ms_per_request: float


def summarize(rounds: list[list[Row]]) -> dict[str, dict[str, dict[str, float]]]:
    """Medians per server/model, and this checkout over the other, paired per round."""
    medians = medians_by(
        (row for one in rounds for row in one), lambda r: f"{r.server}/{r.model}", FIGURES
    )
    ratios = {}
    for model in dict.fromkeys(row.model for one in rounds for row in one):
        pairs = [[row for row in one if row.model == model] for one in rounds]
        if all(any(row.server == BEFORE for row in one) for one in pairs):
            ratios[model] = paired_ratios(pairs, lambda r: r.server, BEFORE, FIGURES)[THIS]
    return {"medians": medians, "this_over_before": ratios}


def format_table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = [f"{'server/model':<28} {'req/s':>9} {'CPU ms/request':>15}"]
    for key, figures in summary["medians"].items():
        rate, cpu = figures["requests_per_s"], figures["cpu_ms_per_request"]
        lines.append(f"{key:<28} {rate:9,.0f} {cpu:15.3f}")
    for model, ratio in summary["this_over_before"].items():
        lines.append(
            f"{model}: this checkout / before, paired per round: {ratio['requests_per_s']} x "
            f"the req/s, {ratio['cpu_ms_per_request']} x the CPU per request"
        )
    return "\n".join(lines)


def _jsonable(values: dict[str, object]) -> dict[str, object]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def main(argv: Sequence[str]) -> int:
    return exit_code(run, build_parser().parse_args(argv))
