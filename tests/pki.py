"""Certificates for TLS tests, made with `cryptography` (EC P-256, valid for a day).

A CA, a server certificate for localhost and 127.0.0.1, a client certificate from the same
CA, and a second CA, with a client certificate of its own, that the servers do not trust.
"""

from __future__ import annotations

import datetime
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_client_cert: Path
    other_client_key: Path

    def server_args(self) -> tuple[str, ...]:
        return ("--tls-cert", str(self.server_cert), "--tls-key", str(self.server_key))

    def client(self, trusted: bool = True) -> tuple[Path, Path]:
        """(certificate, key) of a client cert signed by our CA, or by the untrusted one."""
        if trusted:
            return self.client_cert, self.client_key
        return self.other_client_cert, self.other_client_key


def _certificate(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey] | None = None,
    *,
    usage: x509.ObjectIdentifier | None = None,
    hosts: tuple[str, ...] = (),
) -> x509.Certificate:
    """A CA certificate when `usage` is None (self-signed without `issuer`), else a leaf."""
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer[0].subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=usage is None, path_length=None), critical=True)
    )
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    if hosts:
        names = [
            x509.IPAddress(ipaddress.ip_address(h)) if h[0].isdigit() else x509.DNSName(h)
            for h in hosts
        ]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer[1] if issuer else key, hashes.SHA256())


def make_pki(folder: Path) -> Pki:
    """Write the certificates and keys (PEM, unencrypted keys) into `folder`."""
    files: dict[str, Path] = {}

    def save(name: str, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        files[name] = folder / f"{name}.pem"
        files[name].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        files[f"{name}_key"] = folder / f"{name}.key"
        files[f"{name}_key"].write_bytes(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )

    for ca_name, prefix in (("test CA", ""), ("untrusted CA", "other_")):
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca = _certificate(ca_name, ca_key)
        save(f"{prefix}ca", ca, ca_key)
        key = ec.generate_private_key(ec.SECP256R1())
        client = _certificate("client", key, (ca, ca_key), usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        save(f"{prefix}client", client, key)
        if not prefix:
            key = ec.generate_private_key(ec.SECP256R1())
            server = _certificate(
                "localhost",
                key,
                (ca, ca_key),
                usage=ExtendedKeyUsageOID.SERVER_AUTH,
                hosts=("localhost", "127.0.0.1"),
            )
            save("server", server, key)
    return Pki(
        ca=files["ca"],
        server_cert=files["server"],
        server_key=files["server_key"],
        client_cert=files["client"],
        client_key=files["client_key"],
        other_ca=files["other_ca"],
        other_client_cert=files["other_client"],
        other_client_key=files["other_client_key"],
    )
