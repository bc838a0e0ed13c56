"""Deadlines: context keys that only ever get stricter as they travel down a hierarchy."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from .context import ContextKey


class DeadlineOrigin(msgspec.Struct, frozen=True):
    """A looser deadline that a stricter one replaced, kept to explain where deadlines came from."""

    at: datetime
    source: str


class Deadline(msgspec.Struct, frozen=True):
    """A point in time by which something must finish, and who set it."""

    at: datetime
    source: str
    trace: list[DeadlineOrigin] = []


def _earliest(old: Deadline, new: Deadline) -> Deadline:
    keep, drop = (new, old) if new.at < old.at else (old, new)
    trace = [*keep.trace]
    for origin in [*drop.trace, DeadlineOrigin(drop.at, drop.source)]:
        if origin not in trace:
            trace.append(origin)
    return Deadline(keep.at, keep.source, trace)


HAPPY_PATH_DEADLINE: ContextKey[Deadline] = ContextKey(
    "HappyPathDeadline", Deadline, combine=_earliest
)
ROLLBACK_DEADLINE: ContextKey[Deadline] = ContextKey(
    "RollbackPathDeadline", Deadline, combine=_earliest
)
ABSOLUTE_DEADLINE: ContextKey[Deadline] = ContextKey(
    "AbsoluteDeadline", Deadline, combine=_earliest
)

DEADLINE_KEYS = (HAPPY_PATH_DEADLINE, ROLLBACK_DEADLINE, ABSOLUTE_DEADLINE)


def deadline(within: timedelta | float, source: str, *, now: datetime | None = None) -> Deadline:
    """A deadline `within` from now (seconds or a timedelta), attributed to `source`."""
    span = within if isinstance(within, timedelta) else timedelta(seconds=within)
    return Deadline((now or datetime.now(UTC)) + span, source)
