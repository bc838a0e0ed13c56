"""Loops (REPEAT, goto, CONTINUE): every iteration waits for its children, and a rollback
compensates each committed iteration, newest first.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from scoopy import Message, NextStep, Saga, Scope

from .apps.steps import MyException, add_step
from .helpers import WAIT, MakeCoop, both_modes, run_to_end


@both_modes
async def test_every_loop_form_waits_for_each_iterations_children(
    make_coop: MakeCoop, listen: bool
) -> None:
    """REPEAT, goto(self), goto(an earlier step) and CONTINUE: `scope.iteration` counts
    consecutive executions of a step (reset by any other step), and every iteration's
    children have all committed before the next step execution starts."""
    trace: list[tuple[str, int]] = []
    committed_kids_at_start: list[int] = []
    unfinished_kids_at_start: list[int] = []
    kid_payloads: list[dict[str, Any]] = []
    passes_key = "passes"

    looper = Saga("looper")

    async def enter(scope: Scope) -> None:
        trace.append((scope.step, scope.iteration))
        counts = await scope.connection.fetchrow(
            f"""SELECT count(*) FILTER (WHERE status = 'committed') AS done,
                       count(*) FILTER (WHERE status <> 'committed') AS open
                  FROM "{schema}".run WHERE saga = 'loop-kid'"""
        )
        assert counts is not None
        committed_kids_at_start.append(counts["done"])
        unfinished_kids_at_start.append(counts["open"])
        await scope.launch("loop-kid", {"step": scope.step, "iteration": scope.iteration})

    @looper.step("repeat")
    async def repeat(scope: Scope, message: Message[Any]) -> NextStep | None:
        await enter(scope)
        return NextStep.REPEAT if scope.iteration < 2 else None

    @looper.step("self")
    async def itself(scope: Scope, message: Message[Any]) -> NextStep | None:
        await enter(scope)
        return NextStep.goto(itself) if scope.iteration < 1 else NextStep.CONTINUE

    @looper.step("back")
    async def back(scope: Scope, message: Message[Any]) -> NextStep | None:
        await enter(scope)
        passes = scope.context.get(passes_key, 0)
        scope.context[passes_key] = passes + 1
        return NextStep.goto("self") if passes == 0 else NextStep.CONTINUE

    @looper.step("end")
    async def end(scope: Scope, message: Message[Any]) -> NextStep | None:
        await enter(scope)
        return NextStep.CONTINUE

    kid = Saga("loop-kid")

    # Children take a while: a parent that did not wait for them would show.
    add_step(kid, "work", sleeps=0.03)

    @kid.step()
    async def done(scope: Scope, message: Message[Any]) -> None:
        kid_payloads.append(message.payload)

    async with make_coop(listen=listen) as coop:
        schema = coop.schema
        coop.subscribe("loops", looper)
        coop.subscribe("loop-kid", kid)
        handle = await coop.launch("loops", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    expected = [
        ("repeat", 0), ("repeat", 1), ("repeat", 2),
        ("self", 0), ("self", 1), ("back", 0),
        ("self", 0), ("self", 1), ("back", 0),
        ("end", 0),
    ]  # fmt: skip
    assert trace == expected
    assert [
        (e.step, e.iteration) for e in events if e.saga == "looper" and e.type == "SUSPENDED"
    ] == expected
    assert committed_kids_at_start == list(range(len(expected)))
    assert unfinished_kids_at_start == [0] * len(expected)
    assert kid_payloads == [{"step": s, "iteration": i} for s, i in expected]
    # In the log, each kid committed before the parent's next step instance was recorded.
    parent_suspends = [e.seq for e in events if e.saga == "looper" and e.type == "SUSPENDED"]
    kid_commits = [e.seq for e in events if e.saga == "loop-kid" and e.type == "COMMITTED"]
    assert len(kid_commits) == len(expected)
    for index, commit in enumerate(kid_commits):
        assert parent_suspends[index] < commit
        if index + 1 < len(parent_suspends):
            assert commit < parent_suspends[index + 1]


# -- rollback of loops --------------------------------------------------------------------


@both_modes
async def test_each_iteration_of_a_repeated_step_is_compensated_newest_first(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A step run three times (REPEAT) is compensated three times, each with its iteration."""
    log: list[tuple[str, int]] = []
    saga = Saga("looper")

    @saga.step()
    async def collect(scope: Scope, message: Message[Any]) -> NextStep | None:
        log.append(("collect", scope.iteration))
        return NextStep.REPEAT if scope.iteration < 2 else None

    @collect.rollback
    async def uncollect(scope: Scope, message: Message[Any], f: BaseException) -> None:
        log.append(("uncollect", scope.iteration))

    add_step(saga, "fail", raises=MyException("after the loop"))

    _, outcome, events = await run_to_end(make_coop(listen=listen), [("loop", saga)], "loop")

    assert outcome.status == "rolled_back"
    assert log == [
        ("collect", 0),
        ("collect", 1),
        ("collect", 2),
        ("uncollect", 2),
        ("uncollect", 1),
        ("uncollect", 0),
    ]
    assert [(e.step, e.iteration) for e in events if e.phase == "compensation"] == [
        ("Rollback of collect", 2),
        ("Rollback of collect", 1),
        ("Rollback of collect", 0),
    ]


@both_modes
async def test_rolling_back_a_loop_compensates_each_committed_iteration_newest_first(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A step that committed iterations 0-2 and failed in iteration 3 is compensated three
    times, newest first, each compensation told its iteration and preceded by the rollback
    of that iteration's children; the failing iteration is not compensated."""
    compensations: list[tuple[str, int]] = []
    looped = Saga("looped")

    prep = add_step(looped, "prep")

    @prep.rollback
    async def unprep(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        compensations.append(("prep", scope.iteration))

    @looped.step()
    async def work(scope: Scope, message: Message[Any]) -> NextStep:
        await scope.launch("loop-child", {"iteration": scope.iteration})
        if scope.iteration == 3:
            raise MyException(f"iteration {scope.iteration} failed")
        return NextStep.REPEAT

    @work.rollback
    async def unwork(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        compensations.append(("work", scope.iteration))

    child = Saga("loop-child")

    do = add_step(child, "do")

    @do.rollback
    async def undo(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        compensations.append(("child", message.payload["iteration"]))

    async with make_coop(listen=listen) as coop:
        coop.subscribe("looped", looped)
        coop.subscribe("loop-child", child)
        handle = await coop.launch("looped", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)
        runs = await coop.runs(handle.id)

    assert outcome.status == "rolled_back"
    assert outcome.failure is not None and outcome.failure.message == "iteration 3 failed"
    assert compensations == [
        ("child", 2), ("work", 2),
        ("child", 1), ("work", 1),
        ("child", 0), ("work", 0),
        ("prep", 0),
    ]  # fmt: skip
    # The failing iteration's launch vanished with its transaction: three children only.
    assert Counter(run.saga for run in runs) == {"looped": 1, "loop-child": 3}
    assert {run.status for run in runs} == {"rolled_back"}
    assert [
        (e.step, e.iteration)
        for e in events
        if e.saga == "looped" and e.type == "SUSPENDED" and e.phase == "compensation"
    ] == [("Rollback of work", 2), ("Rollback of work", 1), ("Rollback of work", 0),
          ("Rollback of prep", 0)]  # fmt: skip
    rolling = [e for e in events if e.saga == "looped" and e.type == "ROLLING_BACK"]
    assert [e.step for e in rolling] == ["work"]
