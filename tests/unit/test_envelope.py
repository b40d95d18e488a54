import json

import pytest

from protocol.envelope import (
    BadSignatureError,
    EnvelopeVerifier,
    MalformedEnvelopeError,
    ReplayedNonceError,
    StaleTimestampError,
    WrongMethodError,
    WrongSignerError,
    seal,
    signing_bytes,
)
from protocol.identity import Identity
from protocol.proto.envelope_pb2 import SignedEnvelope
from tests.conftest import VECTORS_DIR

METHOD = "/rollproof.v1.NodeService/Heartbeat"
NOW_MS = 1_800_000_000_000


def _identity(byte: int) -> Identity:
    return Identity.from_seed(bytes([byte]) * 32)


def test_round_trip_returns_exact_payload_and_signer():
    identity = _identity(1)
    envelope = seal(identity, METHOD, b"\x08\x07payload", timestamp_ms=NOW_MS)
    opened = EnvelopeVerifier().open(envelope, METHOD, current_ms=NOW_MS)
    assert opened.payload == b"\x08\x07payload"
    assert opened.signer_id == identity.key_id
    assert opened.signer_public_key == identity.public_key


def test_survives_wire_round_trip():
    envelope = seal(_identity(1), METHOD, b"abc", timestamp_ms=NOW_MS)
    received = SignedEnvelope.FromString(envelope.SerializeToString())
    assert EnvelopeVerifier().open(received, METHOD, current_ms=NOW_MS).payload == b"abc"


@pytest.mark.parametrize("field", ["payload", "signature", "nonce", "timestamp_ms"])
def test_flipped_bit_is_bad_signature(field):
    envelope = seal(_identity(1), METHOD, b"payload bytes", timestamp_ms=NOW_MS)
    if field == "timestamp_ms":
        envelope.timestamp_ms ^= 1
    else:
        value = bytearray(getattr(envelope, field))
        value[3] ^= 0x01
        setattr(envelope, field, bytes(value))
    with pytest.raises(BadSignatureError):
        EnvelopeVerifier().open(envelope, METHOD, current_ms=NOW_MS)


def test_another_nodes_key_is_wrong_signer():
    envelope = seal(_identity(1), METHOD, b"x", timestamp_ms=NOW_MS)
    with pytest.raises(WrongSignerError):
        EnvelopeVerifier().open(envelope, METHOD, expected_public_key=_identity(2).public_key, current_ms=NOW_MS)


def test_key_swapped_in_envelope_is_bad_signature():
    envelope = seal(_identity(1), METHOD, b"x", timestamp_ms=NOW_MS)
    envelope.signer_public_key = _identity(2).public_key
    with pytest.raises(BadSignatureError):
        EnvelopeVerifier().open(envelope, METHOD, current_ms=NOW_MS)


@pytest.mark.parametrize("offset_ms", [-61_000, 61_000])
def test_stale_or_future_timestamp(offset_ms):
    envelope = seal(_identity(1), METHOD, b"x", timestamp_ms=NOW_MS + offset_ms)
    with pytest.raises(StaleTimestampError):
        EnvelopeVerifier(window_ms=60_000).open(envelope, METHOD, current_ms=NOW_MS)


def test_replayed_nonce():
    verifier = EnvelopeVerifier()
    envelope = seal(_identity(1), METHOD, b"x", timestamp_ms=NOW_MS)
    verifier.open(envelope, METHOD, current_ms=NOW_MS)
    with pytest.raises(ReplayedNonceError):
        verifier.open(envelope, METHOD, current_ms=NOW_MS + 10)


def test_errors_are_distinct_types_with_distinct_codes():
    errors = [BadSignatureError, WrongSignerError, StaleTimestampError, ReplayedNonceError]
    assert len({e.code for e in errors}) == len(errors)
    for error in errors:
        assert issubclass(error, ValueError)
        assert sum(issubclass(error, other) for other in errors) == 1


def test_envelope_for_another_method_is_refused():
    envelope = seal(_identity(1), "/rollproof.v1.NodeService/LeaseWork", b"x", timestamp_ms=NOW_MS)
    with pytest.raises(WrongMethodError):
        EnvelopeVerifier().open(envelope, METHOD, current_ms=NOW_MS)


def test_malformed_fields():
    envelope = seal(_identity(1), METHOD, b"x", timestamp_ms=NOW_MS)
    envelope.nonce = b"short"
    with pytest.raises(MalformedEnvelopeError, match="nonce"):
        EnvelopeVerifier().open(envelope, METHOD, current_ms=NOW_MS)
    with pytest.raises(MalformedEnvelopeError, match="public key"):
        EnvelopeVerifier().open(SignedEnvelope(), METHOD, current_ms=NOW_MS)


def test_nonce_memory_is_bounded_and_replay_stays_impossible():
    verifier = EnvelopeVerifier(window_ms=60_000, max_nonces=100)
    identity = _identity(1)
    envelopes = [seal(identity, METHOD, b"x", timestamp_ms=NOW_MS + i) for i in range(300)]
    for envelope in envelopes:
        verifier.open(envelope, METHOD, current_ms=NOW_MS + 300)
    assert len(verifier._seen) <= 100
    # The oldest nonces were forgotten; their envelopes must still be refused.
    with pytest.raises(StaleTimestampError):
        verifier.open(envelopes[0], METHOD, current_ms=NOW_MS + 300)
    with pytest.raises(ReplayedNonceError):
        verifier.open(envelopes[-1], METHOD, current_ms=NOW_MS + 300)


def test_nonces_expire_with_the_window():
    verifier = EnvelopeVerifier(window_ms=1_000)
    identity = _identity(1)
    for i in range(50):
        verifier.open(seal(identity, METHOD, b"x", timestamp_ms=NOW_MS + i * 100), METHOD, current_ms=NOW_MS + i * 100)
    assert len(verifier._seen) <= 12


def test_signing_vector():
    """Any implementation of the protocol must produce these exact bytes and signature."""
    vector = json.loads((VECTORS_DIR / "envelope.json").read_text())
    identity = Identity.from_seed(bytes.fromhex(vector["seed"]))
    message = signing_bytes(
        vector["method"],
        bytes.fromhex(vector["payload"]),
        identity.public_key,
        vector["timestamp_ms"],
        bytes.fromhex(vector["nonce"]),
    )
    assert identity.public_key.hex() == vector["public_key"]
    assert identity.key_id == vector["key_id"]
    assert message.hex() == vector["signing_bytes"]
    assert identity.sign(message).hex() == vector["signature"]
