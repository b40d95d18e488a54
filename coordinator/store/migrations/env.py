"""Alembic environment: runs on the connection coordinator.store.migrate hands over, inside the
transaction (and lock) it holds."""

from alembic import context

from coordinator.store.schema import metadata

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
