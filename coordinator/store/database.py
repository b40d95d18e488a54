"""The store's engines and transactions: one SQLAlchemy engine over SQLite (the embedded default:
WAL, one file) or PostgreSQL (postgresql+psycopg://), and the three ways a repository opens a
transaction (read, read_one, write).

On SQLite a write transaction starts with BEGIN IMMEDIATE, so writers queue on the busy timeout
instead of failing on a lock upgrade; readers run beside them (WAL)."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import ClauseElement, Connection, Engine, create_engine, event, make_url

SQLITE_FILE_NAME = "coordinator.sqlite3"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_WRITE_OPTION = "rollproof_write"
_ONE_STATEMENT_OPTION = "rollproof_one_statement"


def sqlite_url(data_dir: Path) -> str:
    """The URL of the embedded store: one SQLite file in the coordinator's data directory."""
    return f"sqlite:///{Path(data_dir).expanduser().resolve() / SQLITE_FILE_NAME}"


class Database:
    """An engine and its transactions. Safe to use from many threads at once.

    On PostgreSQL a read of one statement runs in autocommit mode (one round trip, not BEGIN,
    SELECT and ROLLBACK), and `unsynchronized_engine` commits each statement alone without waiting
    for the WAL flush, for writes worth less than a round trip's wait (see nonces.py)."""

    def __init__(self, engine: Engine, unsynchronized_engine: Engine | None = None) -> None:
        self.engine = engine
        self.unsynchronized_engine = unsynchronized_engine
        self.write_engine = engine.execution_options(**{_WRITE_OPTION: True})
        if self.is_sqlite:
            self._one_statement_engine = engine.execution_options(**{_ONE_STATEMENT_OPTION: True})
        else:
            self._one_statement_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
        # SQLite takes one writer at a time and makes the others poll with sleeps (its busy
        # handler); queueing this process's writers on a lock instead wakes the next one at once.
        self._write_lock: AbstractContextManager[Any] = threading.Lock() if self.is_sqlite else contextlib.nullcontext()

    @property
    def backend(self) -> str:
        return self.engine.dialect.name

    @property
    def is_sqlite(self) -> bool:
        return self.backend == "sqlite"

    @contextmanager
    def read(self) -> Iterator[Connection]:
        with self.engine.begin() as connection:
            yield connection

    @contextmanager
    def read_one(self) -> Iterator[Connection]:
        """For a read of one statement, which needs no transaction around it (BEGIN on SQLite, BEGIN and
        ROLLBACK on PostgreSQL)."""
        with self._one_statement_engine.connect() as connection:
            yield connection

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self._write_lock, self.write_engine.begin() as connection:
            yield connection

    def dispose(self) -> None:
        self.engine.dispose()
        if self.unsynchronized_engine is not None:
            self.unsynchronized_engine.dispose()


def create_database(url: str, pool_size: int, sqlite_synchronous: str) -> Database:
    """The database at url, its connections configured for the store (see the module docstring)."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError(f"the store needs a SQLite file (sqlite:////path/to/{SQLITE_FILE_NAME}), got {url!r}")
        Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(
            parsed,
            connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            pool_size=pool_size,
            max_overflow=2 * pool_size,
        )
        event.listen(engine, "connect", functools.partial(_configure_sqlite_connection, sqlite_synchronous))
        event.listen(engine, "begin", _begin_sqlite_transaction)
        return Database(engine)
    if backend == "postgresql":
        if parsed.get_driver_name() != "psycopg":
            raise ValueError(f"use the psycopg driver for PostgreSQL: postgresql+psycopg://..., got {url!r}")
        # No ping before each checkout (a round trip per transaction): a connection the server dropped
        # fails its one request, and the pool then replaces every connection older than the failure.
        engine = create_engine(parsed, pool_size=pool_size, max_overflow=2 * pool_size)
        unsynchronized = create_engine(
            parsed, pool_size=pool_size, max_overflow=2 * pool_size, isolation_level="AUTOCOMMIT"
        )
        event.listen(unsynchronized, "connect", _commit_without_waiting_for_the_flush)
        return Database(engine, unsynchronized)
    raise ValueError(f"the store runs on SQLite or PostgreSQL, not {backend!r} ({url!r})")


def _commit_without_waiting_for_the_flush(dbapi_connection: Any, _record: Any) -> None:
    dbapi_connection.execute("SET synchronous_commit TO off")


def _configure_sqlite_connection(synchronous: str, dbapi_connection: Any, _record: Any) -> None:
    # SQLAlchemy emits BEGIN itself (see _begin_sqlite_transaction), not the sqlite3 module.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA synchronous={synchronous}")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _begin_sqlite_transaction(connection: Connection) -> None:
    options = connection.get_execution_options()
    if options.get(_ONE_STATEMENT_OPTION, False):
        return  # a single statement is a transaction of its own
    connection.exec_driver_sql("BEGIN IMMEDIATE" if options.get(_WRITE_OPTION, False) else "BEGIN")


class DriverStatement:
    """A statement compiled once for an engine on PostgreSQL and run on the driver's connection
    (psycopg), prepared on the server: for a one-statement write on every request's path, where
    SQLAlchemy's work per execution (cache lookup, parameter and result processing, the connection
    wrapper) costs several times the driver's. Only for statements whose parameters and result need
    no type processing (integers, bytes, text)."""

    def __init__(self, engine: Engine, statement: ClauseElement) -> None:
        self._engine = engine
        self._sql = str(statement.compile(dialect=engine.dialect))

    def first(self, parameters: dict[str, Any]) -> tuple[Any, ...] | None:
        """Run it; the first row of its result, or None."""
        import psycopg

        connection = self._engine.raw_connection()
        driver = connection.driver_connection
        assert driver is not None, "a pooled connection has its driver's connection"
        try:
            row: tuple[Any, ...] | None = driver.execute(self._sql, parameters, prepare=True).fetchone()
            return row
        except psycopg.OperationalError:
            connection.invalidate()  # the server dropped it: the pool opens a fresh one
            raise
        finally:
            connection.close()


class Repository:
    """One aggregate's part of the store; each public method is one transaction on the database."""

    def __init__(self, database: Database) -> None:
        self.database = database
