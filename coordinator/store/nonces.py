"""Envelope nonces shared by the coordinator's replicas: a signed request's nonce is taken once
(insert-or-refuse) by whichever replica sees it first, and forgotten once its freshness window has
passed. One process on SQLite needs no shared memory of nonces (the gate's own suffices); the
table works there too.

On PostgreSQL a nonce is one autocommitted statement, run on the driver (DriverStatement), that does
not wait for the WAL flush (Database.unsynchronized_engine): a nonce matters only within the
freshness window, and a crash of the database server loses at most its last fraction of a second
of them."""

from __future__ import annotations

from sqlalchemy import delete
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from coordinator.store.database import Database, DriverStatement, Repository
from coordinator.store.statements import NONCES


class NonceRepository(Repository):
    """The nonces of signed requests within their freshness window."""

    def __init__(self, database: Database) -> None:
        super().__init__(database)
        dialect_insert = sqlite_insert if database.is_sqlite else postgresql_insert
        self._take_nonce = dialect_insert(NONCES).on_conflict_do_nothing().returning(NONCES.c.expires_ms)
        self._take_nonce_on_driver = (
            None
            if database.unsynchronized_engine is None
            else DriverStatement(database.unsynchronized_engine, self._take_nonce)
        )

    def take_nonce(self, signer_public_key: bytes, nonce: bytes, expires_ms: int) -> bool:
        """Record a signer's nonce until expires_ms; False when it was recorded already (a replay)."""
        values = {"signer_public_key": signer_public_key, "nonce": nonce, "expires_ms": expires_ms}
        if self._take_nonce_on_driver is not None:
            return self._take_nonce_on_driver.first(values) is not None
        with self.database.write() as connection:
            return connection.execute(self._take_nonce, values).first() is not None

    def forget_nonces(self, now_ms: int) -> int:
        """Drop the nonces that expired before now_ms; returns how many."""
        with self.database.write() as connection:
            return connection.execute(delete(NONCES).where(NONCES.c.expires_ms < now_ms)).rowcount
