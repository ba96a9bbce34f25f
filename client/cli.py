"""Command line of the client: `classify` images and list `models`, as tables or JSON."""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from pathlib import Path

from client.api import DEFAULT_TARGET, ClassifierClient, ClientError, ModelInfo, Result
from client.credentials import TOKEN_ENV, Credentials
from client.table import format_table

SERVER_ENV = "CLIENT_SERVER"
# What to do about a refusal, added to the server's message.
_HINTS = {
    "UNAUTHENTICATED": f" (pass --token or --token-file, or set ${TOKEN_ENV})",
    "PERMISSION_DENIED": " (use a token with the scope this call needs)",
}
# The server names a request's images by position ("image 2: not a decodable PNG ...").
_IMAGE_INDEX = re.compile(r"image (\d+)\b")

_EXAMPLES = """\
Run `python -m client COMMAND --help` for the options of a command.

examples:
  python -m client models
  python -m client classify --model fashion_mnist shoe.png shirt.png
  python -m client classify --model cifar10 --top-k 3 --version 2 cat.jpg
  python -m client classify --model fashion_mnist --json shoe.png | jq '.results[0].top'
  CLIENT_SERVER=gpu-box:8001 python -m client models --json
  IMGSERVE_TOKEN=s3cret python -m client models --server gpu-box:8001 --tls-ca ca.pem
"""


class UsageError(Exception):
    """A problem with what the user asked for, reported as one line."""


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError("must be greater than 0")
    return value


def _server(text: str) -> str:
    """Catch an empty or spaced address here: gRPC answers one with internals on stderr."""
    if not text.strip() or any(c.isspace() for c in text):
        raise argparse.ArgumentTypeError(f"invalid server address {text!r} (expected HOST:PORT)")
    return text


def _top_k(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--server",
        type=_server,
        default=os.environ.get(SERVER_ENV) or DEFAULT_TARGET,
        metavar="HOST:PORT",
        help=f"gRPC address of the server (default: ${SERVER_ENV}, else {DEFAULT_TARGET}).",
    )
    common.add_argument(
        "--timeout",
        type=_positive_float,
        default=10.0,
        metavar="S",
        help="Seconds to wait for the answer before giving up (default: 10).",
    )
    common.add_argument(
        "--json", action="store_true", help="Print JSON for scripts instead of a table."
    )
    common.add_argument(
        "--tls", action="store_true", help="Connect with TLS, trusting the system's CAs."
    )
    common.add_argument(
        "--tls-ca", metavar="PEM", help="CA certificate(s) to trust for the server (implies --tls)."
    )
    common.add_argument(
        "--tls-cert", metavar="PEM", help="Client certificate, for servers that require one."
    )
    common.add_argument("--tls-key", metavar="PEM", help="Private key of --tls-cert.")
    tokens = common.add_mutually_exclusive_group()
    tokens.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV) or None,
        help=f"Bearer token to send (default: ${TOKEN_ENV}; prefer it or --token-file: "
        "a command line is visible to other users).",
    )
    tokens.add_argument("--token-file", metavar="FILE", help="File holding the bearer token.")

    parser = argparse.ArgumentParser(
        prog="python -m client",
        description="Classify images with an image-classification server, or list its models.",
        epilog=_EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    classify = commands.add_parser(
        "classify",
        parents=[common],
        help="Classify image files and print the most probable labels.",
        description="Send PNG or JPEG files (any size or colour mode: the server converts them\n"
        "to the model's input) in one request and print the top-k labels of each.",
        epilog="examples:\n"
        "  python -m client classify --model fashion_mnist shoe.png shirt.png\n"
        "  python -m client classify --model cifar10 --top-k 3 --server 10.0.0.5:8001 cat.jpg\n"
        "  python -m client classify --model fashion_mnist --json *.png\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    classify.add_argument("--model", required=True, help="Name of the model to ask (required).")
    classify.add_argument(
        "--version", default="", help="Model version to ask (default: the newest ready one)."
    )
    classify.add_argument(
        "--top-k",
        type=_top_k,
        default=5,
        metavar="K",
        help="Labels to show per image, most probable first (default: 5).",
    )
    classify.add_argument("images", nargs="+", metavar="IMG", help="PNG or JPEG files.")

    commands.add_parser(
        "models",
        parents=[common],
        help="List the server's models with version, state, precision and input shape.",
        description="List the models the server knows: version, state (READY, LOADING,\n"
        "UNAVAILABLE), why one is not ready, platform, precision (fp32, fp16, int8) and\n"
        "input shape (C x H x W).",
        epilog="examples:\n"
        "  python -m client models\n"
        "  python -m client models --server host:8001 --json\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    return parser


def _read_images(paths: Sequence[str]) -> list[bytes]:
    """Read every file up front so a bad path fails before anything is sent."""
    images = []
    for path in paths:
        try:
            images.append(Path(path).read_bytes())
        except OSError as error:
            reason = error.strerror or str(error)
            raise UsageError(f"cannot read image {path!r}: {reason}") from None
    return images


def _percent(probability: float) -> str:
    return f"{100.0 * probability:.2f}%"


def _credentials(args: argparse.Namespace) -> Credentials:
    try:
        return Credentials.from_files(
            tls=args.tls,
            ca=args.tls_ca,
            cert=args.tls_cert,
            key=args.tls_key,
            token=args.token,
            token_file=args.token_file,
        )
    except ValueError as error:
        raise UsageError(str(error)) from None


def _classify(args: argparse.Namespace) -> str:
    images = _read_images(args.images)
    with ClassifierClient(args.server, args.timeout, _credentials(args)) as client:
        try:
            results = client.classify(args.model, images, top_k=args.top_k, version=args.version)
        except ClientError as error:
            raise _name_things(error, args.model, args.images) from None
    if args.json:
        return json.dumps(_classify_json(args, results), indent=2)
    return _classify_table(args.images, results)


def _name_things(error: ClientError, model: str, paths: Sequence[str]) -> ClientError:
    """Say which model and which file a server error is about, in the user's own words."""
    message = error.message
    if error.code == "NOT_FOUND" and model not in message:
        message = f"model {model!r}: {message}"
    match = _IMAGE_INDEX.match(message)
    if match and int(match.group(1)) < len(paths):
        message = f"image {paths[int(match.group(1))]!r}{message[match.end() :]}"
    return ClientError(error.code, message, error.details)


def _classify_json(args: argparse.Namespace, results: list[Result]) -> dict[str, object]:
    first = results[0] if results else None
    return {
        "server": args.server,
        "model": first.model if first else args.model,
        "version": first.version if first else args.version,
        "results": [
            {
                "image": path,
                "top": [
                    {"index": p.index, "label": p.label, "probability": p.probability}
                    for p in result.top
                ],
                "probabilities": [float(x) for x in result.probabilities],
            }
            for path, result in zip(args.images, results, strict=True)
        ],
    }


def _classify_table(paths: Sequence[str], results: list[Result]) -> str:
    rows: list[list[object]] = []
    for path, result in zip(paths, results, strict=True):
        for rank, prediction in enumerate(result.top, start=1):
            name = path if rank == 1 else ""
            rows.append([name, rank, prediction.label, _percent(prediction.probability)])
    table = format_table(["IMAGE", "#", "LABEL", "PROBABILITY"], rows, right=(1, 3))
    first = results[0] if results else None
    footer = f"model {first.model}, version {first.version}" if first else "no results"
    return f"{table}\n\n{footer}"


def _models(args: argparse.Namespace) -> str:
    with ClassifierClient(args.server, args.timeout, _credentials(args)) as client:
        models = client.list_models()
    if args.json:
        listing = {"server": args.server, "models": [_model_json(m) for m in models]}
        return json.dumps(listing, indent=2)
    if not models:
        return f"no models on {args.server}"
    rows = [
        [
            m.name,
            m.version or "-",
            m.state,
            m.platform or "-",
            m.precision or "-",
            "x".join(str(d) for d in m.input_shape) or "-",
            len(m.labels),
            m.reason,
        ]
        for m in models
    ]
    headers = ["MODEL", "VERSION", "STATE", "PLATFORM", "PRECISION", "INPUT", "CLASSES", "REASON"]
    return format_table(headers, rows, right=(6,))


def _model_json(model: ModelInfo) -> dict[str, object]:
    return {
        "name": model.name,
        "version": model.version,
        "state": model.state,
        "reason": model.reason,
        "platform": model.platform,
        "precision": model.precision,
        "input_shape": list(model.input_shape),
        "labels": list(model.labels),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        output = _classify(args) if args.command == "classify" else _models(args)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ClientError as error:
        print(f"error: {error}{_HINTS.get(error.code, '')}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    try:
        print(output)
    except BrokenPipeError:  # e.g. `| head`: the reader left, nothing more to say
        sys.stderr.close()
    return 0
