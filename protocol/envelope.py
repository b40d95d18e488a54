"""Signed envelopes: every request a node or the trainer sends.

The signature covers `signing_bytes(...)`: a domain tag followed by the RPC method, the
exact payload bytes, the signer's public key, the timestamp and the nonce, each length-
prefixed. The receiver verifies those bytes as they arrived, never a re-serialization.
"""

from __future__ import annotations

import heapq
import os
import struct
import threading
import time
from dataclasses import dataclass

from protocol.identity import PUBLIC_KEY_BYTES, SIGNATURE_BYTES, Identity, key_id, verify_signature
from protocol.proto.envelope_pb2 import SignedEnvelope

ENVELOPE_DOMAIN = b"rollproof/v1/envelope\x00"
NONCE_BYTES = 16
DEFAULT_WINDOW_MS = 60_000
DEFAULT_MAX_NONCES = 1_000_000


class EnvelopeError(ValueError):
    """Base class: the envelope was refused. `code` names the check that failed."""

    code = "bad_envelope"


class MalformedEnvelopeError(EnvelopeError):
    code = "malformed_envelope"


class WrongMethodError(EnvelopeError):
    code = "wrong_method"


class BadSignatureError(EnvelopeError):
    code = "bad_signature"


class WrongSignerError(EnvelopeError):
    code = "wrong_signer"


class StaleTimestampError(EnvelopeError):
    code = "stale_timestamp"


class ReplayedNonceError(EnvelopeError):
    code = "replayed_nonce"


def _length_prefixed(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def signing_bytes(method: str, payload: bytes, public_key: bytes, timestamp_ms: int, nonce: bytes) -> bytes:
    """The exact bytes an envelope's signature covers."""
    return b"".join(
        [
            ENVELOPE_DOMAIN,
            _length_prefixed(method.encode()),
            _length_prefixed(payload),
            _length_prefixed(public_key),
            struct.pack(">q", timestamp_ms),
            _length_prefixed(nonce),
        ]
    )


def method_name(service: str, method: str) -> str:
    """The full gRPC method name an envelope is signed for, e.g. /rollproof.v1.NodeService/Heartbeat."""
    return f"/rollproof.v1.{service}/{method}"


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def seal(
    identity: Identity,
    method: str,
    payload: bytes,
    *,
    timestamp_ms: int | None = None,
    nonce: bytes | None = None,
) -> SignedEnvelope:
    """Sign `payload` (already serialized) for `method`."""
    timestamp_ms = now_ms() if timestamp_ms is None else timestamp_ms
    nonce = os.urandom(NONCE_BYTES) if nonce is None else nonce
    public_key = identity.public_key
    signature = identity.sign(signing_bytes(method, payload, public_key, timestamp_ms, nonce))
    return SignedEnvelope(
        payload=payload,
        signer_public_key=public_key,
        timestamp_ms=timestamp_ms,
        nonce=nonce,
        signature=signature,
        method=method,
    )


@dataclass(frozen=True)
class OpenedEnvelope:
    """A verified envelope: who signed which payload bytes."""

    signer_public_key: bytes
    signer_id: str
    payload: bytes
    timestamp_ms: int


class EnvelopeVerifier:
    """Checks signature, freshness and nonce uniqueness of incoming envelopes.

    Nonces are remembered until their timestamp leaves the freshness window, so memory
    is bounded by the request rate times the window. When more than `max_nonces` are
    held, the oldest are forgotten and every envelope not newer than the newest
    forgotten one is refused as stale: replay stays impossible under any load.
    """

    def __init__(self, *, window_ms: int = DEFAULT_WINDOW_MS, max_nonces: int = DEFAULT_MAX_NONCES):
        if window_ms <= 0 or max_nonces <= 0:
            raise ValueError("window_ms and max_nonces must be positive")
        self.window_ms = window_ms
        self.max_nonces = max_nonces
        self._seen: set[tuple[bytes, bytes]] = set()
        self._expiry_heap: list[tuple[int, bytes, bytes]] = []
        self._forgotten_before_ms = -(2**63)
        self._lock = threading.Lock()

    def open(
        self,
        envelope: SignedEnvelope,
        method: str,
        *,
        expected_public_key: bytes | None = None,
        current_ms: int | None = None,
    ) -> OpenedEnvelope:
        """Verify `envelope` for `method`; raise an EnvelopeError subclass on any failure."""
        if len(envelope.signer_public_key) != PUBLIC_KEY_BYTES:
            raise MalformedEnvelopeError(
                f"signer public key has {len(envelope.signer_public_key)} bytes, expected {PUBLIC_KEY_BYTES}"
            )
        if len(envelope.signature) != SIGNATURE_BYTES:
            raise MalformedEnvelopeError(f"signature has {len(envelope.signature)} bytes, expected {SIGNATURE_BYTES}")
        if len(envelope.nonce) != NONCE_BYTES:
            raise MalformedEnvelopeError(f"nonce has {len(envelope.nonce)} bytes, expected {NONCE_BYTES}")
        if envelope.method != method:
            raise WrongMethodError(f"envelope was signed for {envelope.method!r}, not {method!r}")
        if expected_public_key is not None and envelope.signer_public_key != expected_public_key:
            raise WrongSignerError(
                f"envelope is signed by {key_id(envelope.signer_public_key)}, expected {key_id(expected_public_key)}"
            )
        message = signing_bytes(
            envelope.method, envelope.payload, envelope.signer_public_key, envelope.timestamp_ms, envelope.nonce
        )
        if not verify_signature(envelope.signer_public_key, message, envelope.signature):
            raise BadSignatureError("signature does not match the payload and signer key")
        current_ms = now_ms() if current_ms is None else current_ms
        skew_ms = envelope.timestamp_ms - current_ms
        if abs(skew_ms) > self.window_ms:
            raise StaleTimestampError(
                f"timestamp is {skew_ms / 1000:+.1f}s from the receiver's clock; "
                f"the window is ±{self.window_ms / 1000:.0f}s (check the sender's clock)"
            )
        self._remember_nonce(envelope, current_ms)
        return OpenedEnvelope(
            signer_public_key=envelope.signer_public_key,
            signer_id=key_id(envelope.signer_public_key),
            payload=envelope.payload,
            timestamp_ms=envelope.timestamp_ms,
        )

    def _remember_nonce(self, envelope: SignedEnvelope, current_ms: int) -> None:
        key = (envelope.signer_public_key, envelope.nonce)
        with self._lock:
            while self._expiry_heap and self._expiry_heap[0][0] < current_ms - self.window_ms:
                _, signer, nonce = heapq.heappop(self._expiry_heap)
                self._seen.discard((signer, nonce))
            if envelope.timestamp_ms <= self._forgotten_before_ms:
                raise StaleTimestampError(
                    "timestamp predates the replay cache's memory under current load; resend with a fresh envelope"
                )
            if key in self._seen:
                raise ReplayedNonceError("this envelope's nonce was already used by its signer")
            self._seen.add(key)
            heapq.heappush(self._expiry_heap, (envelope.timestamp_ms, *key))
            while len(self._seen) > self.max_nonces:
                timestamp_ms, signer, nonce = heapq.heappop(self._expiry_heap)
                self._seen.discard((signer, nonce))
                self._forgotten_before_ms = max(self._forgotten_before_ms, timestamp_ms)
