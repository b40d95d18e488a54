"""Peer-to-peer distribution of policy blobs over libp2p (see host.P2PHost)."""

from p2p.fetcher import BlobFetchError
from p2p.host import P2PHost, P2PHostError
from p2p.settings import P2PSettings
from p2p.uploader import EgressCounters

__all__ = ["BlobFetchError", "EgressCounters", "P2PHost", "P2PHostError", "P2PSettings"]
