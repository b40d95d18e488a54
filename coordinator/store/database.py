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

from sqlalchemy import Connection, Engine, create_engine, event, make_url

SQLITE_FILE_NAME = "coordinator.sqlite3"
SQLITE_BUSY_TIMEOUT_MS = 30_000
_WRITE_OPTION = "rollproof_write"
_ONE_STATEMENT_OPTION = "rollproof_one_statement"


def sqlite_url(data_dir: Path) -> str:
    """The URL of the embedded store: one SQLite file in the coordinator's data directory."""
    return f"sqlite:///{Path(data_dir).expanduser().resolve() / SQLITE_FILE_NAME}"


class Database:
    """An engine and its transactions. Safe to use from many threads at once."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.write_engine = engine.execution_options(**{_WRITE_OPTION: True})
        self._one_statement_engine = engine.execution_options(**{_ONE_STATEMENT_OPTION: True})
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
        """For a read of one statement, which needs no BEGIN on SQLite."""
        with self._one_statement_engine.connect() as connection:
            yield connection

    @contextmanager
    def write(self) -> Iterator[Connection]:
        with self._write_lock, self.write_engine.begin() as connection:
            yield connection

    def dispose(self) -> None:
        self.engine.dispose()


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
        return Database(create_engine(parsed, pool_size=pool_size, max_overflow=2 * pool_size, pool_pre_ping=True))
    raise ValueError(f"the store runs on SQLite or PostgreSQL, not {backend!r} ({url!r})")


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


class Repository:
    """One aggregate's part of the store; each public method is one transaction on the database."""

    def __init__(self, database: Database) -> None:
        self.database = database
