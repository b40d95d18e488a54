"""Which of the coordinator's replicas runs the housekeeping (lease expiry, credit settlement,
forgetting expired nonces, the embedded validator): the one holding a PostgreSQL session-level
advisory lock. The lock lives with its database session, so when the holder dies (or loses its
connection) the server releases it and the next replica to ask takes over. Advisory locks are
shared by a whole database, so the key is derived from the store's schema: runs kept in different
schemas of one database each have their own. On SQLite, one process owns the store and always holds
it."""

from __future__ import annotations

import hashlib
import logging
import threading

from sqlalchemy import Connection, text
from sqlalchemy.exc import DBAPIError

from coordinator.store.database import Database

log = logging.getLogger(__name__)

_CURRENT_SCHEMA = text("SELECT current_schema()")
_TRY_LOCK = text("SELECT pg_try_advisory_lock(:key)")
_UNLOCK = text("SELECT pg_advisory_unlock(:key)")
# A session keeps its advisory locks until it ends: while its connection answers, the lock is held.
_PING = text("SELECT 1")


def housekeeping_lock_key(schema: str) -> int:
    """The advisory lock key (a signed 64-bit integer) of the store in `schema`."""
    digest = hashlib.blake2b(f"rollproof-housekeeping:{schema}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


class HousekeepingLock:
    """held() answers whether this process holds the lock now, taking it when free."""

    def __init__(self, database: Database, key: int | None = None) -> None:
        """key: by default, housekeeping_lock_key of the schema the store's session resolves to."""
        self._database = database
        self._key = key
        self._connection: Connection | None = None
        self._lock = threading.Lock()

    def held(self) -> bool:
        if self._database.is_sqlite:
            return True
        with self._lock:
            if self._connection is not None:
                try:
                    self._connection.execute(_PING)
                    return True
                except DBAPIError:
                    log.warning("lost the store connection holding the housekeeping lock")
                self._drop_connection()
            try:
                connection = self._database.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
            except DBAPIError:
                return False
            try:
                if self._key is None:
                    self._key = housekeeping_lock_key(str(connection.execute(_CURRENT_SCHEMA).scalar_one()))
                taken = bool(connection.execute(_TRY_LOCK, {"key": self._key}).scalar_one())
            except DBAPIError:
                taken = False
            if not taken:
                connection.close()
                return False
            self._connection = connection
            log.info("this replica holds the housekeeping lock")
            return True

    def release(self) -> None:
        """Let go of the lock at once: the next replica to ask takes it."""
        with self._lock:
            if self._connection is None:
                return
            try:
                self._connection.execute(_UNLOCK, {"key": self._key})
            except DBAPIError:
                self._drop_connection()
                return
            connection, self._connection = self._connection, None
            connection.close()

    def _drop_connection(self) -> None:
        """Close the session that held the lock; the server releases its locks as it ends it."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            try:
                connection.invalidate()
                connection.close()
            except DBAPIError:
                pass
