import os

import pytest

from protocol.identity import (
    Identity,
    KeyFileError,
    base58_decode,
    base58_encode,
    key_id,
    public_key_from_key_id,
    verify_signature,
)


def test_sign_verify_round_trip():
    identity = Identity.generate()
    signature = identity.sign(b"message")
    assert verify_signature(identity.public_key, b"message", signature)
    assert not verify_signature(identity.public_key, b"messagf", signature)
    assert not verify_signature(Identity.generate().public_key, b"message", signature)
    assert not verify_signature(identity.public_key, b"message", signature[:-1])


def test_key_file_is_owner_only_and_round_trips(tmp_path):
    path = tmp_path / "keys" / "node.key"
    identity = Identity.generate()
    identity.save(path)
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert Identity.load(path).public_key == identity.public_key


def test_loading_a_key_readable_by_others_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    os.chmod(path, 0o644)
    with pytest.raises(KeyFileError, match=f"chmod 600 {path}"):
        Identity.load(path)


def test_existing_key_is_not_overwritten(tmp_path):
    path = tmp_path / "node.key"
    Identity.generate().save(path)
    with pytest.raises(KeyFileError, match="already exists"):
        Identity.generate().save(path)


def test_missing_and_garbage_key_files(tmp_path):
    with pytest.raises(KeyFileError, match="rollproof keygen"):
        Identity.load(tmp_path / "absent.key")
    garbage = tmp_path / "garbage.key"
    garbage.write_bytes(b"not a key")
    garbage.chmod(0o600)
    with pytest.raises(KeyFileError, match="not a PEM private key"):
        Identity.load(garbage)


def test_load_or_create_is_stable(tmp_path):
    path = tmp_path / "node.key"
    assert Identity.load_or_create(path).key_id == Identity.load_or_create(path).key_id


def test_key_id_is_the_libp2p_peer_id():
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.peer.id import ID

    seed = bytes(range(32))
    peer_id = ID.from_pubkey(create_new_key_pair(seed).public_key).to_base58()
    assert Identity.from_seed(seed).key_id == peer_id
    assert peer_id.startswith("12D3KooW")


def test_key_id_inverts():
    identity = Identity.generate()
    assert public_key_from_key_id(identity.key_id) == identity.public_key
    with pytest.raises(ValueError, match="not the id of an Ed25519 key"):
        public_key_from_key_id(base58_encode(b"\x00\x01garbage"))
    with pytest.raises(ValueError):
        key_id(b"short")


@pytest.mark.parametrize("data", [b"", b"\x00", b"\x00\x00\x01", bytes(range(256))])
def test_base58_round_trip(data):
    assert base58_decode(base58_encode(data)) == data
