import hashlib

import pytest
from cryptography.hazmat.primitives import serialization
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.peer.id import ID

from node.config import P2PSection
from p2p import wire
from p2p.peers import key_pair_from_identity
from p2p.settings import P2PSettings
from protocol.identity import Identity

HASH = hashlib.sha256(b"blob").digest()


def test_blob_request_round_trips():
    request = wire.BlobRequest(HASH, offset=12345, last_resort=True)
    frame = wire.encode_blob_request(request)
    assert len(frame) == wire.BLOB_REQUEST_BYTES
    assert wire.decode_blob_request(frame) == request


@pytest.mark.parametrize("frame", [b"", HASH, wire.encode_blob_request(wire.BlobRequest(HASH, 0, False)) + b"x"])
def test_blob_request_of_wrong_length_is_refused(frame):
    with pytest.raises(wire.WireFormatError):
        wire.decode_blob_request(frame)


def test_blob_request_with_unknown_flag_is_refused():
    frame = wire.encode_blob_request(wire.BlobRequest(HASH, 0, False))[:-1] + b"\x07"
    with pytest.raises(wire.WireFormatError):
        wire.decode_blob_request(frame)


def test_blob_request_needs_a_sha256_hash():
    with pytest.raises(ValueError):
        wire.encode_blob_request(wire.BlobRequest(b"short", 0, False))


@pytest.mark.parametrize("status", list(wire.BlobStatus))
def test_blob_response_header_round_trips(status):
    frame = wire.encode_blob_response_header(status, 2**40 + 7)
    assert wire.decode_blob_response_header(frame) == (status, 2**40 + 7)


def test_blob_response_header_with_unknown_status_is_refused():
    with pytest.raises(wire.WireFormatError):
        wire.decode_blob_response_header(bytes([200]) + bytes(8))


def test_hash_list_round_trips_and_bounds_its_length():
    hashes = [hashlib.sha256(bytes([i])).digest() for i in range(5)]
    frame = wire.encode_hashes(hashes)
    assert len(frame) == wire.hashes_frame_size(5)
    assert wire.decode_hashes(frame) == hashes
    assert wire.decode_hashes(wire.encode_hashes([])) == []
    with pytest.raises(wire.WireFormatError):
        wire.decode_hashes(frame[:-1])
    with pytest.raises(wire.WireFormatError):
        wire.decode_num_hashes((wire.MAX_HASHES_PER_MESSAGE + 1).to_bytes(4, "big"))
    with pytest.raises(ValueError):
        wire.encode_hashes([b"not a hash"])


def test_peer_list_round_trips():
    records = [wire.PeerRecord("12D3KooWabc", ("/ip4/127.0.0.1/tcp/4001",)), wire.PeerRecord("12D3KooWdef", ())]
    frame = wire.encode_peer_list(records)
    length = wire.decode_peer_list_length(frame[:4])
    assert length == len(frame) - 4
    assert wire.decode_peer_list_body(frame[4:]) == records


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b'{"id": "x"}',
        b'[{"addrs": []}]',
        b'[{"id": "x", "addrs": "one"}]',
        b'[{"id": "x", "addrs": [1]}]',
        ('[{"id": "x", "addrs": [' + ",".join(['"a"'] * (wire.MAX_ADDRS_PER_PEER + 1)) + "]}]").encode(),
    ],
)
def test_malformed_peer_lists_are_refused(body):
    with pytest.raises(wire.WireFormatError):
        wire.decode_peer_list_body(body)


def test_oversized_peer_list_is_refused():
    with pytest.raises(wire.WireFormatError):
        wire.decode_peer_list_length((wire.MAX_PEER_LIST_BYTES + 1).to_bytes(4, "big"))


def test_topics_are_per_run():
    assert wire.manifest_topic("a") != wire.manifest_topic("b")
    assert wire.manifest_topic("a") != wire.have_topic("a")


def test_libp2p_peer_id_is_the_node_key_id():
    identity = Identity.from_seed(bytes(range(32)))
    key_pair = key_pair_from_identity(identity)
    assert ID.from_pubkey(key_pair.public_key).to_base58() == identity.key_id
    raw = identity.private_key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    assert key_pair.public_key.to_bytes() == create_new_key_pair(raw).public_key.to_bytes() == identity.public_key


def test_settings_come_from_the_node_config_section():
    section = P2PSection(listen="/ip4/0.0.0.0/tcp/4001", upload_bytes_per_s=1000, max_concurrent_uploads=2, max_peers=3)
    settings = P2PSettings.from_config(section, peer_patience_s=1.5)
    assert (settings.listen, settings.upload_bytes_per_s, settings.max_concurrent_uploads, settings.max_peers) == (
        "/ip4/0.0.0.0/tcp/4001",
        1000,
        2,
        3,
    )
    assert settings.peer_patience_s == 1.5
    with pytest.raises(ValueError):
        P2PSettings(max_peers=0)
