"""TLS of the coordinator's gRPC side: how a client trusts the coordinator's certificate (a CA file
or a pinned SHA-256 fingerprint), certificate fingerprints, and the self-signed certificate of a
small deployment (`rollproof certs`)."""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
import os
import re
import ssl
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

CERTIFICATE_FILE = "coordinator.crt"
KEY_FILE = "coordinator.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
_FINGERPRINT = re.compile(r"^[0-9a-f]{64}$")


class TlsSetupError(ValueError):
    """A certificate, key or fingerprint is missing, unreadable or does not fit; the message says which."""


def normalize_fingerprint(text: str) -> str:
    """A SHA-256 certificate fingerprint as 64 lowercase hex digits; colons (as `openssl x509
    -fingerprint -sha256` prints them) and case are ignored."""
    fingerprint = text.strip().replace(":", "").lower()
    if not _FINGERPRINT.match(fingerprint):
        raise TlsSetupError(
            f"{text!r} is not a SHA-256 certificate fingerprint (64 hex digits, as `rollproof certs` prints)"
        )
    return fingerprint


def certificate_fingerprint(certificate_pem: str | bytes) -> str:
    """SHA-256 of the DER encoding of the first certificate in a PEM text."""
    pem = certificate_pem.decode() if isinstance(certificate_pem, bytes) else certificate_pem
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(pem)).hexdigest()


def is_loopback_host(host: str) -> bool:
    """Whether a host name or IP address (IPv6 with or without brackets) is this machine's loopback."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_address(address: str) -> tuple[str, int]:
    """HOST and PORT of a `HOST:PORT` or `[IPv6]:PORT` address."""
    host, separator, port = address.rpartition(":")
    if not separator or not host or not port.isdigit():
        raise TlsSetupError(f"{address!r} is not a HOST:PORT address")
    return host.strip("[]"), int(port)


def read_pem_certificates(path: Path, what: str) -> bytes:
    """The PEM bytes of a certificate file, checked to hold at least one certificate."""
    from cryptography import x509

    try:
        data = path.expanduser().read_bytes()
    except OSError as error:
        raise TlsSetupError(f"{what} {path}: cannot read it: {error.strerror or error}") from None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        raise TlsSetupError(f"{what} {path} is not a PEM certificate (-----BEGIN CERTIFICATE-----)") from None
    return data


@dataclass(frozen=True)
class CoordinatorTls:
    """How a client checks the coordinator's certificate: against `ca_file` (a PEM file of the CA,
    or of the self-signed certificate itself), or by the certificate's SHA-256 `fingerprint`.
    Neither: plaintext, which reaches only a coordinator on loopback."""

    ca_file: Path | None = None
    fingerprint: str = ""

    def __post_init__(self) -> None:
        if self.ca_file is not None and self.fingerprint:
            raise TlsSetupError("set coordinator_ca or coordinator_fingerprint, not both")
        if self.fingerprint:
            object.__setattr__(self, "fingerprint", normalize_fingerprint(self.fingerprint))

    @property
    def enabled(self) -> bool:
        return self.ca_file is not None or bool(self.fingerprint)


@dataclass(frozen=True)
class CertificatePair:
    certificate_file: Path
    key_file: Path
    fingerprint: str


def make_self_signed_pair(
    directory: Path, hosts: Sequence[str] = (), *, days: int = 3650, overwrite: bool = False
) -> CertificatePair:
    """An ECDSA P-256 key (file mode 0600) and a self-signed certificate for it, valid for loopback
    and `hosts` (names or IP addresses), written as coordinator.key and coordinator.crt."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    if days < 1:
        raise TlsSetupError(f"the certificate must be valid for at least one day, got {days}")
    directory = directory.expanduser()
    certificate_file, key_file = directory / CERTIFICATE_FILE, directory / KEY_FILE
    if not overwrite:
        for path in (certificate_file, key_file):
            if path.exists():
                raise TlsSetupError(f"{path} exists; pass --force to replace it")
    names = list(dict.fromkeys([*DEFAULT_HOSTS, *hosts]))
    alternative_names: list[x509.GeneralName] = []
    for name in names:
        try:
            alternative_names.append(x509.IPAddress(ipaddress.ip_address(name.strip("[]"))))
        except ValueError:
            alternative_names.append(x509.DNSName(name))
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0] if hosts else "rollproof coordinator")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName(alternative_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file.unlink(missing_ok=True)
    descriptor = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(key_pem)
    certificate_pem = certificate.public_bytes(serialization.Encoding.PEM)
    certificate_file.write_bytes(certificate_pem)
    return CertificatePair(certificate_file, key_file, certificate_fingerprint(certificate_pem))
