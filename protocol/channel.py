"""The one way a client (node, trainer, validator, admin CLI) opens a gRPC channel to the
coordinator: TLS checked against a CA file or a pinned certificate fingerprint, plaintext only to a
coordinator on loopback, with the message-size limits of the caller."""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

from protocol.tls import (
    CoordinatorTls,
    TlsSetupError,
    certificate_fingerprint,
    is_loopback_host,
    read_pem_certificates,
    split_address,
)

if TYPE_CHECKING:
    import grpc

CERTIFICATE_FETCH_TIMEOUT_S = 10.0
DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024 * 1024
# The channel's own wait between connection attempts grows to 120 s by default: after a long
# coordinator outage a client would stay cut off that long after the coordinator is back, whatever
# its retry policy (protocol/retry.py) says. Capped here, a restart is noticed within seconds.
MAX_RECONNECT_BACKOFF_MS = 5_000


def pinned_certificate(address: str, fingerprint: str) -> bytes:
    """The coordinator's certificate (PEM), fetched from `address` and checked against the pinned
    fingerprint. It then serves as the channel's only root: later connections must present it."""
    host, port = split_address(address)
    try:
        pem = ssl.get_server_certificate((host, port), timeout=CERTIFICATE_FETCH_TIMEOUT_S)
    except (OSError, ssl.SSLError) as error:
        raise TlsSetupError(
            f"cannot fetch the TLS certificate of the coordinator at {address} to check its pinned fingerprint: {error}"
        ) from None
    presented = certificate_fingerprint(pem)
    if presented != fingerprint:
        raise TlsSetupError(
            f"the coordinator at {address} presented a certificate with fingerprint {presented}, "
            f"not the pinned {fingerprint}: refusing to connect"
        )
    return pem.encode()


def certificate_name(certificate_pem: bytes) -> str:
    """A name the certificate is valid for (its first subject alternative name)."""
    from cryptography import x509

    certificate = x509.load_pem_x509_certificate(certificate_pem)
    try:
        names = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise TlsSetupError("the pinned certificate names no host (no subject alternative name)") from None
    for name in names:
        if isinstance(name, (x509.DNSName, x509.IPAddress)):
            return str(name.value)
    raise TlsSetupError("the pinned certificate names no host (no DNS or IP subject alternative name)")


def channel_security(address: str, tls: CoordinatorTls) -> tuple[grpc.ChannelCredentials | None, list[tuple[str, str]]]:
    """TLS credentials for `address` (None: plaintext, loopback only) and the channel options they need.
    A pinned certificate is checked by its fingerprint, so the channel checks it for a name it carries
    rather than for the name dialed."""
    import grpc

    if tls.ca_file is not None:
        return grpc.ssl_channel_credentials(read_pem_certificates(tls.ca_file, "coordinator_ca")), []
    if tls.fingerprint:
        certificate_pem = pinned_certificate(address, tls.fingerprint)
        name_override = [("grpc.ssl_target_name_override", certificate_name(certificate_pem))]
        return grpc.ssl_channel_credentials(certificate_pem), name_override
    host, _ = split_address(address)
    if not is_loopback_host(host):
        raise TlsSetupError(
            f"the coordinator at {address} is not on loopback, and plaintext gRPC is for loopback only: "
            "set coordinator_ca (its CA or self-signed certificate) or coordinator_fingerprint "
            "(the SHA-256 fingerprint `rollproof certs` printed)"
        )
    return None, []


def channel_options(max_message_bytes: int) -> list[tuple[str, int | str]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def open_channel(
    address: str, tls: CoordinatorTls = CoordinatorTls(), *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> grpc.Channel:
    import grpc

    credentials, security_options = channel_security(address, tls)
    options = channel_options(max_message_bytes) + security_options
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    return grpc.secure_channel(address, credentials, options=options)


def open_aio_channel(
    address: str, tls: CoordinatorTls = CoordinatorTls(), *, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
) -> grpc.aio.Channel:
    import grpc

    credentials, security_options = channel_security(address, tls)
    options = channel_options(max_message_bytes) + security_options
    if credentials is None:
        return grpc.aio.insecure_channel(address, options=options)
    return grpc.aio.secure_channel(address, credentials, options=options)
