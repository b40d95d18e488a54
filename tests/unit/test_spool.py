import os

from node.spool import Spool


def test_put_pending_remove(tmp_path):
    spool = Spool(tmp_path / "spool")
    first = spool.put(b"batch one")
    second = spool.put(b"batch two")
    os.utime(first.path, ns=(1, 1))
    assert [b.payload for b in spool.pending()] == [b"batch one", b"batch two"]
    spool.remove(first)
    assert [b.batch_hash for b in Spool(tmp_path / "spool").pending()] == [second.batch_hash]


def test_same_payload_is_one_entry(tmp_path):
    spool = Spool(tmp_path)
    spool.put(b"x")
    spool.put(b"x")
    assert len(spool) == 1


def test_torn_files_are_dropped(tmp_path):
    spool = Spool(tmp_path)
    entry = spool.put(b"complete")
    entry.path.write_bytes(b"compl")
    (tmp_path / "half.tmp").write_bytes(b"partial")
    reopened = Spool(tmp_path)
    assert reopened.pending() == []
    assert not (tmp_path / "half.tmp").exists()
