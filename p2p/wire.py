"""Byte formats of the peer protocols: blob requests and responses, have queries, peer lists,
and the gossip topics that carry announcements and holdings.

Every decoder bounds what it accepts: a peer is untrusted, so a malformed frame raises
WireFormatError and the caller scores the sender down.
"""

from __future__ import annotations

import enum
import hashlib
import json
import struct
from dataclasses import dataclass

HASH_BYTES = 32

BLOB_PROTOCOL = "/rollproof/blob/1.0.0"
HAVE_PROTOCOL = "/rollproof/have/1.0.0"
PEERS_PROTOCOL = "/rollproof/peers/1.0.0"

BLOB_REQUEST_BYTES = HASH_BYTES + 8 + 1
BLOB_RESPONSE_HEADER_BYTES = 1 + 8
MAX_HASHES_PER_MESSAGE = 4096
MAX_PEER_LIST_BYTES = 64 * 1024
MAX_ADDRS_PER_PEER = 8
MAX_ADDR_CHARS = 256

_BLOB_REQUEST = struct.Struct(">32sQ?")
_BLOB_RESPONSE_HEADER = struct.Struct(">BQ")
_LENGTH_PREFIX = struct.Struct(">I")
LENGTH_PREFIX_BYTES = _LENGTH_PREFIX.size


class WireFormatError(ValueError):
    """A peer sent bytes that do not follow the protocol."""


class BlobStatus(enum.IntEnum):
    OK = 0
    NOT_FOUND = 1
    BUSY = 2
    BAD_REQUEST = 3
    ELSEWHERE = 4  # the origin has seeded this blob already: ask the peers that hold it


def sha256(data: bytes | bytearray) -> bytes:
    """The name of a blob (and the key of a gossiped manifest): its SHA-256."""
    return hashlib.sha256(data).digest()


def manifest_topic(run_id: str) -> str:
    return f"/rollproof/{run_id}/manifests"


def have_topic(run_id: str) -> str:
    return f"/rollproof/{run_id}/have"


@dataclass(frozen=True)
class BlobRequest:
    blob_hash: bytes
    offset: int  # resume a transfer: send the blob from this byte on
    last_resort: bool  # no peer could serve it: an origin must not answer ELSEWHERE


def encode_blob_request(request: BlobRequest) -> bytes:
    if len(request.blob_hash) != HASH_BYTES:
        raise ValueError(f"a blob hash has {HASH_BYTES} bytes, got {len(request.blob_hash)}")
    return _BLOB_REQUEST.pack(request.blob_hash, request.offset, request.last_resort)


def decode_blob_request(frame: bytes) -> BlobRequest:
    if len(frame) != BLOB_REQUEST_BYTES:
        raise WireFormatError(f"a blob request has {BLOB_REQUEST_BYTES} bytes, got {len(frame)}")
    if frame[-1] > 1:
        raise WireFormatError(f"the last-resort flag is 0 or 1, got {frame[-1]}")
    blob_hash, offset, last_resort = _BLOB_REQUEST.unpack(frame)
    return BlobRequest(blob_hash, offset, last_resort)


def encode_blob_response_header(status: BlobStatus, total_size: int) -> bytes:
    return _BLOB_RESPONSE_HEADER.pack(status, total_size)


def decode_blob_response_header(frame: bytes) -> tuple[BlobStatus, int]:
    if len(frame) != BLOB_RESPONSE_HEADER_BYTES:
        raise WireFormatError(f"a blob response header has {BLOB_RESPONSE_HEADER_BYTES} bytes, got {len(frame)}")
    status_code, total_size = _BLOB_RESPONSE_HEADER.unpack(frame)
    try:
        status = BlobStatus(status_code)
    except ValueError:
        raise WireFormatError(f"unknown blob status {status_code}") from None
    return status, total_size


def encode_hashes(hashes: list[bytes]) -> bytes:
    """A length-prefixed list of blob hashes (have queries, have answers, have gossip)."""
    if len(hashes) > MAX_HASHES_PER_MESSAGE:
        raise ValueError(f"at most {MAX_HASHES_PER_MESSAGE} hashes per message, got {len(hashes)}")
    if any(len(h) != HASH_BYTES for h in hashes):
        raise ValueError(f"every blob hash has {HASH_BYTES} bytes")
    return _LENGTH_PREFIX.pack(len(hashes)) + b"".join(hashes)


def hashes_frame_size(num_hashes: int) -> int:
    return LENGTH_PREFIX_BYTES + num_hashes * HASH_BYTES


def decode_num_hashes(prefix: bytes) -> int:
    (num_hashes,) = _LENGTH_PREFIX.unpack(prefix)
    if num_hashes > MAX_HASHES_PER_MESSAGE:
        raise WireFormatError(f"at most {MAX_HASHES_PER_MESSAGE} hashes per message, got {num_hashes}")
    return int(num_hashes)


def decode_hashes(frame: bytes) -> list[bytes]:
    if len(frame) < LENGTH_PREFIX_BYTES:
        raise WireFormatError("a hash list is shorter than its length prefix")
    num_hashes = decode_num_hashes(frame[:LENGTH_PREFIX_BYTES])
    if len(frame) != hashes_frame_size(num_hashes):
        raise WireFormatError(
            f"a list of {num_hashes} hashes has {hashes_frame_size(num_hashes)} bytes, got {len(frame)}"
        )
    body = frame[LENGTH_PREFIX_BYTES:]
    return [body[i : i + HASH_BYTES] for i in range(0, len(body), HASH_BYTES)]


@dataclass(frozen=True)
class PeerRecord:
    """A peer as the seed lists it: its peer id and the multiaddrs it listens on."""

    peer_id: str
    addrs: tuple[str, ...]


def encode_peer_list(records: list[PeerRecord]) -> bytes:
    body = json.dumps([{"id": r.peer_id, "addrs": list(r.addrs)} for r in records]).encode()
    if len(body) > MAX_PEER_LIST_BYTES:
        raise ValueError(f"a peer list is at most {MAX_PEER_LIST_BYTES} bytes, got {len(body)}")
    return _LENGTH_PREFIX.pack(len(body)) + body


def decode_peer_list_length(prefix: bytes) -> int:
    (length,) = _LENGTH_PREFIX.unpack(prefix)
    if length > MAX_PEER_LIST_BYTES:
        raise WireFormatError(f"a peer list is at most {MAX_PEER_LIST_BYTES} bytes, got {length}")
    return int(length)


def decode_peer_list_body(body: bytes) -> list[PeerRecord]:
    try:
        entries = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise WireFormatError(f"a peer list is not JSON: {error}") from None
    if not isinstance(entries, list):
        raise WireFormatError("a peer list is a JSON array")
    records = []
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), str):
            raise WireFormatError("a peer list entry is an object with a string id")
        addrs = entry.get("addrs")
        if (
            not isinstance(addrs, list)
            or len(addrs) > MAX_ADDRS_PER_PEER
            or not all(isinstance(a, str) and len(a) <= MAX_ADDR_CHARS for a in addrs)
        ):
            raise WireFormatError(f"a peer list entry has at most {MAX_ADDRS_PER_PEER} short string addrs")
        records.append(PeerRecord(peer_id=entry["id"], addrs=tuple(addrs)))
    return records
