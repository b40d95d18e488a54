"""Alembic revisions, one file each, applied in order by coordinator.store.migrate."""
