"""Launches for later (`launch(after=/at=)`) and periodic schedules (`schedule`, `unschedule`,
cron, catch-up after downtime).
"""

from __future__ import annotations

import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import anyio
import asyncpg
import msgspec
import pytest

from scoopy import Cooperation, Message, Saga, ScoopyError, Scope
from scoopy.periodic import CatchUp

from .helpers import WAIT, MakeCoop, WorkerProcess, both_modes, db_now, eventually
from .reading import of_saga

APP = "tests.apps.timed:setup"
PERIODIC = "scoopy.periodic"


PERIOD = 0.2  # seconds between firings of the periodic schedules below


QUIET_PERIODS = 2.5


def due_of(key: str) -> datetime:
    """The due time encoded in a periodic key ("...@<iso>/<chain>")."""
    return datetime.fromisoformat(key.rsplit("@", 1)[1].split("/", 1)[0])


async def keys_like(db: asyncpg.Connection[asyncpg.Record], prefix: str) -> list[str]:
    rows = await db.fetch("SELECT key FROM message WHERE starts_with(key, $1)", prefix)
    return [row["key"] for row in rows]


# -- scheduled launches -------------------------------------------------------------------


async def test_scheduled_launches_fire_once_across_three_workers_and_not_early(
    dsn: str,
    schema: str,
    make_coop: MakeCoop,
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


# -- periodic schedules -------------------------------------------------------------------


@both_modes
async def test_a_schedule_fires_on_a_gap_free_progression_until_unscheduled(
    make_coop: MakeCoop,
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
    make_coop: MakeCoop, db: asyncpg.Connection[asyncpg.Record]
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
    make_coop: MakeCoop,
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
    make_coop: MakeCoop,
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
    make_coop: MakeCoop,
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

        await eventually(caught_up)
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
