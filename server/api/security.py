"""Who may call the gRPC and HTTP/REST ports: TLS (optionally mutual) and bearer tokens.

Everything is read and checked once at start: a missing file, a certificate without its key,
a key that does not match, or a malformed tokens file stops the server with a one-line
reason instead of failing every handshake or call later. Both ports take the same
certificates and the same tokens with the same scopes.

Tokens are checked by a server interceptor on gRPC and by a middleware on HTTP
(server.api.rest). Probes stay open (grpc.health.v1, reflection, and the KServe
ServerLive/ServerReady, GET /v2/health/live and /v2/health/ready, which orchestrators and
load balancers call without credentials); repository calls (index, load, unload) need an
admin token; every other call needs an infer or admin token. Refusals say nothing about
which token or why.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import logging
import re
import ssl
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
from prometheus_client import Counter

from server.api.common import method_handler_kind
from server.api.status import REQUEST_ID_KEY, request_id_of
from server.config import AUTH_TOKENS_ENV, Settings
from server.observability.logs import REQUEST_ID

log = logging.getLogger(__name__)

UNAUTHENTICATED_MESSAGE = "missing or invalid bearer token"
PERMISSION_DENIED_MESSAGE = "permission denied: this call needs a token with admin scope"

_KSERVE_SERVICES = ("inference.GRPCInferenceService", "imgserve.inference.GRPCInferenceService")
# Callable without a token: health checks, reflection, and the KServe liveness/readiness probes.
OPEN_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
OPEN_METHODS = frozenset(
    f"/{service}/{name}" for service in _KSERVE_SERVICES for name in ("ServerLive", "ServerReady")
)
# The model repository extension changes or reveals what is served: admin scope only.
ADMIN_METHODS = frozenset(
    f"/{service}/{name}"
    for service in _KSERVE_SERVICES
    for name in ("RepositoryIndex", "RepositoryModelLoad", "RepositoryModelUnload")
)
# What a token may look like: it travels as an HTTP/2 header value, and `#` starts a comment.
_TOKEN = re.compile(r"[\x21-\x22\x24-\x7e]+")


class SecurityConfigError(Exception):
    """TLS files or tokens that cannot be used; str() is the one-line reason."""


class Scope(enum.IntEnum):
    """What a token allows; a higher scope includes the lower ones."""

    INFER = 1
    ADMIN = 2


def required_scope(method: str) -> Scope | None:
    """The scope a full method name (`/package.Service/Method`) needs; None when open."""
    if method in OPEN_METHODS or method.startswith(OPEN_PREFIXES):
        return None
    return Scope.ADMIN if method in ADMIN_METHODS else Scope.INFER


# The HTTP/REST equivalents: the health probes are open, the repository extension is admin's.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
ADMIN_PATH_PREFIX = "/v2/repository/"


def required_http_scope(path: str) -> Scope | None:
    """The scope an HTTP/REST path needs; None when open."""
    if path in OPEN_PATHS:
        return None
    return Scope.ADMIN if path.startswith(ADMIN_PATH_PREFIX) else Scope.INFER


# --- TLS ---


def _read(flag: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SecurityConfigError(f"cannot read {flag} {path}: {exc.strerror or exc}") from None


def _check_certificates(flag: str, path: Path, pem: bytes) -> None:
    """Parses every certificate in a PEM file (stdlib ssl: no extra dependency)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=pem.decode("ascii"))
    except (UnicodeDecodeError, ssl.SSLError):
        raise SecurityConfigError(f"{flag} {path} is not a PEM certificate file") from None


def _encrypted_key() -> bytes:
    raise SecurityConfigError("is encrypted; gRPC needs an unencrypted key")


def _check_key_pair(cert: Path, key: Path) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(cert, key, password=_encrypted_key)
    except SecurityConfigError as exc:
        raise SecurityConfigError(f"--tls-key {key} {exc}") from None
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            reason = f"does not match the certificate in --tls-cert {cert}"
        else:
            reason = "is not a PEM private key"
        raise SecurityConfigError(f"--tls-key {key} {reason}") from None


def _check_tls_files(settings: Settings) -> bool:
    """Check the TLS settings and files; whether TLS is on. Raises SecurityConfigError."""
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    if cert is None and key is None:
        if client_ca is not None:
            raise SecurityConfigError(
                "--tls-client-ca needs --tls-cert and --tls-key: "
                "client certificates are only checked over TLS"
            )
        return False
    if cert is None or key is None:
        given, missing = ("--tls-cert", "--tls-key") if key is None else ("--tls-key", "--tls-cert")
        raise SecurityConfigError(f"{given} needs {missing}: TLS takes a certificate and its key")
    _check_certificates("--tls-cert", cert, _read("--tls-cert", cert))
    _read("--tls-key", key)
    _check_key_pair(cert, key)
    if client_ca is not None:
        _check_certificates("--tls-client-ca", client_ca, _read("--tls-client-ca", client_ca))
    return True


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The HTTP port's TLS: the gRPC port's certificate, key and client CAs; None for plain
    TCP. Raises SecurityConfigError."""
    if not _check_tls_files(settings):
        return None
    assert settings.tls_cert is not None and settings.tls_key is not None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.tls_client_ca is not None:
        context.load_verify_locations(cafile=str(settings.tls_client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    else:
        context.verify_mode = ssl.CERT_NONE
    return context


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """TLS credentials of the gRPC port, None for plain TCP; raises SecurityConfigError."""
    if not _check_tls_files(settings):
        return None
    cert, key, client_ca = settings.tls_cert, settings.tls_key, settings.tls_client_ca
    assert cert is not None and key is not None
    roots = None if client_ca is None else _read("--tls-client-ca", client_ca)
    return grpc.ssl_server_credentials(
        [(_read("--tls-key", key), _read("--tls-cert", cert))],
        root_certificates=roots,
        require_client_auth=roots is not None,
    )


# --- tokens ---


def parse_tokens(text: str, source: str) -> dict[str, Scope]:
    """Tokens of a tokens file: `TOKEN [infer|admin]` per line (default infer), `#` comments.

    Errors name the line, never the token: the message goes to logs.
    """
    tokens: dict[str, Scope] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        where = f"{source} line {number}"
        if len(words) > 2:
            raise SecurityConfigError(f"{where}: expected `TOKEN [infer|admin]`")
        if not _TOKEN.fullmatch(words[0]):
            raise SecurityConfigError(f"{where}: a token must be printable ASCII")
        try:
            scope = Scope[words[1].upper()] if len(words) == 2 else Scope.INFER
        except KeyError:
            raise SecurityConfigError(f"{where}: unknown scope (expected infer or admin)") from None
        tokens[words[0]] = max(scope, tokens.get(words[0], scope))
    return tokens


def load_tokens(settings: Settings) -> dict[str, Scope]:
    """Tokens of --auth-tokens-file and SERVER_AUTH_TOKENS (admin); empty: no authentication."""
    tokens: dict[str, Scope] = {}
    path = settings.auth_tokens_file
    if path is not None:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = getattr(exc, "strerror", None) or "not UTF-8 text"
            raise SecurityConfigError(f"cannot read --auth-tokens-file {path}: {reason}") from None
        tokens = parse_tokens(text, f"--auth-tokens-file {path}")
        if not tokens:
            raise SecurityConfigError(f"--auth-tokens-file {path} holds no tokens")
    for index, token in enumerate(settings.auth_tokens, start=1):
        if not _TOKEN.fullmatch(token):
            raise SecurityConfigError(f"{AUTH_TOKENS_ENV}: token {index} is not printable ASCII")
        tokens[token] = Scope.ADMIN
    return tokens


def _digest(token: str | bytes) -> bytes:
    """Tokens are compared as SHA-256 digests: equal lengths, so the time says nothing of them."""
    return hashlib.sha256(token.encode() if isinstance(token, str) else token).digest()


def bearer_token(metadata: Sequence[tuple[str, str | bytes]] | None) -> str | None:
    """The token of the one `authorization: Bearer TOKEN` header; None if absent or malformed."""
    values = [value for key, value in metadata or () if key == "authorization"]
    if len(values) != 1 or not isinstance(values[0], str):
        return None
    scheme, _, token = values[0].partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class TokenAuthenticator(grpc.aio.ServerInterceptor):
    """Checks the bearer token of every call that needs one, against every known token."""

    def __init__(self, tokens: Mapping[str, Scope], rejections: Counter) -> None:
        self._digests = tuple((_digest(token), scope) for token, scope in tokens.items())
        self._rejections = rejections
        for code in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            rejections.labels(code.name)  # both series exist from the start, at 0

    def refused(self, code: grpc.StatusCode) -> None:
        """Count a refusal (either transport)."""
        self._rejections.labels(code.name).inc()

    def scope_of(self, token: str | None) -> Scope | None:
        """The scope of `token`; compares it with every known token, whatever matches."""
        if token is None:
            return None
        presented = _digest(token)
        matches = [(hmac.compare_digest(presented, d), scope) for d, scope in self._digests]
        return max((scope for matched, scope in matches if matched), default=None)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        needed = required_scope(details.method)
        if handler is None or needed is None:
            return handler
        granted = self.scope_of(bearer_token(details.invocation_metadata))
        if granted is None:
            code, message = grpc.StatusCode.UNAUTHENTICATED, UNAUTHENTICATED_MESSAGE
        elif granted < needed:
            code, message = grpc.StatusCode.PERMISSION_DENIED, PERMISSION_DENIED_MESSAGE
        else:
            return handler
        self.refused(code)
        return _refusal(handler, details.method, code, message)


def _ignore(data: bytes) -> None:
    """The request deserializer of a refused call: its bytes are never parsed."""


def _refusal(
    handler: grpc.RpcMethodHandler, method: str, code: grpc.StatusCode, message: str
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as `handler` that answers `code` without running it.

    Like every answered RPC, the refusal carries its request id in the trailing metadata
    and in its log line (server.api.status).
    """

    async def refuse(request: Any, context: grpc.aio.ServicerContext) -> None:
        request_id = request_id_of(context)
        REQUEST_ID.set(request_id)  # the RPC's own task: nothing to reset afterwards
        context.set_trailing_metadata(((REQUEST_ID_KEY, request_id),))
        log.debug("refused %s: %s", method, code.name)
        await context.abort(code, message)

    kind = method_handler_kind(handler.request_streaming, handler.response_streaming)
    return kind(
        refuse, request_deserializer=_ignore, response_serializer=handler.response_serializer
    )


# --- the whole ---


@dataclass(frozen=True)
class Security:
    """What start-up needs: the gRPC port's credentials and interceptors, the HTTP port's TLS
    context and the token check both use."""

    credentials: grpc.ServerCredentials | None
    interceptors: tuple[grpc.aio.ServerInterceptor, ...]
    ssl_context: ssl.SSLContext | None = None
    tokens: TokenAuthenticator | None = None

    def add_port(self, server: grpc.aio.Server, address: str) -> int:
        if self.credentials is None:
            return server.add_insecure_port(address)
        return server.add_secure_port(address, self.credentials)


def load(settings: Settings, rejections: Counter) -> Security:
    """Read and check the TLS files and tokens; logs what protects the port."""
    credentials = server_credentials(settings)
    context = None if settings.disable_http else ssl_context(settings)
    tokens = load_tokens(settings)
    authenticator = TokenAuthenticator(tokens, rejections) if tokens else None
    interceptors = (authenticator,) if authenticator is not None else ()
    transport = "plain TCP"
    if credentials is not None:
        transport = "TLS, client certificates required" if settings.tls_client_ca else "TLS"
    auth = f"{len(tokens)} bearer token(s)" if tokens else "no authentication"
    ports = "gRPC port" if settings.disable_http else "gRPC and HTTP ports"
    log.info("%s security: %s, %s", ports, transport, auth)
    if tokens and credentials is None:
        log.warning(
            "bearer tokens travel in clear text without TLS: anyone on the network path can "
            "read and reuse them; serve TLS with --tls-cert and --tls-key"
        )
    return Security(credentials, interceptors, context, authenticator)
