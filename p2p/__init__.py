"""Peer-to-peer distribution of policy blobs over libp2p (see host.P2PHost)."""

from p2p.host import P2PHost, P2PHostError
from p2p.service import BlobFetchError, EgressCounters
from p2p.settings import P2PSettings

__all__ = ["BlobFetchError", "EgressCounters", "P2PHost", "P2PHostError", "P2PSettings"]
