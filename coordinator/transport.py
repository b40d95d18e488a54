"""How the coordinator's gRPC transport is secured: TLS server credentials from server.tls_cert and
server.tls_key, and the rule that calls carrying the operator token (admin, validators) come over
TLS or from this machine's loopback."""

from __future__ import annotations

from pathlib import Path

import grpc

from coordinator.gate import GateError, peer_host
from protocol.tls import TlsSetupError, is_loopback_host, read_pem_certificates


def server_credentials(certificate_file: Path, key_file: Path) -> grpc.ServerCredentials:
    """Credentials of a certificate chain (PEM, the server's own certificate first) and its
    unencrypted PEM private key, checked to belong together."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    certificate_pem = read_pem_certificates(certificate_file, "server.tls_cert")
    try:
        key_pem = key_file.expanduser().read_bytes()
    except OSError as error:
        raise TlsSetupError(f"server.tls_key {key_file}: cannot read it: {error.strerror or error}") from None
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as error:
        raise TlsSetupError(f"server.tls_key {key_file} is not an unencrypted PEM private key: {error}") from None
    public = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    certificate = x509.load_pem_x509_certificates(certificate_pem)[0]
    if key.public_key().public_bytes(*public) != certificate.public_key().public_bytes(*public):
        raise TlsSetupError(
            f"server.tls_key {key_file} is not the key of server.tls_cert {certificate_file}: "
            "give the pair that was made together"
        )
    return grpc.ssl_server_credentials([(key_pem, certificate_pem)])


def require_private_transport(context: grpc.aio.ServicerContext) -> None:
    """Refuse a call that carries the operator token over plaintext from another machine."""
    if context.auth_context().get("transport_security_type") == [b"ssl"]:
        return
    peer = context.peer()
    if peer.startswith("unix") or is_loopback_host(peer_host(peer)):
        return
    raise GateError(
        grpc.StatusCode.PERMISSION_DENIED,
        "operator calls over plaintext are accepted from loopback only: serve TLS (server.tls_cert, "
        "server.tls_key) and connect with coordinator_ca or coordinator_fingerprint",
    )
