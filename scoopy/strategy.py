"""EventLoopStrategy: when a run may resume, when it gives up, whom its parent waits for.

A strategy belongs to a saga and is consulted, with plain Python values, at every step
boundary of that saga's runs and whenever a waiting run is woken. It never produces SQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
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
    now: datetime  # the database clock
    context: CooperationContext
    cancellation: CooperationFailure | None  # set when this run or an ancestor was cancelled
    sleep_until: datetime | None = None  # what the run asked for (scope.sleep, retry backoff)
    suspended_at: datetime | None = None  # when its latest step finished
    waiting: bool = False  # whether it is waiting for children right now


class EventLoopStrategy:
    """The default ("registry") strategy.

    - Children: every saga subscribed to a topic when the message was emitted (the
      `subscription` table) is a child, and the parent waits for all of them.
    - Resume: as soon as the children finished and any requested sleep is over.
    - Give up on the happy path when cancellation was requested for the run or an ancestor,
      or its happy-path or absolute deadline passed; on the rollback path when its rollback
      or absolute deadline passed. Children that never started are then skipped.

    Subclass it and override any method to change one decision.
    """

    def give_up(self, run: RunView) -> CooperationFailure | None:
        """A reason to stop the run at this boundary, or None to go on."""
        if run.path == "happy" and run.cancellation is not None:
            return run.cancellation
        for kind, value in self.deadlines(run):
            if value.at <= run.now:
                return missed(kind, value)
        return None

    def resume_at(self, run: RunView) -> datetime | None:
        """A time before which the run may not take its next step (None: no constraint).

        It can only delay a run: what the run asked for itself (`run.sleep_until`, from
        `scope.sleep` or a retry backoff) holds anyway.
        """
        return None

    def detach_unstarted(self, run: RunView) -> bool:
        """Whether to stop waiting for children that have not started yet.

        Detached children still run, but outside the hierarchy: nobody waits for them.
        """
        return False

    def wake_at(self, run: RunView) -> datetime | None:
        """When a run that waits should be woken to ask `give_up`/`detach_unstarted` again."""
        times = [value.at for _, value in self.deadlines(run)]
        return min(times) if times else None

    def deadlines(self, run: RunView) -> list[tuple[str, Deadline]]:
        """(kind, deadline) pairs that apply to the run's current path."""
        found: list[tuple[str, Deadline]] = []
        path_key, kind = (
            (HAPPY_PATH_DEADLINE, "happy path")
            if run.path == "happy"
            else (ROLLBACK_DEADLINE, "rollback")
        )
        for name, key in ((kind, path_key), ("absolute", ABSOLUTE_DEADLINE)):
            value = run.context.get(key)
            if value is not None:
                found.append((name, value))
        return found


class TimeWindow(EventLoopStrategy):
    """The "train schedule": wait only for children that started within `window`.

    Children that start later run outside the hierarchy (nobody waits for them, their
    failures reach nobody). Use it where the set of listeners cannot be known.
    """

    def __init__(self, window: timedelta | float) -> None:
        self.window = window if isinstance(window, timedelta) else timedelta(seconds=window)

    def detach_unstarted(self, run: RunView) -> bool:
        return run.suspended_at is not None and run.now >= run.suspended_at + self.window

    def wake_at(self, run: RunView) -> datetime | None:
        times = [t for t in (super().wake_at(run), self._closes(run)) if t is not None]
        return min(times) if times else None

    def _closes(self, run: RunView) -> datetime | None:
        if not run.waiting or run.suspended_at is None:
            return None
        closes = run.suspended_at + self.window
        return closes if closes > run.now else None


def missed(kind: str, deadline: Deadline) -> CooperationFailure:
    """The failure for a missed deadline: which deadline, when, and who set it."""
    message = f"Missed {kind} deadline of {deadline.source} at {deadline.at.isoformat()}"
    if deadline.trace:
        looser = "; ".join(f"{o.source} at {o.at.isoformat()}" for o in deadline.trace)
        message += f" (looser deadlines: {looser})"
    return CooperationFailure(
        type=DeadlineMissed.wire_type, message=message, source=deadline.source
    )


Registry = EventLoopStrategy
DEFAULT_STRATEGY = EventLoopStrategy()
