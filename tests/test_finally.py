"""try/finally around the work a step launches (`Step.finally_`, seed 001's resource example):
the finally action runs exactly once, whichever way the work ends.
"""

from __future__ import annotations

from typing import Any

from scoopy import Message, Saga, Scope

from .apps.hierarchies import provisioning
from .apps.steps import MyException, add_step, logged
from .helpers import MakeCoop, both_modes, run_to_end
from .reading import describe, of_saga


@both_modes
async def test_finally_runs_once_after_children_succeed(make_coop: MakeCoop, listen: bool) -> None:
    """Children commit: `finally_` runs once, after them and before the next step."""
    log: list[str] = []
    _, outcome, events = await run_to_end(
        make_coop(listen=listen), provisioning(log, child_fails=False, later_fails=False), "root"
    )

    assert outcome.status == "committed", outcome.failure
    assert log == ["spin up", "calculate", "spin down", "report"]
    assert of_saga(events, "root-handler") == [
        ("SEEN", None),
        ("EMITTED", "provision"),
        ("SUSPENDED", "provision"),
        ("SUSPENDED", "provision (finally)"),
        ("SUSPENDED", "report"),
        ("COMMITTED", "report"),
    ]


@both_modes
async def test_finally_runs_once_during_rollback_when_a_child_fails(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A child fails: `finally_` runs once, after the child rolled back, before the compensation."""
    log: list[str] = []
    _, outcome, _ = await run_to_end(
        make_coop(listen=listen), provisioning(log, child_fails=True, later_fails=False), "root"
    )

    assert outcome.status == "rolled_back"
    assert log == ["spin up", "calculate", "spin down", "undo provision"]


@both_modes
async def test_finally_is_not_run_again_when_a_later_step_fails(
    make_coop: MakeCoop, listen: bool
) -> None:
    """`finally_` ran after the children; a later failure's rollback does not run it again."""
    log: list[str] = []
    _, outcome, _ = await run_to_end(
        make_coop(listen=listen), provisioning(log, child_fails=False, later_fails=True), "root"
    )

    assert outcome.status == "rolled_back"
    assert log == [
        "spin up",
        "calculate",
        "spin down",
        "report",
        "undo calculate",
        "undo provision",
    ]


@both_modes
async def test_finally_runs_once_when_the_step_itself_raises(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A `finally_` step whose body launches a child and then raises: the finally action runs
    exactly once, the child never starts (its message went with the doomed transaction), the
    run rolls back compensating only the earlier step, and no "(finally)" step runs later."""
    log: list[str] = []
    job = Saga("big-computation")

    logged(job, "book", log)
    nothing = "never: the failing step committed nothing to compensate"
    fails = MyException("no capacity")
    spin_up = add_step(
        job, "spin_up", log, does="spin up", launches="calculate", raises=fails, undo=nothing
    )

    @spin_up.finally_
    async def spin_down(scope: Scope, message: Message[Any]) -> None:
        log.append("spin down")

    add_step(job, "report", log, does="never: report")
    calculation = Saga("calculation")
    add_step(calculation, "calculate", log, does="never: calculate")

    _, outcome, events = await run_to_end(
        make_coop(listen=listen), [("jobs", job), ("calculate", calculation)], "jobs"
    )

    assert outcome.status == "rolled_back"
    assert log == ["book", "spin up", "spin down", "unbook"]
    assert describe(outcome.failure) == 'MyException("no capacity")'
    assert of_saga(events, "big-computation") == [
        ("SEEN", None),
        ("SUSPENDED", "book"),
        ("ROLLING_BACK", "spin_up"),
        ("SUSPENDED", "Rollback of book (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of book"),
        ("ROLLED_BACK", "Rollback of book"),
    ]
    assert {e.saga for e in events} == {None, "big-computation"}  # no calculation run
    assert [run.saga for run in outcome.runs] == ["big-computation"]
