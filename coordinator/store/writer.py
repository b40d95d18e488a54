"""The group-commit writer, for the two writes on every node's path: Store.record_submission and
Store.issue_lease.

One writer thread commits all the requests queued while its previous transaction ran in one
transaction, each applied as if alone and in arrival order; a caller returns when the transaction
holding its request has committed. Should that transaction fail, each of its requests is committed
alone, so one bad request fails only itself. Under load a transaction carries many requests: their
statements, round trips and commit are shared (on PostgreSQL a submission alone takes about ten
statements, and the per-statement work of SQLAlchemy and the driver was most of a request's CPU)."""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from typing import overload

from sqlalchemy import Connection

from coordinator.store.database import Database
from coordinator.store.leases import LeaseRequest, issue_leases
from coordinator.store.records import LeaseRecord, NewSubmission, SubmissionOutcome
from coordinator.store.submissions import record_alone, record_submissions

log = logging.getLogger(__name__)

MAX_GROUP_COMMIT = 512  # requests in one group-commit transaction at most

WriteRequest = NewSubmission | LeaseRequest
# A write request's answer: the outcome, or the exception its caller raises.
_Answer = SubmissionOutcome | LeaseRecord | Exception


class Writer:
    """Commits write requests, grouped; close() commits those already queued."""

    def __init__(self, database: Database) -> None:
        self._database = database
        self._requests: queue.SimpleQueue[tuple[WriteRequest, Future[_Answer]] | None] = queue.SimpleQueue()
        self._requests_lock = threading.Lock()
        self._group_writer: threading.Thread | None = threading.Thread(
            target=self._write_groups, name="store-group-commit", daemon=True
        )
        self._group_writer.start()

    def close(self) -> None:
        """Commit the requests already queued, then stop the writer thread."""
        with self._requests_lock:
            group_writer, self._group_writer = self._group_writer, None
            if group_writer is not None:
                self._requests.put(None)
        if group_writer is not None:
            group_writer.join()

    @overload
    def commit(self, request: NewSubmission) -> SubmissionOutcome: ...

    @overload
    def commit(self, request: LeaseRequest) -> LeaseRecord: ...

    def commit(self, request: WriteRequest) -> SubmissionOutcome | LeaseRecord:
        """Commit one request with the others queued beside it. Returns after the commit; raises
        the request's refusal."""
        answered: Future[_Answer] = Future()
        with self._requests_lock:
            if self._group_writer is None:
                raise RuntimeError("the store is closed")
            self._requests.put((request, answered))
        answer = answered.result()
        if isinstance(answer, Exception):
            raise answer
        return answer

    def _write_groups(self) -> None:
        """The group-commit thread: takes everything queued, commits it, answers, repeats."""
        stopping = False
        while not stopping:
            first = self._requests.get()
            if first is None:
                return
            group = [first]
            while len(group) < MAX_GROUP_COMMIT:
                try:
                    queued = self._requests.get_nowait()
                except queue.Empty:
                    break
                if queued is None:
                    stopping = True
                    break
                group.append(queued)
            answers = self._commit_group([request for request, _ in group])
            for (_, answered), answer in zip(group, answers, strict=True):
                answered.set_result(answer)

    def _commit_group(self, requests: Sequence[WriteRequest]) -> list[_Answer]:
        if len(requests) > 1:
            try:
                with self._database.write() as connection:
                    return _apply(connection, requests)
            except Exception:
                # Each request is committed alone below, and one that fails gets its own error.
                log.warning("a group commit of %d requests failed; committing each alone", len(requests), exc_info=True)
        return [self._commit_alone(request) for request in requests]

    def _commit_alone(self, request: WriteRequest) -> _Answer:
        try:
            if isinstance(request, NewSubmission):
                return record_alone(self._database, request)
            with self._database.write() as connection:
                return _apply(connection, [request])[0]
        except Exception as error:
            return error  # the caller raises it


def _apply(connection: Connection, requests: Sequence[WriteRequest]) -> list[_Answer]:
    """Answer requests in one transaction. Submissions go first: they close leases, which frees
    room under the lease cap for the lease requests beside them."""
    answers: dict[int, _Answer] = {}
    submissions = [(index, request) for index, request in enumerate(requests) if isinstance(request, NewSubmission)]
    lease_requests = [(index, request) for index, request in enumerate(requests) if isinstance(request, LeaseRequest)]
    if submissions:
        outcomes = record_submissions(connection, [submission for _, submission in submissions])
        for (index, _), outcome in zip(submissions, outcomes, strict=True):
            answers[index] = outcome
    if lease_requests:
        leases = issue_leases(connection, [lease_request for _, lease_request in lease_requests])
        for (index, _), lease in zip(lease_requests, leases, strict=True):
            answers[index] = lease
    assert len(answers) == len(requests), "a request was left without an answer"
    return [answers[index] for index in range(len(requests))]
