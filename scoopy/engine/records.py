"""The engine's records: rows the store reads and writes, and what the runner hands around.

Rows are built by column name: each record's fields are the column names of the statements
that produce it (`from_row` checks this once per statement text, then builds by position,
which costs half as much on the claim path).
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from typing import Any, Literal, TypeVar

import asyncpg
import msgspec
from asyncpg.transaction import Transaction

from ..failure import CooperationFailure
from ..message import Topic
from ..saga import Saga
from ..strategy import DEFAULT_STRATEGY, EventLoopStrategy
from ..vocab import RunStatus
from .definition import Definition

R = TypeVar("R")
_checked: set[tuple[type[Any], str]] = set()


def from_row(kind: type[R], row: asyncpg.Record, statement: str) -> R:
    """Build `kind` from a row of `statement`, whose columns must be `kind`'s fields, in order."""
    if (kind, statement) not in _checked:
        names = tuple(f.name for f in fields(kind))  # type: ignore[arg-type]
        if tuple(row.keys()) != names:
            raise RuntimeError(
                f"a statement returns columns {tuple(row.keys())}, "
                f"but {kind.__name__} has fields {names}"
            )
        _checked.add((kind, statement))
    return kind(*row)


# -- what the store writes -----------------------------------------------------------------


class NewEvent(msgspec.Struct, array_like=True, kw_only=True):
    """One event to append; sent to the database as a JSON array (field order matters)."""

    root_id: uuid.UUID
    type: str
    message_id: uuid.UUID | None = None
    run_id: uuid.UUID | None = None
    saga: str | None = None
    step: str | None = None
    phase: str | None = None
    step_index: int | None = None
    instance: int | None = None
    iteration: int | None = None
    handler_iteration: int | None = None
    failure: msgspec.Raw | None = None
    context: msgspec.Raw | None = None


@dataclass(slots=True)
class RunWrite:
    """The new state of a claimed run, written when its transaction ends."""

    run_id: uuid.UUID
    lineage: Sequence[uuid.UUID]
    status: RunStatus
    state: str
    pending: int
    reset_failed: bool
    ready_at: datetime | None
    resume_at: datetime | None
    deadline_at: datetime | None
    context: str | None
    failure: str | None = None
    rollback_failure: str | None = None
    result: str | None = None
    terminal: bool = False
    parent_id: uuid.UUID | None = None
    parent_failed: int = 0
    notify_parent: bool = False
    events: list[NewEvent] = field(default_factory=list)
    notify: list[str] = field(default_factory=list)
    definition: str | None = None
    prefix: str | None = None
    # On the happy path and about to sleep until `ready_at`: a cancellation that arrived
    # during the step must wake it instead (the canceller could not, the row was locked).
    sleeping: bool = False


# -- what the store reads ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Claimed:
    """A run locked for one step transaction, with everything that transaction needs."""

    id: uuid.UUID
    root_id: uuid.UUID
    message_id: uuid.UUID
    saga: str
    parent_id: uuid.UUID | None
    lineage: list[uuid.UUID]
    status: RunStatus
    state: str
    pending: int
    failed: int
    awaited: bool
    context: str | None
    rollback_request: str | None
    definition: str | None  # fingerprint of the definition its cursor counts in (None: not started)
    prefix: str | None  # identity of the steps it reached (see engine/definition.py)
    topic: str | None  # None if the run's message was deleted by hand
    payload: str | None
    cancellation: str | None
    now: datetime
    ready: int  # runs of this saga ready when claimed, this one and those held included (capped)


@dataclass(frozen=True, slots=True)
class ChildFailure:
    """A child of the current wait that rolled back or failed to."""

    saga: str
    id: uuid.UUID
    status: RunStatus
    failure: str | None
    rollback_failure: str | None


@dataclass(frozen=True, slots=True)
class Committed:
    """A committed step or handler instance of a run, from its event log."""

    instance: int
    step: str
    iteration: int
    handler_iteration: int | None


@dataclass(frozen=True, slots=True)
class RunEnding:
    """A run as far as the outcome of its hierarchy is concerned."""

    id: uuid.UUID
    saga: str
    status: RunStatus
    failure: str | None
    rollback_failure: str | None


@dataclass(frozen=True, slots=True)
class UndoCandidate:
    id: uuid.UUID
    saga: str
    status: RunStatus
    parent_id: uuid.UUID | None
    lineage: list[uuid.UUID]
    message_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class UnfitRun:
    """A ready run no live worker's definition fits (see liveness.Liveness.hold)."""

    id: uuid.UUID
    saga: str
    definition: str | None
    prefix: str | None
    state: str


@dataclass(frozen=True, slots=True)
class WaitRow:
    """An unfinished run and the facts that say what it waits for (see waiting.waiting_for)."""

    id: uuid.UUID
    saga: str
    status: RunStatus
    held: str | None
    pending: int
    ready_at: datetime | None
    resume_at: datetime | None
    due: bool
    paused: bool
    served: bool
    last_served: datetime | None
    running_on: str | None
    concurrency: int | None  # the saga's concurrency limit, as its live workers declare it
    slots_taken: int
    rate_until: datetime | None  # its rate limit allows no start before then


# -- what the runner hands around ----------------------------------------------------------


class RollbackRequest(msgspec.Struct, frozen=True):
    """What a parent or an operator writes on a run to make it roll back."""

    origin: Literal["parent", "external"]
    cause: CooperationFailure


@dataclass
class Binding:
    """A saga served by this process, with the topics it listens on and its strategy."""

    saga: Saga
    topics: dict[str, Topic[Any]] = field(default_factory=dict)
    # False while a live worker serves a higher version of the saga (see Saga.version):
    # then this process finishes the runs its definition fits and starts no new ones.
    starts_new: bool = True
    claims: int = 0  # claims made, for priorities' fair share (engine/limits.py)
    slot_misses: int = 0  # claims in a row that found every concurrency slot taken

    @functools.cached_property
    def definition(self) -> Definition:
        return Definition.of(self.saga)

    @functools.cached_property
    def accepted(self) -> list[str]:
        """The prefixes of the runs this process may advance, for the claim."""
        return sorted(self.definition.accepted)

    @property
    def strategy(self) -> EventLoopStrategy:
        return self.saga.strategy or DEFAULT_STRATEGY

    def topic(self, name: str) -> Topic[Any]:
        return self.topics.get(name) or Topic(name)


@dataclass(frozen=True, slots=True)
class Lease:
    """A claimed run and the open transaction holding its lock."""

    claimed: Claimed
    tx: Transaction


@dataclass
class AfterCommit:
    """What one transaction did, for the worker to act on once it commits."""

    ready_sagas: set[str] = field(default_factory=set)
    root_done: uuid.UUID | None = None
    events: list[NewEvent] = field(default_factory=list)
    wake_in: float | None = None  # seconds until the run is due again, if it waits for a time
    touched: bool = False  # user code used the connection (it may have changed session state)
    ready: int = 0  # runs of the saga ready when this one was claimed (held ones included)
    again: bool = False  # this run is ready for its next step right away
    lineage: list[uuid.UUID] = field(default_factory=list)
    settled: AfterCommit | None = None  # the parent this transaction also finished
    next_tx: Transaction | None = None  # begun with the commit, for the next claim

    def chain(self) -> list[AfterCommit]:
        """This run's result and those of the ancestors settled in the same transaction."""
        found: list[AfterCommit] = []
        node: AfterCommit | None = self
        while node is not None:
            found.append(node)
            node = node.settled
        return found


OnCommitted = Callable[[AfterCommit], None]
