"""Versioned schema migrations (Alembic, configured here in code: no alembic.ini).

A new revision: change schema.py, then
    alembic.command.revision(alembic_config(connection), message="...", autogenerate=True)
on a connection to a database at head, and review the generated file in migrations/versions/."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, Engine

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Any constant: PostgreSQL advisory lock key that serializes coordinators migrating at once.
_POSTGRES_MIGRATION_LOCK_KEY = 0x726F6C6C70726F6F


def alembic_config(connection: Connection) -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def head_revision() -> str:
    head = ScriptDirectory(str(MIGRATIONS_DIR)).get_current_head()
    assert head is not None, "the migrations directory has no revisions"
    return head


def current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def upgrade_to_head(engine: Engine) -> None:
    """Bring the schema to the newest revision; a no-op when it is there already. Runs in one
    transaction that holds the database's write lock (SQLite) or an advisory lock (PostgreSQL),
    so coordinators starting together migrate once."""
    with engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({_POSTGRES_MIGRATION_LOCK_KEY})")
        if current_revision(connection) != head_revision():
            command.upgrade(alembic_config(connection), "head")
