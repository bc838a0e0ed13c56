"""Reading what a hierarchy did: its events and the failures on them."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from scoopy import CooperationFailure, Event


def triples(
    events: Sequence[Event], *, sagas: Sequence[str] | None = None
) -> list[tuple[str, str | None, str | None]]:
    """(type, saga, step) of each event, optionally only for some sagas."""
    return [
        (e.type, e.saga, e.step)
        for e in events
        if sagas is None or e.saga in sagas or (e.saga is None and None in sagas)
    ]


def of_saga(events: Sequence[Event], saga: str) -> list[tuple[str, str | None]]:
    """(type, step) of the events one saga's runs wrote, in order."""
    return [(e.type, e.step) for e in events if e.saga == saga]


def describe(failure: CooperationFailure | None) -> str | None:
    """A failure tree in the notation of seed 003: `ChildRolledBack(RuntimeError("Geronimo!"))`.

    Leaves show their message; wrappers show their causes.
    """
    if failure is None:
        return None
    name = failure.type.rsplit(".", 1)[-1]
    if failure.causes:
        return f"{name}({', '.join(str(describe(cause)) for cause in failure.causes)})"
    return f'{name}("{failure.message}")'


def failure_types(failure: CooperationFailure | None) -> list[str]:
    """Every failure type in a failure's cause tree, depth first."""
    assert failure is not None
    return [f.type for f in failure.walk()]


def find(failure: CooperationFailure | None, type_: str) -> CooperationFailure:
    """The one failure of `type_` in a failure's cause tree."""
    assert failure is not None
    (found,) = [f for f in failure.walk() if f.type == type_]
    return found


def run_of(events: Sequence[Event], saga: str) -> uuid.UUID:
    """The run id of the (single) run of `saga` in the log."""
    found = {e.run_id for e in events if e.saga == saga and e.type == "SEEN"}
    assert len(found) == 1, found
    run = found.pop()
    assert run is not None
    return run


def failure_of(events: Sequence[Event], saga: str, kind: str) -> CooperationFailure:
    """The failure on the single event of type `kind` written by `saga`."""
    [failure] = [e.failure for e in events if e.saga == saga and e.type == kind]
    assert failure is not None
    return failure


def labelled(
    events: Sequence[Event], root_id: uuid.UUID
) -> list[tuple[str, str, str | None, str | None, str | None]]:
    """Rows shaped like the seed-003 tables: (message, type, saga, step, failure).

    Messages are labelled "root", then "child-1", "child-2"... in the order they were emitted.
    """
    labels = {root_id: "root"}
    for event in events:
        if event.type == "EMITTED" and event.message_id not in labels:
            assert event.message_id is not None
            labels[event.message_id] = f"child-{len(labels)}"
    rows = []
    for event in events:
        assert event.message_id is not None
        rows.append(
            (labels[event.message_id], event.type, event.saga, event.step, describe(event.failure))
        )
    return rows


def has(events: Sequence[Event], type_: str, saga: str, step: str | None = None) -> bool:
    """Whether `saga` wrote an event of type `type_` (at step `step`, if given)."""
    return any(
        e.type == type_ and e.saga == saga and (step is None or e.step == step) for e in events
    )
