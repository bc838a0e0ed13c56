"""Building blocks for the sagas of the in-process tests: a step from what it does.

`add_step` spells a step by what it logs, launches, sleeps and raises, and what its
compensation logs and raises, so that a test's saga family reads as a table of its steps.
"""

from __future__ import annotations

from typing import Any

from scoopy import Message, Saga, Scope
from scoopy.saga import Step


class MyException(Exception):
    """A business failure raised by a step."""


def add_step(
    saga: Saga,
    name: str,
    log: list[str] | None = None,
    *,
    does: str | None = None,
    launches: str | None = None,
    sleeps: float | None = None,
    raises: Exception | None = None,
    undo: str | None = None,
    undo_raises: Exception | None = None,
) -> Step:
    """Add step `name` to `saga`. It does, in this order: append `does` to `log`, launch `{}`
    onto the topic `launches`, sleep `sleeps` seconds (durably), raise `raises`.

    It has a compensation only if `undo` or `undo_raises` is given: that appends `undo` to
    `log`, then raises `undo_raises`. Every raise raises a fresh copy of the example given.
    """

    def note(entry: str | None) -> None:
        if entry is not None:
            assert log is not None, "a step that logs needs the log"
            log.append(entry)

    async def run(scope: Scope, message: Message[Any]) -> None:
        note(does)
        if launches is not None:
            await scope.launch(launches, {})
        if sleeps is not None:
            await scope.sleep(sleeps)
        if raises is not None:
            raise type(raises)(*raises.args)

    async def compensate(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        note(undo)
        if undo_raises is not None:
            raise type(undo_raises)(*undo_raises.args)

    step = saga.step(name)(run)
    if undo is not None or undo_raises is not None:
        step.rollback(compensate)
    return step


def logged(saga: Saga, name: str, log: list[str]) -> Step:
    """Add step `name` to `saga`: it appends `name` to `log`, its compensation "un" + name."""
    return add_step(saga, name, log, does=name, undo="un" + name)
