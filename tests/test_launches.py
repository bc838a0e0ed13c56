"""Launching: idempotent (keyed) launches happen once, even raced; guards stop hierarchies that
are too deep or recurse without end.
"""

from __future__ import annotations

import sys
import uuid
from collections import Counter
from typing import Any

import anyio
import asyncpg

from scoopy import Message, NextStep, Saga, Scope

from .apps.steps import add_step
from .helpers import ROOT, WAIT, MakeCoop, both_modes, eventually, run_to_end
from .reading import failure_types, find

# -- idempotent launches ------------------------------------------------------------------


async def test_an_idempotent_launch_raced_from_two_processes_starts_one_hierarchy(
    dsn: str,
    schema: str,
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """Two `scoopy launch --key same` processes whose inserts are released at the same moment
    print the same root id, and exactly one hierarchy exists and runs."""
    charges: list[uuid.UUID] = []
    payer = Saga("payer")

    @payer.step()
    async def charge(scope: Scope, message: Message[Any]) -> None:
        charges.append(message.id)

    args = [
        sys.executable, "-m", "scoopy", "--dsn", dsn, "--schema", schema,
        "launch", "pay", '{"order": 7}', "--key", "order-7",
    ]  # fmt: skip
    printed: list[str] = []

    async def launch() -> None:
        result = await anyio.run_process(args, cwd=ROOT, check=False)
        assert result.returncode == 0, result.stderr.decode()
        printed.append(result.stdout.decode().strip())

    async with make_coop() as coop:
        coop.subscribe("pay", payer)
        await coop.sync()
        async with coop.pool.acquire() as observer, anyio.create_task_group() as tg:
            # Hold the message table so both launches queue up, then release them together.
            lock = db.transaction()
            await lock.start()
            try:
                await db.execute("LOCK TABLE message IN EXCLUSIVE MODE")
                tg.start_soon(launch)
                tg.start_soon(launch)

                async def both_blocked() -> bool:
                    blocked = await observer.fetchval(
                        "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass"
                        " AND NOT granted",
                        f'"{schema}".message',
                    )
                    return bool(blocked >= 2)

                await eventually(both_blocked)
            finally:
                await lock.commit()
        assert len(printed) == 2 and printed[0] == printed[1], printed
        root = uuid.UUID(printed[0])
        outcome = await coop.handle(root).wait(timeout=WAIT)
        events = await coop.events(root)

    assert outcome.status == "committed", outcome.failure
    assert await db.fetchval("SELECT count(*) FROM message WHERE key = 'order-7'") == 1
    assert await db.fetchval("SELECT count(*) FROM message WHERE topic = 'pay'") == 1
    assert [e.type for e in events if e.saga is None] == ["EMITTED"]
    assert charges == [root]


@both_modes
async def test_keyed_launches_in_process_and_inside_a_step_happen_once(
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    """`coop.launch(key=)` twice returns the first hierarchy; `scope.launch(key=)` twice in a
    step, and again in the step's next iteration, emits one message and one child run."""
    kids: list[Any] = []
    returned: list[uuid.UUID] = []
    parent = Saga("keyed-parent")

    @parent.step()
    async def spawn(scope: Scope, message: Message[Any]) -> NextStep | None:
        key = f"kid-of-{message.id}"
        for _ in range(2):
            returned.append((await scope.launch("keyed-kid", {"i": scope.iteration}, key=key)).id)
        return NextStep.REPEAT if scope.iteration < 1 else None

    kid = Saga("keyed-kid")

    @kid.step()
    async def play(scope: Scope, message: Message[Any]) -> None:
        kids.append(message.payload)

    async with make_coop(listen=listen) as coop:
        coop.subscribe("keyed", parent)
        coop.subscribe("keyed-kid", kid)
        first = await coop.launch("keyed", {}, key="keyed-root")
        second = await coop.launch("keyed", {"ignored": True}, key="keyed-root")
        outcome = await first.wait(timeout=WAIT)
        runs = await coop.runs(first.id)

    assert second.id == first.id
    assert outcome.status == "committed", outcome.failure
    assert len(returned) == 4 and len(set(returned)) == 1
    assert kids == [{"i": 0}]
    assert Counter(run.saga for run in runs) == {"keyed-parent": 1, "keyed-kid": 1}
    assert await db.fetchval("SELECT count(*) FROM message WHERE topic = 'keyed'") == 1
    assert await db.fetchval("SELECT count(*) FROM message WHERE topic = 'keyed-kid'") == 1


async def test_two_steps_launching_one_key_at_once_both_get_the_message_that_exists(
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """The step whose keyed launch loses the race is run again and gets the winner's
    message: no committed step ever saw an id that was not stored."""
    await db.execute("CREATE TABLE seen (run int, id uuid)")
    first_in, release = anyio.Event(), anyio.Event()
    racer = Saga("racer", instances=2)

    @racer.step()
    async def launch(scope: Scope, message: Message[Any]) -> None:
        got = (await scope.launch("raced", {}, key="one-key")).id
        await scope.connection.execute(
            f'INSERT INTO "{scope_schema}".seen VALUES ($1, $2)', message.payload["n"], got
        )
        if message.payload["n"] == 0 and not first_in.is_set():
            first_in.set()
            await release.wait()  # holds its transaction open while run 1 launches the key

    kid = Saga("raced-kid")

    add_step(kid, "play")

    async with make_coop() as coop:
        scope_schema = coop.schema
        coop.subscribe("racing", racer)
        coop.subscribe("raced", kid)
        first = await coop.launch("racing", {"n": 0})
        with anyio.fail_after(WAIT):
            await first_in.wait()
        second = await coop.launch("racing", {"n": 1})
        assert (await second.wait(timeout=WAIT)).status == "committed"
        release.set()
        assert (await first.wait(timeout=WAIT)).status == "committed"

    stored = await db.fetch("SELECT id FROM message WHERE topic = 'raced'")
    assert len(stored) == 1
    seen = await db.fetch("SELECT run, id FROM seen ORDER BY run")
    assert [(row["run"], row["id"]) for row in seen] == [(0, stored[0]["id"]), (1, stored[0]["id"])]


async def test_a_step_launching_a_key_that_an_outside_launch_takes_meanwhile_gets_that_one(
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """`coop.launch(key=)` committing while a step holds the same key, unstored, makes the
    step run again; both end up with the one message that exists."""
    ids: list[tuple[str, uuid.UUID]] = []
    saga = Saga("launcher")

    @saga.step()
    async def launch(scope: Scope, message: Message[Any]) -> None:
        mine = (await scope.launch("sunk", {"from": "step"}, key="K")).id
        theirs = (await coop.launch("sunk", {"from": "outside"}, key="K")).id
        ids.append((str(mine), theirs))

    sink = Saga("sink")

    add_step(sink, "sunk")

    coop = make_coop()
    _, outcome, _ = await run_to_end(coop, [("go", saga), ("sunk", sink)], "go")

    assert outcome.status == "committed", outcome.failure
    stored = await db.fetch("SELECT id FROM message WHERE key = 'K'")
    assert len(stored) == 1
    mine, theirs = ids[-1]  # the attempt that committed
    assert uuid.UUID(mine) == theirs == stored[0]["id"]


# -- guards -------------------------------------------------------------------------------


@both_modes
async def test_the_launch_that_would_exceed_max_depth_fails(
    make_coop: MakeCoop,
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    """With `max_depth=3`, a chain of three levels works and the launch that would make it
    four deep fails that step with HierarchyTooDeepError; the whole chain rolls back."""
    depths: list[tuple[str, int]] = []
    sagas: list[tuple[str, Saga]] = []
    for level in range(1, 5):
        saga = Saga(f"level{level}")

        @saga.step()
        async def down(scope: Scope, message: Message[Any]) -> None:
            level = int(scope.saga.removeprefix("level"))
            depths.append((scope.saga, scope.depth))
            await scope.launch(f"l{level + 1}", {})

        sagas.append((f"l{level}", saga))

    _, outcome, _ = await run_to_end(make_coop(listen=listen, max_depth=3), sagas, "l1")

    assert depths == [("level1", 1), ("level2", 2), ("level3", 3)]
    assert outcome.status == "rolled_back"
    too_deep = find(outcome.failure, "scoopy.HierarchyTooDeepError")
    assert too_deep.message == (
        "launching onto 'l4' from 'level3' would make the hierarchy 4 runs deep; the maximum is 3"
    )
    assert too_deep.source.startswith("level3[")
    assert failure_types(outcome.failure) == [
        "scoopy.ChildRolledBack",  # level1: its child level2 rolled back
        "scoopy.ChildRolledBack",  # level2: its child level3 rolled back
        "scoopy.HierarchyTooDeepError",  # level3's own failure
    ]
    assert await db.fetchval("SELECT count(*) FROM message WHERE topic = 'l4'") == 0


@both_modes
async def test_runaway_recursion_is_stopped_and_rolled_back(
    make_coop: MakeCoop, listen: bool
) -> None:
    """A saga that launches onto its own topic without a base case fails with
    RecursionLimitError at `max_recursion` nested runs and every run rolls back, deepest
    first; recursion that ends below the limit commits."""
    compensated: list[int] = []
    echo = Saga("echo")

    @echo.step()
    async def again(scope: Scope, message: Message[Any]) -> None:
        remaining = message.payload.get("remaining")
        if remaining is None or remaining > 0:
            following = None if remaining is None else remaining - 1
            await scope.launch("echo", {"remaining": following})

    @again.rollback
    async def unwind(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        compensated.append(scope.depth)

    async with make_coop(listen=listen, max_recursion=5) as coop:
        coop.subscribe("echo", echo)
        runaway = await coop.launch("echo", {})
        outcome = await runaway.wait(timeout=WAIT)
        runs = await coop.runs(runaway.id)
        bounded = await coop.launch("echo", {"remaining": 4})  # 5 nested runs: at the limit
        fine = await bounded.wait(timeout=WAIT)
        fine_runs = await coop.runs(bounded.id)

    assert outcome.status == "rolled_back"
    limit = find(outcome.failure, "scoopy.RecursionLimitError")
    assert limit.message == (
        "saga 'echo' launches onto its own topic 'echo' from 5 nested runs of itself; "
        "the limit is 5"
    )
    assert len(runs) == 5 and {run.status for run in runs} == {"rolled_back"}
    assert compensated == [4, 3, 2, 1]  # the failing fifth run committed nothing to undo
    assert fine.status == "committed", fine.failure
    assert len(fine_runs) == 5 and {run.status for run in fine_runs} == {"committed"}
