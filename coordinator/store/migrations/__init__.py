"""Alembic migrations of the coordinator's store, run by coordinator.store.migrate."""
