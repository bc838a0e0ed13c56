"""Rollbacks: compensations run in exactly the reverse order of the steps, children before
their parents (seed 001); the events a rollback writes (seed 003); a compensation cut short
by a crash runs again elsewhere.

In-process orderings are recorded in a plain list (the steps of all sagas run in this
process); the event log is read with `coop.events`.
"""

from __future__ import annotations

import anyio
import asyncpg

from scoopy import Saga

from .apps.hierarchies import three_level_sagas
from .apps.steps import MyException, add_step
from .helpers import WAIT, MakeCoop, WorkerProcess, both_modes, run_to_end
from .reading import describe, labelled, of_saga

# -- seed 001: distributed stack unwinding ------------------------------------------------


@both_modes
async def test_seed001_three_levels_unwind_in_reverse(make_coop: MakeCoop, listen: bool) -> None:
    """Compensations run in exactly the reverse order of the steps, across three sagas."""
    log: list[str] = []
    _, outcome, _ = await run_to_end(
        make_coop(listen=listen), three_level_sagas(log), "parent-topic"
    )

    assert outcome.status == "rolled_back"
    assert log == ["1", "2", "3", "4", "5", "6", "7", "8", "9"]


@both_modes
async def test_seed001_failing_sibling_rolls_back_first_then_the_others(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Two parallel children: only the orders the seed guarantees are asserted."""
    log: list[str] = []
    parent = Saga("parent-handler")
    add_step(parent, "First parent step", log, does="1", launches="child-topic", undo="7")
    add_step(parent, "Second parent step", log, does="This will never print")
    one = Saga("child-handler-1")
    add_step(one, "First child-1 step", log, does="2a", undo="6")
    add_step(one, "Second child-1 step", log, does="3a", launches="grandchild-topic", undo="5")
    two = Saga("child-handler-2")
    add_step(two, "First child-2 step", log, does="2b", undo="4b")
    fails = MyException("My exception message")
    add_step(two, "Second child-2 step", log, does="3b", raises=fails, undo="never")

    _, outcome, _ = await run_to_end(
        make_coop(listen=listen),
        [("parent-topic", parent), ("child-topic", one), ("child-topic", two)],
        "parent-topic",
    )

    assert outcome.status == "rolled_back"
    assert log[0] == "1"
    assert sorted(log[1:6]) == sorted(["2a", "3a", "2b", "3b", "4b"])
    assert log[6:] == ["5", "6", "7"]
    middle = log[1:6]
    assert middle.index("2a") < middle.index("3a")
    assert middle.index("2b") < middle.index("3b") < middle.index("4b")


@both_modes
async def test_seed001_children_of_a_rolled_back_step_are_compensated_first(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A later step of the parent fails: the committed child's compensations run before its own."""
    log: list[str] = []
    parent = Saga("parent-handler")
    add_step(parent, "First parent step", log, does="1", launches="child-topic", undo="7")
    fails = MyException("My exception message")
    add_step(parent, "Second parent step", log, does="4", raises=fails, undo="never")
    child = Saga("child-handler")
    add_step(child, "First child step", log, does="2", undo="6")
    add_step(child, "Second child step", log, does="3", undo="5")

    _, outcome, _ = await run_to_end(
        make_coop(listen=listen), [("parent-topic", parent), ("child-topic", child)], "parent-topic"
    )

    assert outcome.status == "rolled_back"
    assert log == ["1", "2", "3", "4", "5", "6", "7"]


# -- seed 003: message-event tables of rollbacks ------------------------------------------


@both_modes
async def test_seed003_failing_first_step_emits_nothing(make_coop: MakeCoop, listen: bool) -> None:
    """A step that launches and throws: its launch never happens; ROLLING_BACK then ROLLED_BACK."""
    root = Saga("root-handler")
    add_step(root, "0", launches="child-topic", raises=RuntimeError("Geronimo!"))
    child = Saga("child-handler")
    add_step(child, "0")

    handle, outcome, events = await run_to_end(
        make_coop(listen=listen), [("root-topic", root), ("child-topic", child)], "root-topic"
    )

    assert outcome.status == "rolled_back"
    assert labelled(events, handle.id) == [
        ("root", "EMITTED", None, None, None),
        ("root", "SEEN", "root-handler", None, None),
        ("root", "ROLLING_BACK", "root-handler", "0", 'RuntimeError("Geronimo!")'),
        ("root", "ROLLED_BACK", "root-handler", "Rollback of 0", None),
    ]


@both_modes
async def test_seed003_failing_compensation_is_rollback_failed(
    make_coop: MakeCoop, listen: bool
) -> None:
    """Step 1 throws; step 0's compensation throws: ROLLBACK_FAILED on `Rollback of 0`."""
    root = Saga("root-handler")
    add_step(root, "0", undo_raises=ValueError("Geronimo again!"))
    add_step(root, "1", launches="child-topic", raises=RuntimeError("Geronimo!"))
    child = Saga("child-handler")
    add_step(child, "0")

    handle, outcome, events = await run_to_end(
        make_coop(listen=listen), [("root-topic", root), ("child-topic", child)], "root-topic"
    )

    assert outcome.status == "rollback_failed"
    assert labelled(events, handle.id) == [
        ("root", "EMITTED", None, None, None),
        ("root", "SEEN", "root-handler", None, None),
        ("root", "SUSPENDED", "root-handler", "0", None),
        ("root", "ROLLING_BACK", "root-handler", "1", 'RuntimeError("Geronimo!")'),
        ("root", "SUSPENDED", "root-handler", "Rollback of 0 (rolling back child scopes)", None),
        (
            "root",
            "ROLLBACK_FAILED",
            "root-handler",
            "Rollback of 0",
            'ValueError("Geronimo again!")',
        ),
    ]


@both_modes
async def test_seed003_failing_child_rolls_back_then_its_parent(
    make_coop: MakeCoop, listen: bool
) -> None:
    """The child's rollback completes first; the parent then rolls its child scopes back."""
    root = Saga("root-handler")
    add_step(root, "0", launches="child-topic")
    child = Saga("child-handler")
    add_step(child, "0")
    add_step(child, "1", raises=RuntimeError("Geronimo!"))

    handle, outcome, events = await run_to_end(
        make_coop(listen=listen), [("root-topic", root), ("child-topic", child)], "root-topic"
    )

    assert outcome.status == "rolled_back"
    children = "Rollback of 0 (rolling back child scopes)"
    geronimo = 'RuntimeError("Geronimo!")'
    assert labelled(events, handle.id) == [
        ("root", "EMITTED", None, None, None),
        ("root", "SEEN", "root-handler", None, None),
        ("child-1", "EMITTED", "root-handler", "0", None),
        ("root", "SUSPENDED", "root-handler", "0", None),
        ("child-1", "SEEN", "child-handler", None, None),
        ("child-1", "SUSPENDED", "child-handler", "0", None),
        ("child-1", "ROLLING_BACK", "child-handler", "1", geronimo),
        ("child-1", "SUSPENDED", "child-handler", children, None),
        ("child-1", "SUSPENDED", "child-handler", "Rollback of 0", None),
        ("child-1", "ROLLED_BACK", "child-handler", "Rollback of 0", None),
        ("root", "ROLLING_BACK", "root-handler", "0", f"ChildRolledBack({geronimo})"),
        (
            "child-1",
            "ROLLBACK_EMITTED",
            "root-handler",
            children,
            f"ParentSaidSo(ChildRolledBack({geronimo}))",
        ),
        ("root", "SUSPENDED", "root-handler", children, None),
        ("root", "SUSPENDED", "root-handler", "Rollback of 0", None),
        ("root", "ROLLED_BACK", "root-handler", "Rollback of 0", None),
    ]


# -- crashes ------------------------------------------------------------------------------


async def test_worker_killed_during_a_compensation_finishes_it_elsewhere_exactly_once(
    dsn: str,
    schema: str,
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """SIGKILL mid-compensation: another worker reruns it (at least once); its write, once."""
    app = "tests.apps.compensations:setup"
    await db.execute("CREATE TABLE ledger (run_id uuid, what text, pid int)")
    compensating: list[str] = []
    signalled = anyio.Event()

    def on_notify(*args: object) -> None:
        compensating.append(str(args[-1]))
        signalled.set()

    await db.add_listener(f"{schema}_compensating", on_notify)
    async with make_coop(worker=False) as coop:
        async with WorkerProcess(dsn, schema, app, HANG_IN_COMPENSATION="1") as doomed:
            handle = await coop.launch("bookings", {})
            with anyio.fail_after(WAIT):
                await signalled.wait()
            await doomed.kill()
        async with WorkerProcess(dsn, schema, app) as survivor:
            outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back", outcome.failure
    assert describe(outcome.failure) == 'CardDeclined("card declined")'
    # The compensation started in the killed worker (at least once) ...
    assert compensating == [str(doomed.pid)]
    # ... but only the survivor's run of it committed its business write (exactly once).
    rows = [(r["what"], r["pid"]) for r in await db.fetch("SELECT what, pid FROM ledger")]
    assert sorted(rows) == sorted([("reserved", doomed.pid), ("released", survivor.pid)])
    assert of_saga(events, "booking") == [
        ("SEEN", None),
        ("SUSPENDED", "reserve"),
        ("ROLLING_BACK", "charge"),
        ("SUSPENDED", "Rollback of reserve (rolling back child scopes)"),
        ("SUSPENDED", "Rollback of reserve"),
        ("ROLLED_BACK", "Rollback of reserve"),
    ]
    # Who wrote what: the doomed worker got as far as the child-scope sub-step; the survivor
    # ran the compensation again and finished the rollback.
    # (Worker ids read "<host>/<pid>/<suffix>".)
    writers = [
        (e.type, e.step, int(str(e.worker).rsplit("/", 2)[1]))
        for e in events
        if e.saga == "booking" and e.type != "SEEN"
    ]
    assert writers == [
        ("SUSPENDED", "reserve", doomed.pid),
        ("ROLLING_BACK", "charge", doomed.pid),
        ("SUSPENDED", "Rollback of reserve (rolling back child scopes)", doomed.pid),
        ("SUSPENDED", "Rollback of reserve", survivor.pid),
        ("ROLLED_BACK", "Rollback of reserve", survivor.pid),
    ]
