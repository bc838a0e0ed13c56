"""Time and control flow: durable sleep, scheduled and periodic launches, loops, results,
time windows, topology changes, idempotent launches, guards and pause/resume."""

from __future__ import annotations

import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import msgspec
import pytest

from scoopy import (
    HAPPY_PATH_DEADLINE,
    Cooperation,
    CooperationError,
    CooperationFailure,
    Event,
    Message,
    NextStep,
    PayloadError,
    Saga,
    ScoopyError,
    Scope,
    TimeWindow,
    Topic,
    deadline,
)
from scoopy.periodic import CatchUp

from .helpers import ROOT, WAIT, WorkerProcess, both_modes, eventually, of_saga

APP = "tests.apps.timed:setup"
PERIODIC = "scoopy.periodic"
PERIOD = 0.2  # seconds between firings of the periodic schedules below
QUIET_PERIODS = 2.5


class Boom(Exception):
    pass


# -- helpers ------------------------------------------------------------------------------


until = eventually


async def db_now(db: asyncpg.Connection[asyncpg.Record]) -> datetime:
    """The database clock (the clock scoopy's timers use)."""
    now: datetime = await db.fetchval("SELECT clock_timestamp()")
    return now


def has(events: Sequence[Event], type_: str, saga: str, step: str | None = None) -> bool:
    return any(
        e.type == type_ and e.saga == saga and (step is None or e.step == step) for e in events
    )


def failure_types(failure: CooperationFailure | None) -> list[str]:
    """Every failure type in a failure's cause tree, depth first."""
    assert failure is not None
    return [f.type for f in failure.walk()]


def find(failure: CooperationFailure | None, type_: str) -> CooperationFailure:
    """The one failure of `type_` in a failure's cause tree."""
    assert failure is not None
    (found,) = [f for f in failure.walk() if f.type == type_]
    return found


def due_of(key: str) -> datetime:
    """The due time encoded in a periodic key ("...@<iso>/<chain>")."""
    return datetime.fromisoformat(key.rsplit("@", 1)[1].split("/", 1)[0])


async def keys_like(db: asyncpg.Connection[asyncpg.Record], prefix: str) -> list[str]:
    rows = await db.fetch("SELECT key FROM message WHERE starts_with(key, $1)", prefix)
    return [row["key"] for row in rows]


# -- 1. durable sleep ---------------------------------------------------------------------


@both_modes
async def test_durable_sleep_delays_the_next_step(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """`scope.sleep` and the `saga.sleep` step form hold the next step back by at least their
    duration on the database clock; the log shows one suspension per step and nothing else."""
    at: dict[str, datetime] = {}
    napper = Saga("napper")

    @napper.step()
    async def doze(scope: Scope, message: Message[Any]) -> None:
        at["doze"] = scope.now()
        await scope.sleep(0.5)

    napper.sleep(timedelta(seconds=0.3), "nap")

    @napper.step()
    async def wake(scope: Scope, message: Message[Any]) -> None:
        at["wake"] = scope.now()

    async with make_coop(listen=listen) as coop:
        coop.subscribe("napping", napper)
        started = time.monotonic()
        handle = await coop.launch("napping", {})
        outcome = await handle.wait(timeout=WAIT)
        elapsed = time.monotonic() - started
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert elapsed >= 0.8
    assert at["wake"] - at["doze"] >= timedelta(seconds=0.8)
    assert of_saga(events, "napper") == [
        ("SEEN", None),
        ("SUSPENDED", "doze"),
        ("SUSPENDED", "nap"),
        ("SUSPENDED", "wake"),
        ("COMMITTED", "wake"),
    ]
    suspended = {e.step: e.time for e in events if e.type == "SUSPENDED"}
    # Each SUSPENDED is written a few ms after its step read the clock, hence the slack.
    assert suspended["nap"] - suspended["doze"] >= timedelta(seconds=0.45)
    assert suspended["wake"] - suspended["nap"] >= timedelta(seconds=0.25)


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
async def test_a_sleeping_run_survives_a_worker_restart(
    dsn: str,
    schema: str,
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    stop: str,
) -> None:
    """A run asleep when its worker process stops is finished by a new worker, not before its
    wake time, and each of its steps commits exactly once."""
    await db.execute(
        "CREATE TABLE steps (run_id uuid, step text, pid int, at timestamptz,"
        " UNIQUE (run_id, step))"
    )
    asleep = anyio.Event()
    await db.add_listener(f"{schema}_asleep", lambda *_: asleep.set())
    nap = 1.5
    async with make_coop(worker=False) as coop:
        async with WorkerProcess(dsn, schema, APP) as first:
            handle = await coop.launch("nap", {"seconds": nap})
            with anyio.fail_after(WAIT):
                await asleep.wait()
            if stop == "sigkill":
                await first.kill()
            # else: leaving the block sends SIGTERM and waits for a clean exit
        stopped_at = await db_now(db)
        assert first.process is not None
        assert first.process.returncode == (0 if stop == "sigterm" else -9)
        async with WorkerProcess(dsn, schema, APP) as second:
            outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    rows = {row["step"]: row for row in await db.fetch("SELECT step, pid, at FROM steps")}
    assert sorted(rows) == ["doze", "wake"]
    assert rows["doze"]["pid"] == first.pid
    assert rows["wake"]["pid"] == second.pid
    wake_due = rows["doze"]["at"] + timedelta(seconds=nap)
    assert stopped_at < wake_due  # the first worker was gone while the run slept
    assert rows["wake"]["at"] >= wake_due
    assert of_saga(events, "nap") == [
        ("SEEN", None),
        ("SUSPENDED", "doze"),
        ("SUSPENDED", "wake"),
        ("COMMITTED", "wake"),
    ]
    workers = [e.worker for e in events if e.type == "SUSPENDED"]
    assert workers[0] != workers[1]


# -- 2. scheduled launches ----------------------------------------------------------------


async def test_scheduled_launches_fire_once_across_three_workers_and_not_early(
    dsn: str,
    schema: str,
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """`launch(after=)` and `launch(at=)` start their runs once, with three worker processes
    competing for them, and never before the requested time."""
    await db.execute(
        "CREATE TABLE fired (message_id uuid UNIQUE, label text, pid int, at timestamptz)"
    )
    async with (
        WorkerProcess(dsn, schema, APP),
        WorkerProcess(dsn, schema, APP),
        WorkerProcess(dsn, schema, APP),
        make_coop(worker=False) as coop,
    ):
        before = await db_now(db)
        later = await coop.launch("scheduled", {"label": "after"}, after=0.8)
        due_at = before + timedelta(seconds=1.0)
        timed = await coop.launch("scheduled", {"label": "at"}, at=due_at)
        outcomes = [await later.wait(timeout=WAIT), await timed.wait(timeout=WAIT)]
        events = {h.id: await coop.events(h.id) for h in (later, timed)}

    assert [o.status for o in outcomes] == ["committed", "committed"], outcomes
    assert [len(o.runs) for o in outcomes] == [1, 1]
    rows = {row["label"]: row for row in await db.fetch("SELECT * FROM fired")}
    assert Counter(row["label"] for row in await db.fetch("SELECT label FROM fired")) == {
        "after": 1,
        "at": 1,
    }
    assert rows["after"]["message_id"] == later.id and rows["at"]["message_id"] == timed.id
    assert rows["after"]["at"] >= before + timedelta(seconds=0.8)
    assert rows["at"]["at"] >= due_at
    for handle, due in ((later, before + timedelta(seconds=0.8)), (timed, due_at)):
        log = events[handle.id]
        assert of_saga(log, "once") == [
            ("SEEN", None),
            ("SUSPENDED", "fire"),
            ("COMMITTED", "fire"),
        ]
        seen = next(e for e in log if e.type == "SEEN")
        assert seen.time >= due


# -- 3. periodic schedules ----------------------------------------------------------------


@both_modes
async def test_a_schedule_fires_on_a_gap_free_progression_until_unscheduled(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    """`schedule(every=0.2)` fires once per due time (start, start+0.2, ...: no gap, no
    duplicate, none early); scheduling the key again while active changes nothing;
    `unschedule` leaves no link that could fire; afterwards the key can start a new chain."""
    ran: list[tuple[uuid.UUID, datetime, Any]] = []
    fifth = anyio.Event()
    tick = Saga("tick")

    @tick.step()
    async def beat(scope: Scope, message: Message[Any]) -> None:
        ran.append((message.id, scope.now(), message.payload))
        if len(ran) >= 5:
            fifth.set()

    period = timedelta(seconds=0.2)
    fired_prefix = f"{PERIODIC}:beat:fired@"
    async with make_coop(listen=listen) as coop:
        coop.subscribe("tick", tick)
        start = await db_now(db) + period
        # catch_up="all": even a worker lagging by more than a period leaves no gap.
        first = await coop.schedule(
            "beat", "tick", {"n": 1}, every=0.2, start_at=start, catch_up="all"
        )
        again = await coop.schedule("beat", "tick", {"n": 2}, every=0.2)
        assert again.id == first.id
        assert len(await keys_like(db, f"{PERIODIC}:beat@")) == 1  # one chain, one link

        with anyio.fail_after(WAIT):
            await fifth.wait()
        assert await coop.unschedule("beat") >= 1
        assert await coop.unschedule("no-such-schedule") == 0
        stopped = await db_now(db)
        live_links = await db.fetchval(
            "SELECT count(*) FROM run WHERE saga = $1 AND status IN ('pending', 'active')",
            PERIODIC,
        )
        assert live_links == 0
        fired_keys = await keys_like(db, fired_prefix)
        # The clock is the behaviour under test: a live chain would fire again within this.
        await anyio.sleep(QUIET_PERIODS * PERIOD)
        assert sorted(await keys_like(db, fired_prefix)) == sorted(fired_keys)
        fired = {
            row["key"]: row
            for row in await db.fetch(
                "SELECT id, key, payload::text AS payload FROM message WHERE starts_with(key, $1)",
                fired_prefix,
            )
        }
        for row in fired.values():
            assert (await coop.wait(row["id"], timeout=WAIT)).status == "committed"

        # After unschedule the key starts a new chain (on a topic nobody listens to).
        renewed = await coop.schedule("beat", "tock", {}, every=0.2)
        assert renewed.id != first.id
        await coop.unschedule("beat")

    dues = sorted(due_of(key) for key in fired)
    assert len(dues) >= 5
    assert len(set(dues)) == len(dues)
    assert dues == [start + k * period for k in range(len(dues))]
    assert dues[-1] <= stopped
    assert all(msgspec.json.decode(row["payload"]) == {"n": 1} for row in fired.values())
    # One tick run per firing, each not before its due time.
    due_by_id = {row["id"]: due_of(key) for key, row in fired.items()}
    assert sorted(message_id for message_id, _, _ in ran) == sorted(due_by_id)
    for message_id, when, payload in ran:
        assert when >= due_by_id[message_id]
        assert payload == {"n": 1}


async def test_a_key_scheduled_again_after_unschedule_fires_as_a_new_schedule(
    make_coop: Callable[..., Cooperation], db: asyncpg.Connection[asyncpg.Record]
) -> None:
    """Unscheduling and scheduling the same key with the same start gives a new chain that
    fires, not the cancelled one's handle; a naive `start_at` is refused up front."""
    fired = anyio.Event()
    tick = Saga("tick")

    @tick.step()
    async def beat(scope: Scope, message: Message[Any]) -> None:
        fired.set()

    async with make_coop() as coop:
        coop.subscribe("tick", tick)
        with pytest.raises(ScoopyError, match="`start_at` must be timezone-aware"):
            await coop.schedule("again", "tick", {}, every=60, start_at=datetime.now())
        start = await db_now(db) + timedelta(seconds=0.3)
        first = await coop.schedule("again", "tick", {}, every=60, start_at=start)
        assert await coop.unschedule("again") == 1
        second = await coop.schedule("again", "tick", {}, every=60, start_at=start)
        assert second.id != first.id
        assert [s.due for s in await coop.schedules()] == [start]
        with anyio.fail_after(WAIT):
            await fired.wait()
        await coop.unschedule("again")


async def test_two_services_scheduling_one_key_at_once_start_one_chain(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """Concurrent `schedule` calls for one key from two Cooperations yield one chain."""
    handles: list[uuid.UUID] = []
    async with make_coop(worker=False) as one, make_coop(worker=False) as two:

        async def schedule(coop: Cooperation) -> None:
            handle = await coop.schedule("dup", "tick", {}, every=60)
            handles.append(handle.id)

        async with anyio.create_task_group() as tg:
            for coop in (one, two, one, two):
                tg.start_soon(schedule, coop)

    assert len(handles) == 4 and len(set(handles)) == 1
    assert len(await keys_like(db, f"{PERIODIC}:dup@")) == 1


async def test_a_cron_schedule_is_due_on_cron_times(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """A cron chain's first due time is the first cron time at or after `start_at`."""
    base = (await db_now(db)).astimezone(UTC) + timedelta(hours=1)
    odd = base.replace(second=30, microsecond=123456)
    boundary = base.replace(second=0, microsecond=0)
    async with make_coop(worker=False) as coop:
        await coop.schedule("every-minute", "tick", {}, cron="* * * * *", start_at=odd)
        await coop.schedule("on-boundary", "tick", {}, cron="* * * * *", start_at=boundary)
        await coop.schedule("quarterly", "tick", {}, cron="*/15 * * * *", start_at=odd)

    async def due(key: str) -> datetime:
        (link,) = await keys_like(db, f"{PERIODIC}:{key}@")
        payload = await db.fetchval("SELECT payload->>'due' FROM message WHERE key = $1", link)
        assert datetime.fromisoformat(payload) == due_of(link)
        return due_of(link)

    minute = await due("every-minute")
    assert (minute.second, minute.microsecond) == (0, 0)
    assert minute == boundary + timedelta(minutes=1)
    assert await due("on-boundary") == boundary
    quarter = await due("quarterly")
    assert quarter.minute % 15 == 0 and (quarter.second, quarter.microsecond) == (0, 0)
    assert odd < quarter <= odd + timedelta(minutes=15)


@pytest.mark.parametrize(("catch_up", "fires"), [("all", 4), ("latest", 1)])
async def test_catch_up_after_downtime(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    catch_up: CatchUp,
    fires: int,
) -> None:
    """A schedule whose start lies 3.5 periods in the past fires once per missed time ("all")
    or once ("latest"), then waits for its next regular time."""
    ran: list[uuid.UUID] = []
    tick = Saga("tick")

    @tick.step()
    async def beat(scope: Scope, message: Message[Any]) -> None:
        ran.append(message.id)

    period = timedelta(seconds=10)
    async with make_coop() as coop:
        coop.subscribe("tick", tick)
        start = await db_now(db) - 3.5 * period
        await coop.schedule("late", "tick", {}, every=period, start_at=start, catch_up=catch_up)
        regular = start + 4 * period  # the first due time after "now"

        async def caught_up() -> bool:
            # Settled: the link due at the next regular time exists and sleeps until then.
            links = await keys_like(db, f"{PERIODIC}:late@")
            latest = max(links, key=due_of)
            asleep = await db.fetchval(
                "SELECT r.ready_at > clock_timestamp() FROM run r"
                " JOIN message m ON m.id = r.message_id WHERE m.key = $1",
                latest,
            )
            return due_of(latest) == regular and bool(asleep)

        await until(caught_up)
        fired = await db.fetch(
            "SELECT id, key FROM message WHERE starts_with(key, $1)", f"{PERIODIC}:late:fired@"
        )
        for row in fired:
            await coop.wait(row["id"], timeout=WAIT)
        await coop.unschedule("late")

    dues = sorted(due_of(row["key"]) for row in fired)
    assert len(dues) == fires
    if catch_up == "all":
        assert dues == [start + k * period for k in range(4)]
    else:
        assert start <= dues[0] < regular
    assert sorted(ran) == sorted(row["id"] for row in fired)


# -- 4. loops -----------------------------------------------------------------------------


@both_modes
async def test_every_loop_form_waits_for_each_iterations_children(
    make_coop: Callable[..., Cooperation], listen: bool
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

    @kid.step()
    async def work(scope: Scope, message: Message[Any]) -> None:
        await scope.sleep(0.03)  # children take a while: a parent that did not wait would show

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


# -- 5. rollback of loops -----------------------------------------------------------------


@both_modes
async def test_rolling_back_a_loop_compensates_each_committed_iteration_newest_first(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """A step that committed iterations 0-2 and failed in iteration 3 is compensated three
    times, newest first, each compensation told its iteration and preceded by the rollback
    of that iteration's children; the failing iteration is not compensated."""
    compensations: list[tuple[str, int]] = []
    looped = Saga("looped")

    @looped.step()
    async def prep(scope: Scope, message: Message[Any]) -> None:
        pass

    @prep.rollback
    async def unprep(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        compensations.append(("prep", scope.iteration))

    @looped.step()
    async def work(scope: Scope, message: Message[Any]) -> NextStep:
        await scope.launch("loop-child", {"iteration": scope.iteration})
        if scope.iteration == 3:
            raise Boom(f"iteration {scope.iteration} failed")
        return NextStep.REPEAT

    @work.rollback
    async def unwork(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        compensations.append(("work", scope.iteration))

    child = Saga("loop-child")

    @child.step()
    async def do(scope: Scope, message: Message[Any]) -> None:
        pass

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


# -- 6. return values ---------------------------------------------------------------------


class QuoteRequest(msgspec.Struct, frozen=True):
    item: str


class Quote(msgspec.Struct, frozen=True):
    carrier: str
    price: int


QUOTES: Topic[QuoteRequest] = Topic("quotes", QuoteRequest, result=Quote)
RUSH: Topic[QuoteRequest] = Topic("rush-quotes", QuoteRequest, result=Quote)


@both_modes
async def test_results_of_several_children_reach_the_next_step(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """Fan-out to three sagas: `child_results()` maps each saga to the list of its children's
    results (two for the saga that got two messages); with a typed topic only that topic's
    children count and values decode to its `result` type."""
    seen: dict[str, Any] = {}
    buyer = Saga("buyer")

    @buyer.step()
    async def ask(scope: Scope, message: Message[Any]) -> None:
        await scope.launch(QUOTES, QuoteRequest("book"))
        await scope.launch(RUSH, QuoteRequest("book"))

    @buyer.step()
    async def choose(scope: Scope, message: Message[Any]) -> None:
        seen["raw"] = await scope.child_results()
        seen["typed"] = await scope.child_results(QUOTES)
        seen["rush"] = await scope.child_results(RUSH)
        seen["ups"] = await scope.child_result("ups", QUOTES)
        with pytest.raises(LookupError, match="found 2"):
            await scope.child_result("fedex")
        with pytest.raises(LookupError, match="found 0"):
            await scope.child_result("nobody")
        best = min((q for qs in seen["typed"].values() for q in qs), key=lambda q: q.price)
        scope.set_result(best)

    @buyer.step()
    async def later(scope: Scope, message: Message[Any]) -> None:
        seen["later"] = await scope.child_results()  # the previous step launched nothing

    def carrier(name: str, price: int) -> Saga:
        saga = Saga(name)

        @saga.step()
        async def quote(scope: Scope, message: Message[QuoteRequest]) -> None:
            rush = 100 if message.topic == RUSH.name else 0
            scope.set_result(Quote(name, price + rush))

        return saga

    fedex = carrier("fedex", 30)
    async with make_coop(listen=listen) as coop:
        coop.subscribe("buy", buyer)
        coop.subscribe(QUOTES, carrier("ups", 20))
        coop.subscribe(QUOTES, carrier("dhl", 10))
        coop.subscribe(QUOTES, fedex)
        coop.subscribe(RUSH, fedex)
        handle = await coop.launch("buy", {})
        outcome = await handle.wait(timeout=WAIT)
        result = await db_result(coop, handle.id)

    assert outcome.status == "committed", outcome.failure
    assert {saga: sorted(values, key=str) for saga, values in seen["raw"].items()} == {
        "ups": [{"carrier": "ups", "price": 20}],
        "dhl": [{"carrier": "dhl", "price": 10}],
        "fedex": [{"carrier": "fedex", "price": 130}, {"carrier": "fedex", "price": 30}],
    }
    assert seen["typed"] == {
        "ups": [Quote("ups", 20)],
        "dhl": [Quote("dhl", 10)],
        "fedex": [Quote("fedex", 30)],
    }
    assert seen["rush"] == {"fedex": [Quote("fedex", 130)]}
    assert seen["ups"] == Quote("ups", 20)
    assert seen["later"] == {}
    assert result == {"carrier": "dhl", "price": 10}


async def db_result(coop: Cooperation, root_id: uuid.UUID) -> Any:
    """The stored result of a hierarchy's root run."""
    (run,) = [run for run in await coop.runs(root_id) if run.parent_id is None]
    async with coop.pool.acquire() as conn:
        raw = await conn.fetchval(
            f'SELECT result::text FROM "{coop.schema}".run WHERE id = $1', run.id
        )
    return None if raw is None else msgspec.json.decode(raw)


@both_modes
async def test_a_result_of_the_wrong_type_fails_the_child(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """`set_result` validates against the topic's `result` type: a wrong value fails the step."""
    raised: list[type[BaseException]] = []
    sloppy = Saga("sloppy")

    @sloppy.step()
    async def answer(scope: Scope, message: Message[Any]) -> None:
        try:
            scope.set_result({"carrier": "x", "price": "cheap"})
        except PayloadError:
            raised.append(PayloadError)
            raise

    async with make_coop(listen=listen) as coop:
        coop.subscribe(QUOTES, sloppy)
        outcome = await (await coop.launch(QUOTES, QuoteRequest("pen"))).wait(timeout=WAIT)

    assert raised == [PayloadError]
    assert outcome.status == "rolled_back"
    assert outcome.failure is not None and "is not a valid Quote" in outcome.failure.message


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

    @flaky.step()
    async def second(scope: Scope, message: Message[Any]) -> None:
        raise Boom("flaky failed after answering")

    return steady, flaky


@both_modes
async def test_rolled_back_children_contribute_no_result(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """A child that set a result and then failed (and rolled back) is absent from
    `child_results`; its committed sibling is there."""
    seen: list[dict[str, list[Any]]] = []
    parent = Saga("results-parent")

    @parent.step()
    async def ask(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("answers", {})

    @ask.on_child_failure
    async def tolerate(scope: Scope, message: Message[Any], failure: CooperationError) -> None:
        assert failure.failure.type == "scoopy.ChildRolledBack"
        seen.append(await scope.child_results())

    @parent.step()
    async def read(scope: Scope, message: Message[Any]) -> None:
        pass

    steady, flaky = answering_sagas()
    async with make_coop(listen=listen) as coop:
        coop.subscribe("results", parent)
        coop.subscribe("answers", steady)
        coop.subscribe("answers", flaky)
        outcome = await (await coop.launch("results", {})).wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    assert seen == [{"steady": ["steady answer"]}]


async def test_results_survive_a_handled_child_failure(
    make_coop: Callable[..., Cooperation],
) -> None:
    """After a handled child failure, the next step still sees the results of the step's
    children that committed."""
    seen: list[dict[str, list[Any]]] = []
    parent = Saga("results-parent")

    @parent.step()
    async def ask(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("answers", {})

    @ask.on_child_failure
    async def tolerate(scope: Scope, message: Message[Any], failure: CooperationError) -> None:
        pass

    @parent.step()
    async def read(scope: Scope, message: Message[Any]) -> None:
        seen.append(await scope.child_results())

    steady, flaky = answering_sagas()
    async with make_coop() as coop:
        coop.subscribe("results", parent)
        coop.subscribe("answers", steady)
        coop.subscribe("answers", flaky)
        outcome = await (await coop.launch("results", {})).wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    assert seen == [{"steady": ["steady answer"]}]


# -- 7. time window -----------------------------------------------------------------------


class LeftBehind(Exception):
    pass


@both_modes
async def test_a_time_window_leaves_a_late_subscriber_behind(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """With `TimeWindow(0.3)` the parent waits for children that started within the window
    (even if they finish later) but not for one that had not started when it closed: that
    one is detached and, once resumed, runs and fails in a hierarchy of its own."""
    at: dict[str, datetime] = {}
    straggler_status_at_departure: list[str] = []
    train = Saga("train", strategy=TimeWindow(0.3))

    @train.step()
    async def board(scope: Scope, message: Message[Any]) -> None:
        at["board"] = scope.now()
        await scope.launch("platform", {})

    @train.step()
    async def depart(scope: Scope, message: Message[Any]) -> None:
        at["depart"] = scope.now()
        straggler_status_at_departure.append(
            await scope.connection.fetchval(
                f'SELECT status FROM "{schema}".run WHERE saga = $1', "straggler"
            )
        )

    punctual = Saga("punctual")

    @punctual.step()
    async def aboard(scope: Scope, message: Message[Any]) -> None:
        await scope.sleep(0.5)  # started in time, finishes after the window closed

    @punctual.step()
    async def arrive(scope: Scope, message: Message[Any]) -> None:
        at["arrive"] = scope.now()

    straggler = Saga("straggler")

    @straggler.step()
    async def run_late(scope: Scope, message: Message[Any]) -> None:
        at["straggler"] = scope.now()
        raise LeftBehind("missed the train")

    async with make_coop(listen=listen) as coop:
        schema = coop.schema
        coop.subscribe("departures", train)
        coop.subscribe("platform", punctual)
        coop.subscribe("platform", straggler)
        await coop.pause(straggler)  # it cannot start before the window closes
        handle = await coop.launch("departures", {})
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)
        hierarchy = {run.saga for run in await coop.runs(handle.id)}
        platform = next(e.message_id for e in events if e.type == "EMITTED" and e.saga == "train")
        assert platform is not None
        async with coop.pool.acquire() as conn:
            row = await conn.fetchrow(
                f"""SELECT status, parent_id, root_id, lineage, updated_at
                      FROM "{schema}".run WHERE saga = 'straggler'"""
            )
        await coop.resume(straggler)
        late = await coop.handle(platform).wait(timeout=WAIT)
        late_events = await coop.events(platform)
        after = await coop.outcome(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert at["depart"] - at["board"] >= timedelta(seconds=0.5)  # waited for punctual
    assert at["arrive"] <= at["depart"]
    assert straggler_status_at_departure == ["pending"]
    # Detached when the window closed: outside the parent's hierarchy, rooted at its message.
    assert hierarchy == {"train", "punctual"}
    assert row is not None and row["status"] == "pending" and row["parent_id"] is None
    assert row["root_id"] == platform and row["lineage"][0] == platform
    assert row["updated_at"] - at["board"] >= timedelta(seconds=0.3)
    # Resumed, it runs after the parent finished; its failure reaches nobody.
    assert at["straggler"] > at["depart"]
    assert late.status == "rolled_back"
    assert late.failure is not None and late.failure.message == "missed the train"
    assert after is not None and after.status == "committed" and after.failure is None
    assert not any(e.saga == "straggler" for e in events)
    assert of_saga(late_events, "straggler")[0] == ("SEEN", None)
    assert of_saga(late_events, "straggler")[-1][0] == "ROLLED_BACK"


# -- 8. topology changes, cancellation and deadlines while waiting ------------------------


def waiting_parent() -> tuple[Saga, Saga, Saga, list[str]]:
    """A parent that launches to a fast saga and a (to be paused) absent one."""
    ran: list[str] = []
    parent = Saga("waiter")

    @parent.step()
    async def place(scope: Scope, message: Message[Any]) -> None:
        ran.append("place")
        await scope.launch("placed", {})

    @place.rollback
    async def unplace(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        ran.append("unplace")

    @parent.step()
    async def complete(scope: Scope, message: Message[Any]) -> None:
        ran.append("complete")

    ship = Saga("ship")

    @ship.step()
    async def dispatch(scope: Scope, message: Message[Any]) -> None:
        ran.append("ship")

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

    await until(check)


@both_modes
async def test_unsubscribing_releases_a_parent_waiting_for_an_unstarted_child(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """A parent waits for a child run that has not started; unsubscribing that saga (and
    `sync`) skips the run, the parent commits, and later messages no longer start it."""
    parent, ship, absent, ran = waiting_parent()
    async with make_coop(listen=listen) as coop:
        coop.subscribe("orders", parent)
        coop.subscribe("placed", ship)
        coop.subscribe("placed", absent)
        coop.subscribe("direct", absent)
        await coop.pause(absent)
        handle = await coop.launch("orders", {})
        await parent_is_waiting(coop, handle.id)
        assert "complete" not in ran

        coop.unsubscribe("placed", absent)
        await coop.sync()
        outcome = await handle.wait(timeout=WAIT)
        again = await (await coop.launch("orders", {})).wait(timeout=WAIT)
        await coop.resume(absent)
        # The saga works again, on the topic it still listens to; the skipped run stays skipped.
        direct = await (await coop.launch("direct", {})).wait(timeout=WAIT)
        runs = await coop.runs(handle.id) + await coop.runs(again.id)

    assert outcome.status == "committed", outcome.failure
    assert again.status == "committed" and direct.status == "committed"
    assert [run.status for run in runs if run.saga == "absent"] == ["skipped"]
    assert ran.count("absent:placed") == 0 and ran.count("absent:direct") == 1
    assert ran.count("complete") == 2


async def test_unsubscribing_while_a_step_emits_to_that_saga_still_releases_the_parent(
    make_coop: Callable[..., Cooperation], db: asyncpg.Connection[asyncpg.Record]
) -> None:
    """The step's emission has created a run of the saga being unsubscribed but not yet
    committed: the unsubscribe waits for that step and skips the run, so the parent is not
    left waiting for a run that will never start."""
    await db.execute("CREATE TABLE gate (n int)")
    await db.execute(
        """CREATE FUNCTION hold_commit() RETURNS trigger LANGUAGE plpgsql AS
           $$ BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$"""
    )
    await db.execute(
        """CREATE CONSTRAINT TRIGGER hold AFTER INSERT ON gate DEFERRABLE INITIALLY DEFERRED
           FOR EACH ROW EXECUTE FUNCTION hold_commit()"""
    )
    _, _, absent, ran = waiting_parent()
    gated = Saga("gated")

    @gated.step()
    async def place(scope: Scope, message: Message[Any]) -> None:
        await scope.connection.execute(f'INSERT INTO "{schema}".gate VALUES (1)')
        await scope.launch("placed", {})  # emitted; the commit then waits for the gate

    @gated.step()
    async def complete(scope: Scope, message: Message[Any]) -> None:
        ran.append("complete")

    async def waiting(query: str) -> bool:
        return bool(
            await db.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                    WHERE wait_event_type = 'Lock' AND query LIKE $1""",
                query,
            )
        )

    async with make_coop() as coop, anyio.create_task_group() as tg:
        schema = coop.schema
        coop.subscribe("orders", gated)
        coop.subscribe("placed", absent)
        await coop.pause(absent)
        await db.execute("SELECT pg_advisory_lock(4242)")
        handle = await coop.launch("orders", {})
        await until(lambda: waiting("%COMMIT%"))  # the step's transaction is at its commit
        synced = anyio.Event()

        async def unsubscribe() -> None:
            coop.unsubscribe("placed", absent)
            await coop.sync()
            synced.set()

        tg.start_soon(unsubscribe)

        async def unsubscribing() -> bool:
            return synced.is_set() or await waiting("%scoopy.registry%")

        await until(unsubscribing)
        await db.execute("SELECT pg_advisory_unlock(4242)")
        outcome = await handle.wait(timeout=WAIT)
        runs = await coop.runs(handle.id)

    assert outcome.status == "committed", outcome.failure
    assert ran == ["complete"]
    assert [run.status for run in runs if run.saga == "absent"] == ["skipped"]


@both_modes
async def test_a_parent_waiting_for_a_child_that_never_starts_can_be_cancelled(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """Cancellation frees a parent stuck waiting for a child that never starts: the child
    run is skipped and the parent rolls back (compensating what it committed)."""
    parent, ship, absent, ran = waiting_parent()
    async with make_coop(listen=listen) as coop:
        coop.subscribe("orders", parent)
        coop.subscribe("placed", ship)
        coop.subscribe("placed", absent)
        await coop.pause(absent)
        handle = await coop.launch("orders", {})
        await parent_is_waiting(coop, handle.id)
        assert await coop.cancel(handle.id, "operator gave up")
        outcome = await handle.wait(timeout=WAIT)
        runs = await coop.runs(handle.id)

    assert outcome.status == "rolled_back"
    types = failure_types(outcome.failure)
    assert types[0] == "scoopy.GaveUp" and "scoopy.CancellationRequested" in types
    assert find(outcome.failure, "scoopy.CancellationRequested").message == "operator gave up"
    assert {run.saga: run.status for run in runs} == {
        "waiter": "rolled_back",
        "ship": "rolled_back",
        "absent": "skipped",
    }
    assert ran == ["place", "ship", "unplace"]


@both_modes
async def test_a_parent_waiting_for_a_child_that_never_starts_misses_its_deadline(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """A happy-path deadline frees a parent waiting for a child that never starts: it gives
    up at the deadline (not before, not never) and rolls back."""
    parent, ship, absent, ran = waiting_parent()
    async with make_coop(listen=listen) as coop:
        coop.subscribe("orders", parent)
        coop.subscribe("placed", ship)
        coop.subscribe("placed", absent)
        await coop.pause(absent)
        started = time.monotonic()
        limit = deadline(0.3, "x")
        handle = await coop.launch("orders", {}, context={HAPPY_PATH_DEADLINE: limit})
        outcome = await handle.wait(timeout=WAIT)
        elapsed = time.monotonic() - started
        events = await coop.events(handle.id)

    assert outcome.status == "rolled_back"
    assert 0.3 <= elapsed < WAIT / 2
    types = failure_types(outcome.failure)
    assert types[0] == "scoopy.GaveUp" and "scoopy.DeadlineMissed" in types
    missed = find(outcome.failure, "scoopy.DeadlineMissed")
    assert missed.message.startswith("Missed happy path deadline of x at ")
    gave_up = next(e for e in events if e.saga == "waiter" and e.type == "ROLLING_BACK")
    assert gave_up.time >= limit.at
    assert "complete" not in ran


@both_modes
async def test_a_started_child_whose_saga_lost_its_workers_is_rolled_back_when_one_returns(
    make_coop: Callable[..., Cooperation], listen: bool
) -> None:
    """A child that committed a step and then lost every worker serving its saga cannot be
    rolled back without that saga's compensations: a cancelled parent waits for it (nothing
    is dropped), and a worker serving the saga again finishes the rollback."""
    ran: list[str] = []
    parent, _, _, _ = waiting_parent()
    slow = Saga("slow")

    @slow.step()
    async def begin(scope: Scope, message: Message[Any]) -> None:
        ran.append("begin")
        await scope.sleep(3600)

    @begin.rollback
    async def unbegin(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        ran.append("unbegin")

    @slow.step()
    async def end(scope: Scope, message: Message[Any]) -> None:
        ran.append("end")

    async with make_coop(listen=listen) as coop:
        coop.subscribe("orders", parent)
        async with make_coop(listen=listen) as service:
            service.subscribe("placed", slow)
            await service.sync()
            handle = await coop.launch("orders", {})

            async def sleeping() -> bool:
                return has(await coop.events(handle.id), "SUSPENDED", "slow", "begin")

            await until(sleeping)
        # The only worker serving "slow" is gone, mid-run.
        assert await coop.cancel(handle.id, "give up")
        runs = {run.saga: run.status for run in await coop.runs(handle.id)}
        assert runs == {"waiter": "active", "slow": "active"}  # waiting, not dropped
        async with make_coop(listen=listen) as service:
            service.subscribe("placed", slow)
            outcome = await handle.wait(timeout=WAIT)
        runs = {run.saga: run.status for run in await coop.runs(handle.id)}

    assert outcome.status == "rolled_back"
    assert runs == {"waiter": "rolled_back", "slow": "rolled_back"}
    assert ran == ["begin", "unbegin"]


# -- 9. idempotent launches ---------------------------------------------------------------


async def test_an_idempotent_launch_raced_from_two_processes_starts_one_hierarchy(
    dsn: str,
    schema: str,
    make_coop: Callable[..., Cooperation],
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

                await until(both_blocked)
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
    make_coop: Callable[..., Cooperation],
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
    make_coop: Callable[..., Cooperation],
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

    @kid.step()
    async def play(scope: Scope, message: Message[Any]) -> None:
        pass

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
    make_coop: Callable[..., Cooperation],
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

    @sink.step()
    async def sunk(scope: Scope, message: Message[Any]) -> None:
        pass

    async with make_coop() as coop:
        coop.subscribe("go", saga)
        coop.subscribe("sunk", sink)
        outcome = await (await coop.launch("go", {})).wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    stored = await db.fetch("SELECT id FROM message WHERE key = 'K'")
    assert len(stored) == 1
    mine, theirs = ids[-1]  # the attempt that committed
    assert uuid.UUID(mine) == theirs == stored[0]["id"]


# -- 10. / 11. guards ---------------------------------------------------------------------


@both_modes
async def test_the_launch_that_would_exceed_max_depth_fails(
    make_coop: Callable[..., Cooperation],
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

    async with make_coop(listen=listen, max_depth=3) as coop:
        for topic, saga in sagas:
            coop.subscribe(topic, saga)
        outcome = await (await coop.launch("l1", {})).wait(timeout=WAIT)

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
    make_coop: Callable[..., Cooperation], listen: bool
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


# -- 12. pause / resume -------------------------------------------------------------------


@both_modes
async def test_a_paused_saga_does_not_start_until_resumed(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    """A paused saga's new run is not started while a sibling on the same message finishes;
    it starts only after `resume`."""
    at: dict[str, datetime] = {}
    held = Saga("held")

    @held.step()
    async def hold(scope: Scope, message: Message[Any]) -> None:
        at["held"] = scope.now()

    canary = Saga("canary")

    @canary.step()
    async def sing(scope: Scope, message: Message[Any]) -> None:
        at["canary"] = scope.now()

    async with make_coop(listen=listen) as coop:
        coop.subscribe("pausable", held)
        coop.subscribe("pausable", canary)
        await coop.pause(held, reason="deploying")
        assert await coop.paused() == ["held"]
        handle = await coop.launch("pausable", {})

        async def canary_done() -> bool:
            return has(await coop.events(handle.id), "COMMITTED", "canary")

        await until(canary_done)  # the same launch woke both sagas' workers
        assert "held" not in at
        events = await coop.events(handle.id)
        assert not any(e.saga == "held" for e in events)
        resumed = await db_now(db)
        await coop.resume(held)
        assert await coop.paused() == []
        outcome = await handle.wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    assert at["held"] >= resumed > at["canary"]


@both_modes
async def test_pausing_holds_a_run_between_steps(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    listen: bool,
) -> None:
    """A run whose saga is paused while it sleeps does not take its next step when the sleep
    is over, only after `resume`."""
    at: dict[str, datetime] = {}
    first_done = anyio.Event()
    stepper = Saga("stepper")

    @stepper.step()
    async def one(scope: Scope, message: Message[Any]) -> None:
        at["one"] = scope.now()
        await scope.sleep(0.2)
        first_done.set()

    @stepper.step()
    async def two(scope: Scope, message: Message[Any]) -> None:
        at["two"] = scope.now()

    async with make_coop(listen=listen) as coop:
        coop.subscribe("stepping", stepper)
        handle = await coop.launch("stepping", {})
        with anyio.fail_after(WAIT):
            await first_done.wait()
        await coop.pause(stepper)
        due = at["one"] + timedelta(seconds=0.2)

        async def well_past_due() -> bool:
            return await db_now(db) > due + timedelta(seconds=0.2)

        await until(well_past_due)  # the clock is what is under test here
        assert "two" not in at
        resumed = await db_now(db)
        await coop.resume(stepper)
        outcome = await handle.wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    assert at["two"] >= resumed


async def test_a_cancellation_during_a_step_stops_the_run_before_it_sleeps(
    make_coop: Callable[..., Cooperation],
) -> None:
    """Cancellation is checked at the end of every step: a run cancelled while its step runs
    gives up when the step ends instead of first sleeping what the step asked for (else an
    `unschedule` racing a link's "wait" step would hang for a whole period)."""
    inside = anyio.Event()
    go_on = anyio.Event()
    sleepy = Saga("sleepy")

    @sleepy.step()
    async def one(scope: Scope, message: Message[Any]) -> None:
        inside.set()
        await go_on.wait()
        await scope.sleep(30)

    @sleepy.step()
    async def two(scope: Scope, message: Message[Any]) -> None:
        pass

    async with make_coop() as coop:
        coop.subscribe("sleepy", sleepy)
        handle = await coop.launch("sleepy", {})
        with anyio.fail_after(WAIT):
            await inside.wait()
        assert await coop.cancel(handle.id, "stop now")
        go_on.set()
        outcome = await handle.wait(timeout=2.0)  # not 30 s

    assert outcome.status == "rolled_back"
    assert "scoopy.CancellationRequested" in failure_types(outcome.failure)


async def test_a_paused_parent_is_not_finished_by_its_last_childs_transaction(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """A child finishing while its parent's saga is paused leaves the parent waiting: the
    parent commits only after `resume`, not as bookkeeping in the child's transaction."""
    started, release = anyio.Event(), anyio.Event()
    parent = Saga("paused-parent")

    @parent.step()
    async def spawn(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("slow-kid", {})

    kid = Saga("slow-kid")

    @kid.step()
    async def work(scope: Scope, message: Message[Any]) -> None:
        started.set()
        await release.wait()

    async with make_coop() as coop:
        coop.subscribe("paused-parents", parent)
        coop.subscribe("slow-kid", kid)
        handle = await coop.launch("paused-parents", {})
        with anyio.fail_after(WAIT):
            await started.wait()
        await coop.pause(parent)
        release.set()

        async def kid_done() -> bool:
            return has(await coop.events(handle.id), "COMMITTED", "slow-kid")

        await until(kid_done)
        assert not has(await coop.events(handle.id), "COMMITTED", "paused-parent")
        resumed = await db_now(db)
        await coop.resume(parent)
        outcome = await handle.wait(timeout=WAIT)
        events = await coop.events(handle.id)

    assert outcome.status == "committed", outcome.failure
    done = [e for e in events if e.type == "COMMITTED" and e.saga == "paused-parent"]
    assert len(done) == 1 and done[0].time >= resumed


async def test_pause_and_resume_from_another_process_reach_the_worker(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
) -> None:
    """An operator's `pause` holds a worker's runs; its `resume` (no worker of its own, so no
    local wake-up) is noticed by the worker's poll and the run starts only then."""
    at: dict[str, datetime] = {}
    held = Saga("held")

    @held.step()
    async def hold(scope: Scope, message: Message[Any]) -> None:
        at["held"] = scope.now()

    async with (
        make_coop() as worker,
        make_coop(worker=False) as operator,
    ):
        worker.subscribe("pausable", held)
        await worker.sync()
        await operator.pause("held")
        handle = await operator.launch("pausable", {})  # its NOTIFY wakes the worker in vain
        resumed = await db_now(db)
        await operator.resume("held")
        outcome = await handle.wait(timeout=WAIT)

    assert outcome.status == "committed", outcome.failure
    assert at["held"] >= resumed


# -- time-related defects ------------------------------------------------------------------


async def test_a_far_timer_does_not_stop_a_poll_only_worker_from_polling(
    make_coop: Callable[..., Cooperation],
) -> None:
    """A poll-only worker that knows of a launch due in 60 s still polls every
    `poll_interval` and finds a run launched by another process right away."""
    served = Saga("served")

    @served.step()
    async def serve(scope: Scope, message: Message[Any]) -> None:
        pass

    timer = Saga("timer")

    @timer.step()
    async def ring(scope: Scope, message: Message[Any]) -> None:
        pass

    async with (
        make_coop(listen=False) as coop,
        make_coop(listen=False, worker=False) as elsewhere,
    ):
        coop.subscribe("served", served)
        coop.subscribe("timer", timer)
        await coop.sync()
        await coop.launch("timer", {}, after=60)
        # Due in 1 s, launched by another process: only this worker's poll can find it.
        handle = await elsewhere.launch("served", {}, after=1.0)
        outcome = await coop.wait(handle.id, timeout=3.0)  # 1 s + 8 poll intervals

    assert outcome.status == "committed"
