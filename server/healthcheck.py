"""`python -m server.healthcheck`: ask a running server's grpc.health.v1 service if it serves.

Exit status 0 when the service answers SERVING, 1 otherwise (NOT_SERVING while models load
or while draining, unknown service, no answer in time). The container image's HEALTHCHECK
runs it, so it imports only grpc and the health stubs: no server code, no numpy. Health needs
no token; a server with TLS needs `--tls-ca` (and, with client certificates required,
`--tls-cert`/`--tls-key`), which Kubernetes' own gRPC probes cannot send.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def build_parser() -> argparse.ArgumentParser:
    port = os.environ.get("SERVER_GRPC_PORT", "8001")
    parser = argparse.ArgumentParser(
        prog="python -m server.healthcheck",
        description="Exit 0 when the server's gRPC health service answers SERVING, else 1.",
    )
    parser.add_argument(
        "--address",
        default=f"localhost:{port}",
        help="HOST:PORT of the gRPC server (default: %(default)s, from SERVER_GRPC_PORT)",
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
    parser.add_argument("--tls-ca", type=Path, help="PEM CA bundle: connect with TLS, trusting it")
    parser.add_argument("--tls-cert", type=Path, help="PEM client certificate (mutual TLS)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    return parser


def _channel(address: str, ca: Path | None, cert: Path | None, key: Path | None) -> grpc.Channel:
    if ca is None:
        return grpc.insecure_channel(address)
    credentials = grpc.ssl_channel_credentials(
        root_certificates=ca.read_bytes(),
        private_key=key.read_bytes() if key else None,
        certificate_chain=cert.read_bytes() if cert else None,
    )
    return grpc.secure_channel(address, credentials)


def check(
    address: str,
    service: str = "",
    timeout: float = 3.0,
    tls: tuple[Path | None, Path | None, Path | None] = (None, None, None),
) -> tuple[bool, str]:
    """(serving, what was answered) for one Health/Check call; `tls` is (ca, cert, key)."""
    with _channel(address, *tls) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            answer = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(answer.status)
    return answer.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.tls_cert is None) != (args.tls_key is None) or (args.tls_cert and not args.tls_ca):
        parser.error("--tls-cert and --tls-key go together, and with --tls-ca")
    tls = (args.tls_ca, args.tls_cert, args.tls_key)
    try:
        serving, status = check(args.address, args.service, args.timeout, tls)
    except OSError as exc:  # an unreadable certificate file
        parser.error(str(exc))
    print(f"{args.address} service {args.service!r}: {status}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
