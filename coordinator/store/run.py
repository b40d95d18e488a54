"""The run's own records: the published policy versions, the trainer's metrics per step, and the
coordinator's secrets."""

from __future__ import annotations

import math
import secrets

from sqlalchemy import func, insert, select
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import IntegrityError

from coordinator.store.database import Repository
from coordinator.store.records import MetricsRecord, PolicyVersionRecord, VersionExistsError
from coordinator.store.rows import version_record
from coordinator.store.statements import METRICS, SECRETS, VERSIONS

SECRET_BYTES = 32


class RunRepository(Repository):
    """Policy versions, trainer metrics and secrets."""

    def add_version(self, version: PolicyVersionRecord) -> None:
        try:
            with self.database.write() as connection:
                connection.execute(
                    insert(VERSIONS).values(
                        version=version.version,
                        base_version=version.base_version,
                        codec=int(version.codec),
                        signed_manifest=version.signed_manifest,
                        num_bytes=version.num_bytes,
                        full_state_bytes=version.full_state_bytes,
                        created_ms=version.created_ms,
                    )
                )
        except IntegrityError:
            raise VersionExistsError(f"policy version {version.version} is already published") from None

    def get_version(self, version: int) -> PolicyVersionRecord | None:
        with self.database.read() as connection:
            row = connection.execute(select(VERSIONS).where(VERSIONS.c.version == version)).first()
            return None if row is None else version_record(row)

    def latest_version(self) -> PolicyVersionRecord | None:
        with self.database.read() as connection:
            row = connection.execute(select(VERSIONS).order_by(VERSIONS.c.version.desc()).limit(1)).first()
            return None if row is None else version_record(row)

    def list_versions(self) -> list[PolicyVersionRecord]:
        with self.database.read() as connection:
            return [version_record(row) for row in connection.execute(select(VERSIONS).order_by(VERSIONS.c.version))]

    def add_metrics(self, step: int, metrics_json: str, now_ms: int) -> None:
        """The metrics of a trainer step; a step reported again (a trainer resumed from an earlier
        checkpoint trains it anew) replaces its record."""
        dialect_insert = postgresql_insert if self.database.backend == "postgresql" else sqlite_insert
        statement = dialect_insert(METRICS).values(step=step, metrics_json=metrics_json, created_ms=now_ms)
        with self.database.write() as connection:
            connection.execute(
                statement.on_conflict_do_update(
                    index_elements=[METRICS.c.step],
                    set_={"metrics_json": statement.excluded.metrics_json, "created_ms": statement.excluded.created_ms},
                )
            )

    def list_metrics_between(self, first_step: int, last_step: int, max_rows: int) -> list[MetricsRecord]:
        """The metrics records of steps first_step..last_step, by step. Where more lie between, every
        k-th step from first_step, k the smallest that keeps about max_rows: a long run's whole curve
        is a bounded read."""
        in_range = METRICS.c.step.between(first_step, last_step)
        with self.database.read() as connection:
            count = connection.execute(select(func.count()).select_from(METRICS).where(in_range)).scalar_one()
            query = select(METRICS).where(in_range)
            if count > max_rows:
                query = query.where((METRICS.c.step - first_step) % math.ceil(count / max_rows) == 0)
            rows = connection.execute(query.order_by(METRICS.c.step)).all()
            return [MetricsRecord(row.step, row.metrics_json, row.created_ms) for row in rows]

    def list_metrics(self, limit: int) -> list[MetricsRecord]:
        """The metrics records of the newest limit steps, by step."""
        with self.database.read() as connection:
            rows = connection.execute(select(METRICS).order_by(METRICS.c.step.desc()).limit(limit)).all()
            return [MetricsRecord(row.step, row.metrics_json, row.created_ms) for row in reversed(rows)]

    def secret(self, name: str) -> bytes:
        """The coordinator's secret called name: SECRET_BYTES random bytes made on first use, the
        same for every replica and after restarts. Never send it to a node."""
        query = select(SECRETS.c.value).where(SECRETS.c.name == name)
        with self.database.read_one() as connection:
            value = connection.execute(query).scalar_one_or_none()
        if value is None:
            try:
                with self.database.write() as connection:
                    connection.execute(insert(SECRETS).values(name=name, value=secrets.token_bytes(SECRET_BYTES)))
            except IntegrityError:
                pass  # another replica made it first
            with self.database.read_one() as connection:
                value = connection.execute(query).scalar_one()
        return bytes(value)
