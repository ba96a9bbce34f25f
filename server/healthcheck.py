"""`python -m server.healthcheck`: ask a running server's grpc.health.v1 service if it serves.

Exit status 0 when the service answers SERVING, 1 otherwise (NOT_SERVING while models load
or while draining, unknown service, no answer in time, TLS on without a CA to trust). The
container image's HEALTHCHECK and Kubernetes `exec` probes run it, so it imports only grpc and
the health stubs: no server code, no numpy. Health needs no token.

It reads the server's own settings, so the same environment configures both: it dials
SERVER_HOST (localhost when that is a wildcard such as 0.0.0.0) on SERVER_GRPC_PORT, and when
SERVER_TLS_CERT is set the server speaks TLS, so the check needs a CA to trust
(SERVER_HEALTHCHECK_TLS_CA) and, with SERVER_TLS_CLIENT_CA (client certificates required), a
client certificate (SERVER_HEALTHCHECK_TLS_CERT, SERVER_HEALTHCHECK_TLS_KEY). Flags win.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

WILDCARD_HOSTS = ("", "0.0.0.0", "::", "[::]")
CA_ENV = "SERVER_HEALTHCHECK_TLS_CA"
CERT_ENV = "SERVER_HEALTHCHECK_TLS_CERT"
KEY_ENV = "SERVER_HEALTHCHECK_TLS_KEY"
SERVER_NAME_ENV = "SERVER_HEALTHCHECK_TLS_SERVER_NAME"


def default_address(env: Mapping[str, str]) -> str:
    """HOST:PORT the server listens on, from its SERVER_HOST and SERVER_GRPC_PORT."""
    host = env.get("SERVER_HOST", "").strip()
    if host in WILDCARD_HOSTS:
        host = "localhost"
    elif ":" in host and not host.startswith("["):  # an IPv6 literal
        host = f"[{host}]"
    return f"{host}:{env.get('SERVER_GRPC_PORT', '8001').strip()}"


def _path(env: Mapping[str, str], name: str) -> Path | None:
    value = env.get(name, "").strip()
    return Path(value) if value else None


def build_parser(env: Mapping[str, str] | None = None) -> argparse.ArgumentParser:
    env = os.environ if env is None else env
    parser = argparse.ArgumentParser(
        prog="python -m server.healthcheck",
        description="Exit 0 when the server's gRPC health service answers SERVING, else 1.",
    )
    parser.add_argument(
        "--address",
        default=default_address(env),
        help="HOST:PORT of the gRPC server (default: %(default)s, from SERVER_HOST and "
        "SERVER_GRPC_PORT)",
    )
    parser.add_argument(
        "--service",
        default="",
        help='health service to ask: "" is the whole server (every model ready), a model '
        "name asks for that model (default: the whole server)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3.0, help="seconds to wait (default: %(default)s)"
    )
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=_path(env, CA_ENV),
        help=f"PEM CA bundle: connect with TLS, trusting it [{CA_ENV}]",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=_path(env, CERT_ENV),
        help=f"PEM client certificate (mutual TLS) [{CERT_ENV}]",
    )
    parser.add_argument(
        "--tls-key",
        type=Path,
        default=_path(env, KEY_ENV),
        help=f"PEM private key of --tls-cert [{KEY_ENV}]",
    )
    parser.add_argument(
        "--tls-server-name",
        default=env.get(SERVER_NAME_ENV, "").strip() or None,
        help="name the server certificate must carry, when it does not name the dialled host "
        f"[{SERVER_NAME_ENV}]",
    )
    return parser


def _channel(
    address: str, tls: tuple[Path | None, Path | None, Path | None], name: str | None
) -> grpc.Channel:
    ca, cert, key = tls
    if ca is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    options = [("grpc.ssl_target_name_override", name)] if name else []
    return grpc.secure_channel(address, credentials, options=options)


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    tls: tuple[Path | None, Path | None, Path | None] = (None, None, None),
    server_name: str | None = None,
) -> tuple[bool, str]:
    """(serving, what was answered) for one Health/Check call; `tls` is (ca, cert, key)."""
    with _channel(address, tls, server_name) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return answer.status == health_pb2.HealthCheckResponse.SERVING, status


def _missing_tls(args: argparse.Namespace, env: Mapping[str, str]) -> str | None:
    """What the check lacks to reach a server configured by `env` with TLS; None: nothing."""
    if args.tls_ca is None and env.get("SERVER_TLS_CERT", "").strip():
        return (
            "the server serves TLS (SERVER_TLS_CERT is set): give the CA to trust with "
            f"--tls-ca or {CA_ENV}"
        )
    if args.tls_cert is None and env.get("SERVER_TLS_CLIENT_CA", "").strip():
        return (
            "the server requires client certificates (SERVER_TLS_CLIENT_CA is set): give one "
            f"with --tls-cert/--tls-key or {CERT_ENV}/{KEY_ENV}"
        )
    return None


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    parser = build_parser(env)
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_cert and not args.tls_ca):
        parser.error("--tls-cert and --tls-key go together, and with --tls-ca")
    missing = _missing_tls(args, env)
    if missing:  # plaintext against a TLS port only fails with an obscure UNAVAILABLE
        print(f"{args.address}: {missing}", file=sys.stderr)
        return 1
    tls = (args.tls_ca, args.tls_cert, args.tls_key)
    try:
        serving, status = check(args.address, args.service, args.timeout, tls, args.tls_server_name)
    except OSError as exc:  # an unreadable certificate file
        parser.error(str(exc))
    print(f"{args.address} service {args.service!r}: {status}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
