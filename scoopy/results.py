"""What reading a hierarchy back returns: its event log, its runs, its outcome."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec

from .failure import CooperationFailure
from .vocab import OutcomeStatus, RunStatus


class Event(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of a hierarchy's event log."""

    seq: int
    type: str
    saga: str | None
    step: str | None
    run_id: uuid.UUID | None
    message_id: uuid.UUID | None
    root_id: uuid.UUID
    lineage: list[uuid.UUID]
    worker: str | None
    failure: CooperationFailure | None
    context: dict[str, Any] | None
    time: datetime
    phase: str | None = None
    instance: int | None = None
    iteration: int | None = None
    handler_iteration: int | None = None


@dataclass(frozen=True, slots=True)
class RunInfo:
    """One run of a hierarchy, as `Cooperation.runs` reports it."""

    id: uuid.UUID
    saga: str
    parent_id: uuid.UUID | None
    status: RunStatus
    lineage: list[uuid.UUID]
    message_id: uuid.UUID
    created_at: datetime
    updated_at: datetime
    failure: CooperationFailure | None
    rollback_failure: CooperationFailure | None


@dataclass(frozen=True, slots=True)
class RunSummary:
    id: uuid.UUID
    saga: str
    status: RunStatus


@dataclass(frozen=True, slots=True)
class Outcome:
    """How a hierarchy ended: every run its root message started has finished."""

    id: uuid.UUID
    status: OutcomeStatus
    failure: CooperationFailure | None
    runs: tuple[RunSummary, ...]

    def raise_for_failure(self) -> None:
        """Raise the failure (a `CooperationError`) unless the hierarchy committed."""
        if self.failure is not None:
            raise self.failure.to_exception()


@dataclass(frozen=True, slots=True)
class SubscriptionInfo:
    """One entry of the shared registry, with who serves it now."""

    topic: str
    saga: str
    workers: tuple[str, ...]  # live workers serving the saga
    last_served: datetime | None  # when a live worker last served it (None: never seen)
    created_at: datetime

    @property
    def live(self) -> bool:
        return bool(self.workers)


WaitingKind = Literal[
    "running", "ready", "limited", "children", "sleeping", "held", "paused", "unserved"
]


@dataclass(frozen=True, slots=True)
class Waiting:
    """An unfinished run of a hierarchy and what it waits for now.

    `kind`: "running" (a worker runs its step now), "ready" (for a free worker slot),
    "limited" (for its saga's rate or concurrency limit),
    "children" (for the runs its step started), "sleeping" (until `until`), "held" (no live
    worker's definition of its saga fits it: `detail` says why), "paused" (its saga is
    paused), "unserved" (no live worker serves its saga; `since` is when one last did).
    """

    run_id: uuid.UUID
    saga: str
    status: RunStatus
    kind: WaitingKind
    detail: str
    since: datetime | None = None
    until: datetime | None = None

    def __str__(self) -> str:
        return f"{self.saga}[{self.run_id}]: {self.detail}"
