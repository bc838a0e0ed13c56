"""Saga families shared by several in-process tests: each builder returns fresh sagas.

Compensations and steps append to the `log` list a test passes in, so the test can assert
the order in which everything ran.
"""

from __future__ import annotations

import uuid
from typing import Any

from scoopy import Cooperation, Event, Message, Saga, Scope

from ..helpers import eventually
from ..reading import has
from .steps import MyException, add_step

# -- seed 001: distributed stack unwinding, and a resource around a calculation ------------


def three_level_sagas(log: list[str]) -> list[tuple[str, Saga]]:
    """Seed 001's 3-level example: the grandchild's second step throws; 1..9 in order."""
    parent = Saga("parent-handler")
    add_step(parent, "First parent step", log, does="1", launches="child-topic", undo="9")
    add_step(parent, "Second parent step", log, does="This will never print")

    child = Saga("child-handler")
    add_step(child, "First child step", log, does="2", undo="8")
    add_step(child, "Second child step", log, does="3", launches="grandchild-topic", undo="7")

    grandchild = Saga("grandchild-handler")
    add_step(grandchild, "First grandchild step", log, does="4", undo="6")

    # Spelled out: the test of distributed stack traces looks for this function's name.
    @grandchild.step("Second grandchild step")
    async def grandchild_second(scope: Scope, message: Message[Any]) -> None:
        log.append("5")
        raise MyException("My exception message")

    @grandchild_second.rollback
    async def grandchild_second_back(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append("never: the step's transaction rolled back, nothing to compensate")

    return [("parent-topic", parent), ("child-topic", child), ("grandchild-topic", grandchild)]


def provisioning(log: list[str], *, child_fails: bool, later_fails: bool) -> list[tuple[str, Saga]]:
    """Seed 001's resource example: spin up, launch the calculation, spin down in `finally_`."""
    root = Saga("root-handler")
    provision = add_step(
        root, "provision", log, does="spin up", launches="calculate", undo="undo provision"
    )

    @provision.finally_
    async def spin_down(scope: Scope, message: Message[Any]) -> None:
        log.append("spin down")

    report_fails = MyException("report failed") if later_fails else None
    add_step(root, "report", log, does="report", raises=report_fails)

    calculation = Saga("calculation")
    fails = MyException("calculation failed") if child_fails else None
    add_step(calculation, "calculate", log, does="calculate", raises=fails, undo="undo calculate")
    return [("root", root), ("calculate", calculation)]


# -- a hierarchy waiting in its grandchild ---------------------------------------------------


def waiting_hierarchy(log: list[str]) -> list[tuple[str, Saga]]:
    """parent -> child -> grandchild, the grandchild durably asleep in its first step."""
    parent = Saga("parent")
    add_step(parent, "order", log, launches="child", undo="undo parent")
    child = Saga("child")
    add_step(child, "pack", log, launches="grandchild", undo="undo child")
    grandchild = Saga("grandchild")
    add_step(grandchild, "hold", log, sleeps=3600, undo="undo grandchild")
    add_step(grandchild, "ship", log, does="never shipped")
    return [("parent", parent), ("child", child), ("grandchild", grandchild)]


def is_asleep(event: Event) -> bool:
    """Whether `event` shows the grandchild of `waiting_hierarchy` asleep in its first step."""
    return event.saga == "grandchild" and event.type == "SUSPENDED" and event.step == "hold"


# -- a root whose two children each have a child of their own --------------------------------


def undo_target(log: list[str]) -> list[tuple[str, Saga]]:
    """root -> {a, b} on one message -> a's and b's own grandchildren; all compensations log."""
    root = Saga("root")
    add_step(root, "fan_out", log, launches="kids", undo="undo root")

    async def undo(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append(f"undo {scope.saga}: {type(f).__name__}")

    sagas: list[tuple[str, Saga]] = [("root", root)]
    for name in ("a", "b"):
        child = Saga(name)
        add_step(child, "delegate", launches=f"{name}-grand").rollback(undo)
        grand = Saga(f"{name}-grand")
        add_step(grand, "work").rollback(undo)
        sagas += [("kids", child), (f"{name}-grand", grand)]
    return sagas


# -- a parent waiting for a child that has not started -----------------------------------------


def waiting_parent() -> tuple[Saga, Saga, Saga, list[str]]:
    """A parent that launches to a fast saga and a (to be paused) absent one."""
    ran: list[str] = []
    parent = Saga("waiter")
    add_step(parent, "place", ran, does="place", launches="placed", undo="unplace")
    add_step(parent, "complete", ran, does="complete")
    ship = Saga("ship")
    add_step(ship, "dispatch", ran, does="ship")
    absent = Saga("absent")

    @absent.step()
    async def never(scope: Scope, message: Message[Any]) -> None:
        ran.append(f"absent:{message.topic}")

    return parent, ship, absent, ran


async def parent_is_waiting(coop: Cooperation, root_id: uuid.UUID) -> None:
    """Wait until the parent suspended after `place` and its fast child committed."""

    async def check() -> bool:
        events = await coop.events(root_id)
        return has(events, "SUSPENDED", "waiter", "place") and has(events, "COMMITTED", "ship")

    await eventually(check)


# -- children that answer ---------------------------------------------------------------------


def answering_sagas() -> tuple[Saga, Saga]:
    """Two children on "answers": one answers and commits, one answers and then fails."""
    steady = Saga("steady")

    @steady.step()
    async def answer(scope: Scope, message: Message[Any]) -> None:
        scope.set_result("steady answer")

    flaky = Saga("flaky")

    @flaky.step()
    async def first(scope: Scope, message: Message[Any]) -> None:
        scope.set_result("flaky answer")

    add_step(flaky, "second", raises=MyException("flaky failed after answering"))

    return steady, flaky
