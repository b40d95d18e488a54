"""Settings of one peer host, and the callables through which it meets its owner's storage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

# Bytes of the blob named by a SHA-256 hash, or None when this host does not hold it.
BlobSource = Callable[[bytes], "bytes | None"]
# Store a blob (already checked against its hash) under its hash.
BlobSink = Callable[[bytes, bytes], None]
# Check a serialized SignedManifest (trainer signature); return what the owner wants to keep
# (its parsed manifest); raise ValueError when it does not verify.
VerifyManifest = Callable[[bytes], object]
# Fetch one blob by hash from the origin outside the peer network (the coordinator's HTTP/gRPC).
OriginFetch = Callable[[bytes], bytes]
# Called in the peer thread for every new verified announcement: (signed manifest bytes,
# what VerifyManifest returned, peer id that published it). It must return quickly.
AnnouncementHandler = Callable[[bytes, object, str], None]


class P2PConfigLike(Protocol):
    """The fields of node.config.P2PSection that the host uses."""

    listen: str
    public_address: str
    upload_bytes_per_s: int
    max_concurrent_uploads: int
    max_peers: int


@dataclass(frozen=True)
class P2PSettings:
    listen: str = "/ip4/127.0.0.1/tcp/0"
    public_address: str = ""  # multiaddr others should dial (without /p2p); empty: the listen address
    upload_bytes_per_s: int = 50 * 1024 * 1024
    max_concurrent_uploads: int = 4
    max_peers: int = 16
    max_concurrent_downloads: int = 4
    chunk_bytes: int = 64 * 1024
    stall_timeout_s: float = 3.0  # a transfer that delivers nothing for this long is abandoned
    peer_patience_s: float = 5.0  # how long to wait for busy peers that hold a blob before asking the origin
    discovery_interval_s: float = 1.0
    have_batch_interval_s: float = 0.02
    # A seed serves each blob to at most this many peers while it does not come as a last resort;
    # the others get ELSEWHERE and fetch it from those peers (super-seeding).
    origin_copies_per_blob: int = 1
    connect_timeout_s: float = 5.0

    def __post_init__(self) -> None:
        for name in (
            "upload_bytes_per_s",
            "max_concurrent_uploads",
            "max_peers",
            "max_concurrent_downloads",
            "chunk_bytes",
            "origin_copies_per_blob",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"p2p setting {name} must be at least 1, got {getattr(self, name)}")

    @classmethod
    def from_config(cls, section: P2PConfigLike, **overrides: object) -> P2PSettings:
        fields: dict[str, object] = {
            "listen": section.listen,
            "public_address": section.public_address,
            "upload_bytes_per_s": section.upload_bytes_per_s,
            "max_concurrent_uploads": section.max_concurrent_uploads,
            "max_peers": section.max_peers,
        }
        fields.update(overrides)
        return cls(**fields)  # type: ignore[arg-type]
