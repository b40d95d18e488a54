"""The node's spool: every finished batch is on disk before it is sent, and leaves only
when its receipt has arrived. After a crash or a lost link the node re-sends what is
left; the coordinator answers a re-send of the same payload with the stored receipt."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

_SUFFIX = ".batch"


@dataclass(frozen=True)
class SpooledBatch:
    batch_hash: str  # hex SHA-256 of the payload: the coordinator's idempotency key
    payload: bytes  # serialized RolloutBatch, re-signed with a fresh envelope on each send
    path: Path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Spool:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink()

    def put(self, payload: bytes) -> SpooledBatch:
        """Write durably (temp file, fsync, rename, fsync of the directory)."""
        batch_hash = hashlib.sha256(payload).hexdigest()
        path = self.directory / f"{batch_hash}{_SUFFIX}"
        temp = path.with_suffix(".tmp")
        with open(temp, "wb") as handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
        _fsync_dir(self.directory)
        return SpooledBatch(batch_hash, payload, path)

    def pending(self) -> list[SpooledBatch]:
        """Spooled batches, oldest first. A file whose content does not match its name
        (a torn write from before fsync existed, disk trouble) is dropped."""
        batches = []
        for path in sorted(self.directory.glob(f"*{_SUFFIX}"), key=lambda p: p.stat().st_mtime_ns):
            payload = path.read_bytes()
            batch_hash = hashlib.sha256(payload).hexdigest()
            if path.name != f"{batch_hash}{_SUFFIX}":
                path.unlink()
                continue
            batches.append(SpooledBatch(batch_hash, payload, path))
        return batches

    def remove(self, batch: SpooledBatch) -> None:
        batch.path.unlink(missing_ok=True)
        _fsync_dir(self.directory)

    def __len__(self) -> int:
        return sum(1 for _ in self.directory.glob(f"*{_SUFFIX}"))
