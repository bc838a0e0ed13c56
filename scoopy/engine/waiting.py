"""Waiting for hierarchies to finish, and what their outcome is.

A process learns that a hierarchy finished from its own commits and from other processes'
notifications (`d:<root id>`). Waiters are woken by that news and then ask the database;
without news (poll-only mode, another process) they ask again every poll interval.
"""

from __future__ import annotations

import uuid
import weakref
from collections.abc import Awaitable, Callable, Sequence

import anyio

from ..errors import DatabaseUnavailableError
from ..failure import CooperationError, CooperationFailure
from ..results import Outcome, RunSummary, Waiting, WaitingKind
from ..vocab import COMMITTED, ROLLBACK_FAILED, ROLLED_BACK, UNFINISHED, UNHANDLED, Ending
from .records import RunEnding, WaitRow


class Watch:
    """Set when this process learns that one hierarchy finished (held by its handle)."""

    __slots__ = ("__weakref__", "finished")

    def __init__(self) -> None:
        self.finished = anyio.Event()


class Waiters:
    """Who in this process waits for which hierarchy."""

    def __init__(self, poll_interval: float) -> None:
        self.poll_interval = poll_interval
        self._waiting: dict[uuid.UUID, set[anyio.Event]] = {}
        # Handles from `launch` watch from before their runs exist, so waiting needs no query
        # before the news arrives; a handle nobody keeps is forgotten with it.
        self._watches: weakref.WeakValueDictionary[uuid.UUID, Watch] = weakref.WeakValueDictionary()

    def watch(self, root_id: uuid.UUID) -> Watch:
        watch = Watch()
        self._watches[root_id] = watch
        return watch

    def forget(self, root_id: uuid.UUID) -> None:
        self._watches.pop(root_id, None)

    def done(self, root_id: uuid.UUID | None) -> None:
        """Wake whoever waits for `root_id` (None: everyone, after a lost connection)."""
        if root_id is None:
            targets = list(self._waiting.values())
            watches = list(self._watches.values())
        else:
            targets = [self._waiting.get(root_id, set())]
            found = self._watches.get(root_id)
            watches = [] if found is None else [found]
        for events in targets:
            for event in events:
                event.set()
        for watch in watches:
            watch.finished.set()

    async def wait(
        self,
        root_id: uuid.UUID,
        outcome: Callable[[uuid.UUID], Awaitable[Outcome | None]],
        timeout: float | None = None,
        watch: Watch | None = None,
    ) -> Outcome:
        """Wait until `outcome(root_id)` is known (TimeoutError after `timeout`)."""
        with anyio.fail_after(timeout):
            if watch is not None:
                # Registered before the launch committed: nothing can be missed, and the
                # poll interval bounds the wait if the news comes from another process
                # without notifications.
                with anyio.move_on_after(self.poll_interval):
                    await watch.finished.wait()
            while True:
                event = anyio.Event()
                self._waiting.setdefault(root_id, set()).add(event)
                try:
                    try:
                        found = await outcome(root_id)
                    except DatabaseUnavailableError:
                        found = None  # an outage is not an outcome: keep waiting it out
                    if found is not None:
                        return found
                    with anyio.move_on_after(self.poll_interval):
                        await event.wait()
                finally:
                    waiting = self._waiting.get(root_id)
                    if waiting is not None:
                        waiting.discard(event)
                        if not waiting:
                            del self._waiting[root_id]


def outcome_of(root_id: uuid.UUID, runs: Sequence[RunEnding]) -> Outcome | None:
    """The hierarchy's outcome from its root runs, or None while any is unfinished."""
    if not runs:  # launched with allow_unhandled=True, or before launches were checked
        return Outcome(
            root_id,
            UNHANDLED,
            CooperationFailure(
                type="scoopy.Unhandled",
                message=f"no saga subscribed to the topic of message {root_id} when it was "
                "launched: nothing ran",
                source="scoopy",
            ),
            (),
        )
    if any(run.status in UNFINISHED for run in runs):
        return None
    failures: list[CooperationFailure] = []
    status: Ending = COMMITTED
    for run in runs:
        if run.status == ROLLBACK_FAILED:
            status = ROLLBACK_FAILED
            if run.rollback_failure is not None:
                failures.append(CooperationFailure.from_json(run.rollback_failure))
        elif run.status == ROLLED_BACK:
            if status == COMMITTED:
                status = ROLLED_BACK
            if run.failure is not None:
                failures.append(CooperationFailure.from_json(run.failure))
    failure = None
    if len(failures) == 1:
        failure = failures[0]
    elif failures:
        failure = CooperationFailure(
            type=CooperationError.wire_type,
            message=f"{len(failures)} runs started by message {root_id} failed",
            source="scoopy",
            causes=failures,
        )
    summaries = tuple(RunSummary(run.id, run.saga, run.status) for run in runs)
    return Outcome(root_id, status, failure, summaries)


def waiting_for(rows: Sequence[WaitRow]) -> list[Waiting]:
    """What each unfinished run waits for, most telling reason first."""
    found = []
    for row in rows:
        since = None
        until = None
        kind: WaitingKind
        if row.running_on is not None:
            kind, detail = "running", f"running a step on {row.running_on}"
        elif row.held is not None:
            kind, detail = "held", f"held: {row.held}"
        elif row.paused:
            kind, detail = "paused", f"saga {row.saga!r} is paused (`scoopy resume {row.saga}`)"
        elif row.pending > 0:
            kind, detail = "children", f"waiting for {row.pending} child run(s)"
        elif not row.served:
            since = row.last_served
            last = "never" if since is None else since.isoformat(timespec="seconds")
            kind = "unserved"
            detail = f"no live worker serves saga {row.saga!r} (last served: {last})"
        elif row.due and row.rate_until is not None:
            until = row.rate_until
            kind = "limited"
            detail = f"waiting for its saga's rate limit (next start at {until.isoformat()})"
        elif row.due and row.concurrency is not None and row.slots_taken >= row.concurrency:
            kind = "limited"
            detail = (
                f"waiting for its saga's concurrency limit ({row.slots_taken} of "
                f"{row.concurrency} running)"
            )
        elif row.due:
            kind, detail = "ready", "ready, waiting for a free worker slot"
        else:
            until = row.ready_at or row.resume_at
            when = "its children" if until is None else until.isoformat(timespec="seconds")
            kind, detail = "sleeping", f"sleeping until {when}"
        found.append(Waiting(row.id, row.saga, row.status, kind, detail, since=since, until=until))
    return found
