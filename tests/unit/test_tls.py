"""TLS of the gRPC side: `rollproof certs`, the coordinator's server credentials, the one channel
builder of every client (CA file, pinned fingerprint, plaintext for loopback only) against a real
TLS server, and the rule that operator calls over plaintext come from loopback."""

import asyncio
import stat
from concurrent import futures

import grpc
import pytest
from cryptography import x509

from coordinator.gate import GateError
from coordinator.transport import require_private_transport, server_credentials
from protocol.channel import open_aio_channel, open_channel
from protocol.tls import (
    CoordinatorTls,
    TlsSetupError,
    certificate_fingerprint,
    is_loopback_host,
    make_self_signed_pair,
    normalize_fingerprint,
)
from rollproof.cli import main as rollproof_main

ECHO = "/test.Echo/Call"


def _echo(request, context):
    return request


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_self_signed_pair(tmp_path_factory.mktemp("tls"))


def start_echo_server(host: str, pair) -> tuple[grpc.Server, int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers(
        [grpc.method_handlers_generic_handler("test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(_echo)})]
    )
    port = server.add_secure_port(f"{host}:0", server_credentials(pair.certificate_file, pair.key_file))
    server.start()
    return server, port


@pytest.fixture(scope="module")
def tls_address(pair):
    server, port = start_echo_server("127.0.0.1", pair)
    yield f"127.0.0.1:{port}"
    server.stop(grace=None)


def test_certs_command_writes_a_pair_that_the_coordinator_loads(tmp_path, capsys):
    hosts = ["--host", "coordinator.example.org", "--host", "10.1.2.3"]
    assert rollproof_main(["certs", "--out", str(tmp_path), *hosts]) == 0
    printed = capsys.readouterr().out
    certificate_pem = (tmp_path / "coordinator.crt").read_bytes()
    assert f"fingerprint (SHA-256): {certificate_fingerprint(certificate_pem)}" in printed
    assert stat.S_IMODE((tmp_path / "coordinator.key").stat().st_mode) == 0o600
    names = (
        x509.load_pem_x509_certificate(certificate_pem)
        .extensions.get_extension_for_class(x509.SubjectAlternativeName)
        .value
    )
    assert set(names.get_values_for_type(x509.DNSName)) == {"localhost", "coordinator.example.org"}
    assert {str(ip) for ip in names.get_values_for_type(x509.IPAddress)} == {"127.0.0.1", "::1", "10.1.2.3"}
    server_credentials(tmp_path / "coordinator.crt", tmp_path / "coordinator.key")

    assert rollproof_main(["certs", "--out", str(tmp_path)]) == 2
    assert "exists; pass --force" in capsys.readouterr().err


def test_server_credentials_name_a_missing_unreadable_or_mismatched_file(tmp_path, pair):
    other = make_self_signed_pair(tmp_path / "other")
    with pytest.raises(TlsSetupError, match=r"server\.tls_cert .*absent\.crt: cannot read it"):
        server_credentials(tmp_path / "absent.crt", pair.key_file)
    with pytest.raises(TlsSetupError, match=r"server\.tls_key .*absent\.key: cannot read it"):
        server_credentials(pair.certificate_file, tmp_path / "absent.key")
    with pytest.raises(TlsSetupError, match="is not a PEM certificate"):
        server_credentials(pair.key_file, pair.key_file)
    with pytest.raises(TlsSetupError, match="is not an unencrypted PEM private key"):
        server_credentials(pair.certificate_file, pair.certificate_file)
    with pytest.raises(TlsSetupError, match="is not the key of server.tls_cert"):
        server_credentials(pair.certificate_file, other.key_file)


def _echo_call(channel: grpc.Channel) -> bytes:
    return channel.unary_unary(ECHO)(b"ping", timeout=30)


def test_a_client_reaches_a_tls_coordinator_by_its_ca_file_or_pinned_fingerprint(tls_address, pair):
    with open_channel(tls_address, CoordinatorTls(ca_file=pair.certificate_file)) as channel:
        assert _echo_call(channel) == b"ping"
    colon_form = ":".join(pair.fingerprint[i : i + 2] for i in range(0, 64, 2)).upper()
    with open_channel(tls_address, CoordinatorTls(fingerprint=colon_form)) as channel:
        assert _echo_call(channel) == b"ping"

    async def aio_call() -> bytes:
        async with open_aio_channel(tls_address, CoordinatorTls(ca_file=pair.certificate_file)) as channel:
            return await channel.unary_unary(ECHO)(b"ping", timeout=30)

    assert asyncio.run(aio_call()) == b"ping"


def test_a_pinned_certificate_is_accepted_under_a_name_it_does_not_carry(pair):
    """127.0.0.2 is loopback but not in the certificate: the CA file's name check refuses it, the
    pinned fingerprint identifies the certificate whatever name was dialed."""
    server, port = start_echo_server("127.0.0.2", pair)
    try:
        with open_channel(f"127.0.0.2:{port}", CoordinatorTls(fingerprint=pair.fingerprint)) as channel:
            assert _echo_call(channel) == b"ping"
        with (
            open_channel(f"127.0.0.2:{port}", CoordinatorTls(ca_file=pair.certificate_file)) as channel,
            pytest.raises(grpc.RpcError) as refused,
        ):
            _echo_call(channel)
        assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        server.stop(grace=None)


def test_a_wrong_fingerprint_or_ca_is_refused(tls_address, pair, tmp_path):
    other = make_self_signed_pair(tmp_path)
    with pytest.raises(TlsSetupError, match=f"with fingerprint {pair.fingerprint}, not the pinned {other.fingerprint}"):
        open_channel(tls_address, CoordinatorTls(fingerprint=other.fingerprint))
    with (
        open_channel(tls_address, CoordinatorTls(ca_file=other.certificate_file)) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        _echo_call(channel)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "CERTIFICATE_VERIFY_FAILED" in refused.value.details()


def test_a_pinned_fingerprint_needs_a_reachable_tls_coordinator(pair):
    with pytest.raises(TlsSetupError, match="cannot fetch the TLS certificate of the coordinator at 127.0.0.1:1"):
        open_channel("127.0.0.1:1", CoordinatorTls(fingerprint=pair.fingerprint))


def test_plaintext_reaches_only_a_coordinator_on_loopback(tmp_path):
    with pytest.raises(TlsSetupError, match="not on loopback, and plaintext gRPC is for loopback only"):
        open_channel("coordinator.example.org:7470")
    with pytest.raises(TlsSetupError, match="coordinator_ca .*absent.pem: cannot read it"):
        open_channel("coordinator.example.org:7470", CoordinatorTls(ca_file=tmp_path / "absent.pem"))
    for address in ("127.0.0.1:7470", "localhost:7470", "[::1]:7470"):
        open_channel(address).close()


def test_fingerprints_and_hosts():
    assert normalize_fingerprint(" " + "AB:" * 31 + "cd ") == "ab" * 31 + "cd"
    for bad in ("", "ab" * 31, "zz" * 32):
        with pytest.raises(TlsSetupError, match="not a SHA-256 certificate fingerprint"):
            normalize_fingerprint(bad)
    with pytest.raises(TlsSetupError, match="not both"):
        CoordinatorTls(ca_file=__file__, fingerprint="ab" * 32)
    assert all(map(is_loopback_host, ["localhost", "127.0.0.1", "127.3.2.1", "::1", "[::1]"]))
    assert not any(map(is_loopback_host, ["10.0.0.1", "coordinator.example.org", "0.0.0.0", "::"]))


class FakeContext:
    def __init__(self, security: bytes, peer: str):
        self.security = security
        self._peer = peer

    def auth_context(self):
        return {"transport_security_type": [self.security]}

    def peer(self) -> str:
        return self._peer


@pytest.mark.parametrize("peer", ["ipv4:10.0.0.7:51000", "ipv6:[2001:db8::1]:51000", "ipv6:%5B2001:db8::1%5D:51000"])
def test_operator_calls_over_plaintext_from_another_machine_are_refused(peer):
    with pytest.raises(GateError, match="accepted from loopback only") as refused:
        require_private_transport(FakeContext(b"insecure", peer))
    assert refused.value.status == grpc.StatusCode.PERMISSION_DENIED
    require_private_transport(FakeContext(b"ssl", peer))


@pytest.mark.parametrize(
    "peer", ["ipv4:127.0.0.1:51000", "ipv6:[::1]:51000", "ipv6:%5B::1%5D:51000", "unix:/run/c.sock"]
)
def test_operator_calls_over_plaintext_from_loopback_are_accepted(peer):
    require_private_transport(FakeContext(b"insecure", peer))


def test_a_real_call_passes_the_transport_check_over_loopback_plaintext_and_over_tls(pair):
    async def guarded(request, context):
        try:
            require_private_transport(context)
        except GateError as error:
            await context.abort(error.status, str(error))
        return b"admitted"

    async def run() -> list[bytes]:
        server = grpc.aio.server()
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler("test.Echo", {"Call": grpc.unary_unary_rpc_method_handler(guarded)})]
        )
        plain_port = server.add_insecure_port("127.0.0.1:0")
        tls_port = server.add_secure_port("127.0.0.1:0", server_credentials(pair.certificate_file, pair.key_file))
        await server.start()
        try:
            answers = []
            for address, tls in [
                (f"127.0.0.1:{plain_port}", CoordinatorTls()),
                (f"127.0.0.1:{tls_port}", CoordinatorTls(ca_file=pair.certificate_file)),
            ]:
                async with open_aio_channel(address, tls) as channel:
                    answers.append(await channel.unary_unary(ECHO)(b"", timeout=30))
            return answers
        finally:
            await server.stop(grace=None)

    assert asyncio.run(run()) == [b"admitted", b"admitted"]
