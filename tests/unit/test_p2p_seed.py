import hashlib

import pytest

from coordinator.blobstore import BlobStore
from coordinator.seed import blob_source_of, trainer_manifest_verifier
from protocol.identity import Identity
from protocol.proto import policy_pb2

TRAINER = Identity.from_seed(bytes(range(32)))


def test_the_seed_serves_blobs_from_the_coordinator_store(tmp_path):
    store = BlobStore(tmp_path, run_id="r", trainer_public_key=TRAINER.public_key)
    blob = b"policy bytes"
    store.put_blob(hashlib.sha256(blob).digest(), blob)
    source = blob_source_of(store)
    assert source(hashlib.sha256(blob).digest()) == blob
    assert source(hashlib.sha256(b"absent").digest()) is None


def test_the_seed_refuses_announcements_the_trainer_did_not_sign():
    verify = trainer_manifest_verifier(TRAINER.public_key)
    impostor = Identity.generate()
    payload = policy_pb2.PolicyManifest(run_id="r", version=1).SerializeToString()
    forged = policy_pb2.SignedManifest(
        manifest=payload, signer_public_key=impostor.public_key, signature=impostor.sign(payload)
    )
    for junk in (b"\x0a\x03not a manifest", forged.SerializeToString()):
        with pytest.raises(ValueError):
            verify(junk)
