"""Server settings: command-line flags > environment variables (SERVER_*) > defaults."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "SERVER_"
# The samplers OTEL_TRACES_SAMPLER names (server.observability.tracing builds them).
OTEL_SAMPLERS = (
    "always_on", "always_off", "traceidratio",
    "parentbased_always_on", "parentbased_always_off", "parentbased_traceidratio",
)  # fmt: skip

# --grpc-transport's choices (server.api.transport).
GRPC_TRANSPORTS = ("auto", "native", "grpcio")


@dataclass(frozen=True)
class Settings:
    model_repository: Path
    host: str = "0.0.0.0"
    grpc_port: int = 8001
    metrics_port: int = 8002
    # HTTP/REST KServe v2 beside gRPC, in the same processes; 0 picks a port like the others.
    http_port: int = 8000
    disable_http: bool = False
    device: str = "auto"
    log_format: str = "text"
    log_level: str = "info"
    # Server processes answering the same ports; 0 = auto (server.processes.cpus.usable_cpus).
    workers: int = 0
    # Models to load at start (all when empty); others can be loaded later by RepositoryModelLoad.
    models: tuple[str, ...] = field(default_factory=tuple)
    # Batching defaults for models whose config.pbtxt leaves them unset.
    max_batch_size: int = 64
    max_queue_delay_us: int = 0
    # On: a lone request runs at once unless recent batches show concurrent load (then it
    # waits up to the delay). Off: every batch waits out the delay (Triton's behaviour).
    adaptive_batch_delay: bool = False
    # For models with no queue delay: how long a batch may wait for companions under load
    # (several requests queued, or in the previous batch); a lone request never waits.
    batch_window_us: int = 2000
    # Bound of each model instance's queue, in requests; past it callers get RESOURCE_EXHAUSTED.
    max_queue_size: int = 1024
    # onnxruntime/torch threads per model instance; spinning threads starve the gRPC side.
    intra_op_threads: int = 1
    reference_tolerance: float = 1e-4
    grace_period_s: float = 10.0
    # RepositoryModelLoad/Unload change what is served: off unless the operator asks for it.
    enable_model_control: bool = False
    # Off: a config.pbtxt that is missing or leaves out inputs, outputs or max_batch_size is
    # completed from the ONNX graph, as Triton does by default (server.core.autocomplete).
    disable_auto_complete_config: bool = False
    # Benchmarking only: every model answers uniform probabilities without computing.
    null_compute: bool = False
    # What carries the gRPC port (server.api.transport): auto is native unless TLS is on.
    grpc_transport: str = "auto"
    # gRPC message limit, both ways, and HTTP request body limit; 64 MiB fits a batch of 1024
    # CIFAR10 images in FP32.
    max_message_bytes: int = 64 * 1024 * 1024
    # TLS for the gRPC and HTTP ports (PEM files); a client CA makes client certificates
    # required.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_client_ca: Path | None = None
    # Bearer tokens: from a file (with scopes) and from SERVER_AUTH_TOKENS (admin scope).
    auth_tokens_file: Path | None = None
    auth_tokens: tuple[str, ...] = field(default_factory=tuple, repr=False)
    # OpenTelemetry tracing (server.observability.tracing): on once an OTLP endpoint is set,
    # here or in OTEL_EXPORTER_OTLP_[TRACES_]ENDPOINT. Unset fields fall back to their OTEL_*
    # variables.
    otel_endpoint: str = ""
    otel_sampler: str = ""
    otel_sampler_ratio: float | None = None
    otel_service_name: str = ""
    otel_resource_attributes: str = ""


@dataclass(frozen=True)
class _Flag:
    name: str
    type: type
    help: str
    choices: tuple[str, ...] | None = None


_FLAGS = (
    _Flag("model_repository", Path, "Triton-layout model repository to serve (required)."),
    _Flag("host", str, "Address to bind the gRPC, HTTP/REST and metrics servers to."),
    _Flag("grpc_port", int, "gRPC port (KServe v2, native API, health, reflection); 0 picks one."),
    _Flag("http_port", int, "HTTP/REST port (KServe v2, as Triton serves it); 0 picks one."),
    _Flag("disable_http", bool, "Serve no HTTP/REST port (gRPC and metrics only)."),
    _Flag("metrics_port", int, "HTTP port of the Prometheus /metrics endpoint; 0 picks one."),
    _Flag("device", str, "Where models run: auto uses a GPU when usable.", ("auto", "cpu", "cuda")),
    _Flag("log_format", str, "Log line format.", ("text", "json")),
    _Flag("log_level", str, "Least severe level logged.", ("debug", "info", "warning", "error")),
    _Flag(
        "workers",
        int,
        "Server processes sharing the ports (each loads every model): a number, or auto for "
        "the CPUs this process may use (affinity and cgroup quota). 1 runs no supervisor.",
    ),
    _Flag("models", str, "Comma-separated models to load at start (default: all)."),
    _Flag("max_batch_size", int, "Batch size for models whose config sets max_batch_size 0."),
    _Flag(
        "max_queue_delay_us",
        int,
        "Queue delay for models whose config sets none (0: a batch starts as soon as an "
        "instance is free, as in Triton).",
    ),
    _Flag("adaptive_batch_delay", bool, "Skip the queue delay for lone requests at low load."),
    _Flag(
        "batch_window_us",
        int,
        "For models that set no queue delay: under load (several requests queued or in the "
        "last batch) a batch waits up to this for companions; a lone request never waits. "
        "0: never wait.",
    ),
    _Flag("max_queue_size", int, "Requests each model instance may queue before refusing."),
    _Flag(
        "intra_op_threads",
        int,
        "Threads each runtime instance computes with (0: runtime's), for models whose config "
        "sets no intra_op_thread_count parameter.",
    ),
    _Flag("reference_tolerance", float, "Largest abs difference allowed by the load-time check."),
    _Flag("grace_period_s", float, "Seconds to finish accepted requests after SIGTERM/SIGINT."),
    _Flag("enable_model_control", bool, "Allow RepositoryModelLoad/Unload (default: refused)."),
    _Flag(
        "disable_auto_complete_config",
        bool,
        "Do not complete config.pbtxt from the ONNX graph, as Triton does by default: a model "
        "folder without one is refused, a partial one is read as written.",
    ),
    _Flag("null_compute", bool, "Benchmarking only: answer uniform probabilities, no compute."),
    _Flag(
        "grpc_transport",
        str,
        "What serves the gRPC port: native (pygrpc-native: HTTP/2 and gRPC framing outside "
        "the GIL; no TLS), grpcio, or auto (native unless TLS is on, then grpcio).",
        GRPC_TRANSPORTS,
    ),
    _Flag("max_message_bytes", int, "Largest gRPC message or HTTP request body, in bytes."),
    _Flag("tls_cert", Path, "PEM certificate chain: serve TLS on gRPC and HTTP (with --tls-key)."),
    _Flag("tls_key", Path, "PEM private key of --tls-cert."),
    _Flag("tls_client_ca", Path, "PEM CA bundle: require client certificates it signed (mTLS)."),
    _Flag("auth_tokens_file", Path, "Bearer tokens, one per line: TOKEN [infer|admin]."),
    _Flag(
        "otel_endpoint",
        str,
        "OTLP/gRPC endpoint to send traces to (e.g. http://collector:4317); setting it turns "
        "tracing on (default: OTEL_EXPORTER_OTLP_TRACES_ENDPOINT, OTEL_EXPORTER_OTLP_ENDPOINT).",
    ),
    _Flag(
        "otel_sampler",
        str,
        "Trace sampler (default: OTEL_TRACES_SAMPLER, else parentbased_always_on).",
        OTEL_SAMPLERS,
    ),
    _Flag(
        "otel_sampler_ratio",
        float,
        "Fraction of traces the *traceidratio samplers keep, 0..1 (default: "
        "OTEL_TRACES_SAMPLER_ARG, else 1).",
    ),
    _Flag(
        "otel_service_name",
        str,
        "service.name of the traces (default: OTEL_SERVICE_NAME, else imgserve).",
    ),
    _Flag(
        "otel_resource_attributes",
        str,
        "Resource attributes key=value,... added to OTEL_RESOURCE_ATTRIBUTES (these win).",
    ),
)
# Comma-separated admin tokens; environment only, so they never show in the process list.
AUTH_TOKENS_ENV = ENV_PREFIX + "AUTH_TOKENS"
# gRPC takes its message limits as a signed 32-bit int.
MAX_MESSAGE_BYTES = 2**31 - 1
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _boolean(text: str) -> bool:
    """An environment switch: 1/true/yes/on or 0/false/no/off, any case."""
    value = text.strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(text)
    return value in _TRUE


def worker_count(text: str) -> int:
    """`auto` (0: decided at start from the usable CPUs) or a number of workers, at least 1."""
    if text.strip().lower() == "auto":
        return 0
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number or auto, got {text!r}") from None
    if count < 1:
        raise argparse.ArgumentTypeError(f"at least 1 worker is needed, got {count}")
    return count


# Flags whose text is not read by their type alone.
_PARSERS: dict[str, Callable[[str], object]] = {"workers": worker_count}


def _env_name(name: str) -> str:
    return ENV_PREFIX + name.upper()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m server",
        description="Serve a model repository of image classifiers over gRPC "
        "(KServe v2 protocol and a native Classifier API) with dynamic batching.",
        epilog="Every flag can also be set by an environment variable, named in brackets; "
        "a flag on the command line wins over the environment.",
    )
    defaults = Settings(model_repository=Path("."))
    for flag in _FLAGS:
        default = None if flag.name == "model_repository" else getattr(defaults, flag.name)
        shown = ",".join(default) if isinstance(default, tuple) else default
        if flag.name == "workers":
            shown = "auto"
        if flag.type is bool:  # a switch: present or not, never `--flag false`
            text = f"{flag.help} [{_env_name(flag.name)}=1]"
            name = "--" + flag.name.replace("_", "-")
            parser.add_argument(name, dest=flag.name, action="store_true", default=None, help=text)
            continue
        parser.add_argument(
            "--" + flag.name.replace("_", "-"),
            dest=flag.name,
            type=_PARSERS.get(flag.name, flag.type),
            choices=flag.choices,
            default=None,
            help=f"{flag.help} [{_env_name(flag.name)}]"
            + ("" if shown in (None, "") else f" (default: {shown})"),
        )
    return parser


def parse_settings(
    argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None
) -> Settings:
    """Build Settings; exits with a usage error (status 2) on a bad flag or variable."""
    parser = build_parser()
    args = parser.parse_args(argv)
    env = os.environ if env is None else env
    values: dict[str, object] = {}
    for flag in _FLAGS:
        value = getattr(args, flag.name)
        if value is None and _env_name(flag.name) in env:
            raw = env[_env_name(flag.name)]
            try:
                read = _boolean if flag.type is bool else _PARSERS.get(flag.name, flag.type)
                value = read(raw)
            except argparse.ArgumentTypeError as exc:
                parser.error(f"{_env_name(flag.name)}={raw!r}: {exc}")
            except ValueError:
                expected = f"a valid {flag.type.__name__}"
                if flag.type is bool:
                    expected = "one of " + "/".join(_TRUE + _FALSE)
                parser.error(f"{_env_name(flag.name)}={raw!r} is not {expected}")
            if flag.choices and value not in flag.choices:
                parser.error(f"{_env_name(flag.name)} must be one of {', '.join(flag.choices)}")
        if value is not None:
            values[flag.name] = value
    if "model_repository" not in values:
        parser.error(
            "--model-repository is required (or set SERVER_MODEL_REPOSITORY); "
            "build one with `python -m training build-repository`"
        )
    tokens = tuple(t.strip() for t in env.get(AUTH_TOKENS_ENV, "").split(",") if t.strip())
    if tokens:
        values["auth_tokens"] = tokens
    if "models" in values:
        values["models"] = tuple(m.strip() for m in str(values["models"]).split(",") if m.strip())
    settings = Settings(**values)  # type: ignore[arg-type]
    _validate(parser, settings)
    return settings


def _validate(parser: argparse.ArgumentParser, settings: Settings) -> None:
    for name in ("grpc_port", "http_port", "metrics_port"):
        if not 0 <= getattr(settings, name) <= 65535:
            parser.error(f"{name.replace('_', '-')} must be between 0 and 65535")
    for f in fields(settings):
        if f.name in ("max_batch_size", "max_queue_size") and getattr(settings, f.name) < 1:
            parser.error(f"{f.name.replace('_', '-')} must be at least 1")
    if min(settings.max_queue_delay_us, settings.batch_window_us, settings.intra_op_threads) < 0:
        parser.error("max-queue-delay-us, batch-window-us and intra-op-threads cannot be negative")
    if settings.grace_period_s < 0:
        parser.error("grace-period-s cannot be negative")
    if not 1 <= settings.max_message_bytes <= MAX_MESSAGE_BYTES:
        parser.error(f"max-message-bytes must be between 1 and {MAX_MESSAGE_BYTES}")
    if settings.grpc_transport == "native" and settings.tls_cert is not None:
        parser.error(
            "--grpc-transport native serves no TLS: use --grpc-transport auto or grpcio "
            "with --tls-cert"
        )
    ratio = settings.otel_sampler_ratio
    if ratio is not None and not 0 <= ratio <= 1:
        parser.error("otel-sampler-ratio must be between 0 and 1")
