"""The coordinator's durable store: one interface (Store) over SQLite and PostgreSQL, with
versioned migrations. Open it with open_store(url); sqlite_url(data_dir) is the embedded default.

Each name is imported "as" itself: that marks it exported, for ruff and mypy alike."""

from coordinator.store.database import SQLITE_FILE_NAME as SQLITE_FILE_NAME
from coordinator.store.database import sqlite_url as sqlite_url
from coordinator.store.leases import LeaseFactory as LeaseFactory
from coordinator.store.records import GROUP_STATE_SOURCES as GROUP_STATE_SOURCES
from coordinator.store.records import ChunkStats as ChunkStats
from coordinator.store.records import ChunkWindow as ChunkWindow
from coordinator.store.records import ConsumeOutcome as ConsumeOutcome
from coordinator.store.records import Consumption as Consumption
from coordinator.store.records import ContributionBucket as ContributionBucket
from coordinator.store.records import ContributionTotals as ContributionTotals
from coordinator.store.records import DuplicateRolloutError as DuplicateRolloutError
from coordinator.store.records import GroupState as GroupState
from coordinator.store.records import LeaseCapError as LeaseCapError
from coordinator.store.records import LeaseCooldownError as LeaseCooldownError
from coordinator.store.records import LeaseRecord as LeaseRecord
from coordinator.store.records import LeaseState as LeaseState
from coordinator.store.records import Liveness as Liveness
from coordinator.store.records import MetricsRecord as MetricsRecord
from coordinator.store.records import NewGroup as NewGroup
from coordinator.store.records import NewSubmission as NewSubmission
from coordinator.store.records import NewValidation as NewValidation
from coordinator.store.records import NewVerdict as NewVerdict
from coordinator.store.records import NodeKeyMismatchError as NodeKeyMismatchError
from coordinator.store.records import NodeRecord as NodeRecord
from coordinator.store.records import PolicyVersionRecord as PolicyVersionRecord
from coordinator.store.records import RejectionRecord as RejectionRecord
from coordinator.store.records import RejectionSource as RejectionSource
from coordinator.store.records import RequeuedPrompts as RequeuedPrompts
from coordinator.store.records import RunCounters as RunCounters
from coordinator.store.records import StoredGroup as StoredGroup
from coordinator.store.records import SubmissionOutcome as SubmissionOutcome
from coordinator.store.records import SubmissionRecord as SubmissionRecord
from coordinator.store.records import TokenStats as TokenStats
from coordinator.store.records import TokenWindow as TokenWindow
from coordinator.store.records import UnknownLeaseError as UnknownLeaseError
from coordinator.store.records import UnknownNodeError as UnknownNodeError
from coordinator.store.records import ValidationOutcome as ValidationOutcome
from coordinator.store.records import ValidationResult as ValidationResult
from coordinator.store.records import VersionExistsError as VersionExistsError
from coordinator.store.records import WalkAwayLimit as WalkAwayLimit
from coordinator.store.records import WorkTotals as WorkTotals
from coordinator.store.records import node_state as node_state
from coordinator.store.records import reputation as reputation
from coordinator.store.store import Store as Store
from coordinator.store.store import open_store as open_store
