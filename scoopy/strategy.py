"""EventLoopStrategy: when a run gives up, and when a parent stops waiting for late children."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from .context import CooperationContext
from .deadlines import ABSOLUTE_DEADLINE, HAPPY_PATH_DEADLINE, ROLLBACK_DEADLINE, Deadline
from .failure import CooperationFailure, DeadlineMissed

Path = Literal["happy", "rollback"]


@dataclass(frozen=True, slots=True)
class RunView:
    """What a strategy may look at when deciding about one run."""

    run_id: str
    saga: str
    path: Path
    now: datetime
    context: CooperationContext
    cancellation: CooperationFailure | None


class EventLoopStrategy:
    """The default ("registry") strategy.

    A run's children are every saga subscribed to the topic when the message was emitted
    (the `subscription` table). A run gives up on its happy path when cancellation was
    requested for it or an ancestor, or when its happy-path or absolute deadline passed;
    on its rollback path when its rollback or absolute deadline passed.
    Subclass it and override `give_up` / `wake_at` to change that.
    """

    def give_up(self, run: RunView) -> CooperationFailure | None:
        """A reason to stop the run at this boundary, or None to go on."""
        if run.path == "happy" and run.cancellation is not None:
            return run.cancellation
        for kind, deadline in self._deadlines(run):
            if deadline.at <= run.now:
                return missed(kind, deadline)
        return None

    def wake_at(self, run: RunView) -> datetime | None:
        """When a waiting run should be woken to re-check `give_up` (its earliest deadline)."""
        times = [deadline.at for _, deadline in self._deadlines(run)]
        return min(times) if times else None

    def _deadlines(self, run: RunView) -> list[tuple[str, Deadline]]:
        found: list[tuple[str, Deadline]] = []
        path_key = HAPPY_PATH_DEADLINE if run.path == "happy" else ROLLBACK_DEADLINE
        for kind, key in (
            (run.path.replace("happy", "happy path"), path_key),
            ("absolute", ABSOLUTE_DEADLINE),
        ):
            value = run.context.get(key)
            if value is not None:
                found.append((kind, value))
        return found


def missed(kind: str, deadline: Deadline) -> CooperationFailure:
    trace = "; ".join(f"{o.source} at {o.at.isoformat()}" for o in deadline.trace)
    message = f"Missed {kind} deadline of {deadline.source} at {deadline.at.isoformat()}"
    if trace:
        message += f" (looser deadlines: {trace})"
    return CooperationFailure(
        type=DeadlineMissed.wire_type, message=message, source=deadline.source
    )


Registry = EventLoopStrategy
DEFAULT_STRATEGY = EventLoopStrategy()
