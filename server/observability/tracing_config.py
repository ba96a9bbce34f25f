"""Whether and how requests are traced: the tracing flags and the OTEL_* variables, read once
at start-up so a bad setting stops the server with one clear line (server.observability.tracing
then builds the tracer from the result).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote

from server.config import OTEL_SAMPLERS, Settings

DEFAULT_SERVICE_NAME = "imgserve"
DEFAULT_SAMPLER = "parentbased_always_on"


class TracingConfigError(ValueError):
    """The tracing settings or OTEL_* variables make no sense; str() says which."""


@dataclass(frozen=True)
class TracingConfig:
    endpoint: str
    sampler: str = DEFAULT_SAMPLER
    ratio: float = 1.0
    service_name: str = ""  # empty: OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES, else imgserve
    resource_attributes: Mapping[str, str] = field(default_factory=dict)


def _env(env: Mapping[str, str], name: str) -> str:
    """An OTEL_* variable; empty counts as unset, as the OpenTelemetry spec says."""
    return env.get(name, "").strip()


def config_from(settings: Settings, env: Mapping[str, str] | None = None) -> TracingConfig | None:
    """The tracing configuration (flags win over OTEL_* variables), or None when it is off.

    On when an endpoint is set and neither OTEL_SDK_DISABLED=true nor OTEL_TRACES_EXPORTER=none
    says otherwise. Raises TracingConfigError for what cannot be served (another protocol or
    exporter than OTLP/gRPC, an unknown sampler, a ratio outside 0..1).
    """
    env = os.environ if env is None else env
    endpoint = (
        settings.otel_endpoint
        or _env(env, "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or _env(env, "OTEL_EXPORTER_OTLP_ENDPOINT")
    )
    exporter = _env(env, "OTEL_TRACES_EXPORTER").lower() or "otlp"
    if not endpoint or exporter == "none" or _env(env, "OTEL_SDK_DISABLED").lower() == "true":
        return None
    if exporter != "otlp":
        raise TracingConfigError(f"OTEL_TRACES_EXPORTER={exporter}: only otlp (or none) is served")
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = _env(env, name)
        if protocol:
            if protocol != "grpc":
                raise TracingConfigError(f"{name}={protocol}: traces are sent over OTLP/gRPC only")
            break
    sampler = settings.otel_sampler or _env(env, "OTEL_TRACES_SAMPLER").lower() or DEFAULT_SAMPLER
    if sampler not in OTEL_SAMPLERS:
        raise TracingConfigError(
            f"unknown trace sampler {sampler!r}; one of {', '.join(OTEL_SAMPLERS)}"
        )
    ratio = settings.otel_sampler_ratio
    if ratio is None and "traceidratio" in sampler and _env(env, "OTEL_TRACES_SAMPLER_ARG"):
        text = _env(env, "OTEL_TRACES_SAMPLER_ARG")
        try:
            ratio = float(text)
        except ValueError:
            raise TracingConfigError(f"OTEL_TRACES_SAMPLER_ARG={text!r} is not a number") from None
    ratio = 1.0 if ratio is None else ratio
    if not 0 <= ratio <= 1:
        raise TracingConfigError(f"the sampler ratio must be between 0 and 1, got {ratio}")
    return TracingConfig(
        endpoint=endpoint,
        sampler=sampler,
        ratio=ratio,
        service_name=settings.otel_service_name,
        resource_attributes=parse_attributes(settings.otel_resource_attributes),
    )


def parse_attributes(text: str) -> dict[str, str]:
    """`key=value,key=value` as OTEL_RESOURCE_ATTRIBUTES writes them (values percent-encoded)."""
    attributes: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise TracingConfigError(f"resource attribute {item.strip()!r} is not key=value")
        attributes[key.strip()] = unquote(value.strip())
    return attributes
