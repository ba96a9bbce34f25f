"""How the client checks the server and proves who it is: TLS, a client certificate, a token."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import grpc

# The bearer token the CLI sends when --token and --token-file are not given.
TOKEN_ENV = "IMGSERVE_TOKEN"
# What a server accepts as a token (server.api.security): it travels as an HTTP/2 header value,
# where anything else is refused before the call (gRPC's "INTERNAL: Invalid metadata").
_TOKEN = re.compile(r"[\x21-\x22\x24-\x7e]+")


def _read(what: str, path: str | os.PathLike[str]) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read {what} {os.fspath(path)!r}: {exc.strerror or exc}") from None


@dataclass(frozen=True)
class Credentials:
    """TLS settings and a bearer token for a channel; the default is plain TCP, no token.

    `tls` with no `root_certificates` trusts the system's CAs; certificates imply `tls`.
    A client certificate (`certificate_chain` with its `private_key`) is what servers
    started with --tls-client-ca require.
    """

    tls: bool = False
    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("a client certificate needs its private key (and the key its cert)")
        if self.token is not None and not _TOKEN.fullmatch(self.token):
            raise ValueError(
                "a token must be printable ASCII characters without spaces or '#' "
                "(what servers accept); check --token, --token-file or $" + TOKEN_ENV
            )

    @classmethod
    def from_files(
        cls,
        *,
        tls: bool = False,
        ca: str | os.PathLike[str] | None = None,
        cert: str | os.PathLike[str] | None = None,
        key: str | os.PathLike[str] | None = None,
        token: str | None = None,
        token_file: str | os.PathLike[str] | None = None,
    ) -> Credentials:
        """Credentials from PEM files and a token (or a file holding it); ValueError if unusable."""
        if token_file is not None:
            token = _read("token file", token_file).decode("utf-8", "replace").strip()
        return cls(
            tls=tls,
            root_certificates=None if ca is None else _read("CA file", ca),
            certificate_chain=None if cert is None else _read("client certificate", cert),
            private_key=None if key is None else _read("client key", key),
            token=token,
        )

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata that carries the token (none without one)."""
        return () if self.token is None else (("authorization", f"Bearer {self.token}"),)

    @property
    def secure(self) -> bool:
        """TLS asked for, or implied by a CA or a client certificate."""
        return self.tls or self.root_certificates is not None or self.certificate_chain is not None

    def channel_credentials(self) -> grpc.ChannelCredentials | None:
        if not self.secure:
            return None
        return grpc.ssl_channel_credentials(
            self.root_certificates, self.private_key, self.certificate_chain
        )
