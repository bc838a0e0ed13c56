"""COMMIT; BEGIN in one round trip: asyncpg's bookkeeping stays right, on success and failure."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest

from scoopy import Connection, Cooperation, Message, Saga, Scope
from scoopy.engine import handover

from .helpers import WAIT


class Inner(Exception):
    pass


async def run_backlog(coop: Cooperation, saga: Saga, topic: str, runs: int) -> set[str]:
    """Queue `runs` runs of `saga` (paused meanwhile), let them go, return their statuses."""
    coop.subscribe(topic, saga)
    await coop.pause(saga)
    handles = [await coop.launch(topic, n) for n in range(runs)]
    await coop.resume(saga)
    return {(await handle.wait(timeout=WAIT)).status for handle in handles}


@pytest.fixture
def handovers(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Each handover the worker makes, as its `reset` flag."""
    real = handover.commit_and_begin
    made: list[bool] = []

    async def recording(conn: Connection, tx: Any, reset: bool = False) -> Any:
        made.append(reset)
        return await real(conn, tx, reset)

    monkeypatch.setattr(handover, "commit_and_begin", recording)
    return made


def test_the_installed_asyncpg_supports_the_handover() -> None:
    # If an asyncpg upgrade changes its Transaction internals, workers silently fall back
    # to two round trips; this makes that loud instead.
    assert handover.SUPPORTED


@contextlib.asynccontextmanager
async def _connection(dsn: str, schema: str, pooled: bool) -> AsyncIterator[Connection]:
    if not pooled:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute(f'SET search_path TO "{schema}"')
            yield conn
        finally:
            await conn.close()
        return
    async with asyncpg.create_pool(dsn, min_size=1, max_size=1) as pool, pool.acquire() as proxy:
        await proxy.execute(f'SET search_path TO "{schema}"')
        yield proxy


@pytest.mark.parametrize("pooled", [False, True], ids=["connection", "pool proxy"])
async def test_the_begun_transaction_nests_savepoints_and_commits(
    dsn: str, db: asyncpg.Connection[asyncpg.Record], schema: str, pooled: bool
) -> None:
    await db.execute("CREATE TABLE t (n int)")
    async with _connection(dsn, schema, pooled) as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO t VALUES (1)")
        nxt = await handover.commit_and_begin(conn, tx)

        assert conn.is_in_transaction()
        assert await db.fetchval("SELECT array_agg(n) FROM t") == [1]  # 1 is committed
        await conn.execute("INSERT INTO t VALUES (2)")
        with contextlib.suppress(Inner):
            async with conn.transaction():  # a savepoint inside the begun transaction
                await conn.execute("INSERT INTO t VALUES (3)")
                raise Inner
        async with conn.transaction():
            await conn.execute("INSERT INTO t VALUES (4)")
        assert await db.fetchval("SELECT array_agg(n) FROM t") == [1]  # not yet committed
        await nxt.commit()

        assert not conn.is_in_transaction()
        assert await db.fetchval("SELECT array_agg(n ORDER BY n) FROM t") == [1, 2, 4]
        with pytest.raises(asyncpg.InterfaceError, match="already committed"):
            await tx.commit()
        async with conn.transaction():  # the connection takes new transactions as usual
            await conn.execute("INSERT INTO t VALUES (5)")
    assert await db.fetchval("SELECT count(*) FROM t") == 4


async def test_a_failed_commit_begins_nothing_and_leaves_the_connection_usable(
    dsn: str, db: asyncpg.Connection[asyncpg.Record], schema: str
) -> None:
    await db.execute("CREATE TABLE u (n int UNIQUE DEFERRABLE INITIALLY DEFERRED)")
    async with _connection(dsn, schema, pooled=False) as conn:
        tx = conn.transaction()
        await tx.start()
        await conn.execute("INSERT INTO u VALUES (1), (1)")  # checked at COMMIT
        with pytest.raises(asyncpg.UniqueViolationError):
            await handover.commit_and_begin(conn, tx)

        assert not conn.is_in_transaction()
        with pytest.raises(asyncpg.InterfaceError, match="error state"):
            await tx.commit()
        async with conn.transaction():
            await conn.execute("INSERT INTO u VALUES (2)")
    assert await db.fetchval("SELECT array_agg(n) FROM u") == [2]


async def test_only_the_open_top_transaction_can_be_handed_over(
    dsn: str, db: asyncpg.Connection[asyncpg.Record], schema: str
) -> None:
    async with _connection(dsn, schema, pooled=False) as conn:
        tx = conn.transaction()
        with pytest.raises(RuntimeError, match="open top transaction"):
            await handover.commit_and_begin(conn, tx)  # never started
        await tx.start()
        inner = conn.transaction()
        await inner.start()
        with pytest.raises(RuntimeError, match="open top transaction"):
            await handover.commit_and_begin(conn, inner)  # a savepoint
        await inner.rollback()
        await tx.rollback()


async def test_steps_claimed_in_a_handed_over_transaction_nest_savepoints(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    handovers: list[bool],
) -> None:
    await db.execute("CREATE TABLE audit (run int, what text)")
    saga = Saga("audited")

    @saga.step()
    async def first(scope: Scope, message: Message[Any]) -> None:
        pass  # leaves the connection untouched: the worker may hand its commit over

    @saga.step()
    async def second(scope: Scope, message: Message[Any]) -> None:
        conn = scope.connection
        await conn.execute(f'INSERT INTO "{schema}".audit VALUES ($1, $2)', message.payload, "kept")
        with contextlib.suppress(Inner):
            async with conn.transaction():
                await conn.execute(
                    f'INSERT INTO "{schema}".audit VALUES ($1, $2)', message.payload, "undone"
                )
                raise Inner

    runs = 20
    async with make_coop() as coop:
        schema = coop.schema
        assert await run_backlog(coop, saga, "audits", runs) == {"committed"}

    assert handovers, "no step transaction was handed over"
    rows = await db.fetch("SELECT run, what FROM audit ORDER BY run")
    assert [(r["run"], r["what"]) for r in rows] == [(n, "kept") for n in range(runs)]


async def test_a_step_that_used_the_connection_hands_over_a_reset_session(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    handovers: list[bool],
) -> None:
    """Session state a step left behind is gone when the next claim runs on its connection."""
    seen: list[tuple[str, int, int]] = []
    saga = Saga("messy")

    @saga.step()
    async def dirty(scope: Scope, message: Message[Any]) -> None:
        conn = scope.connection
        await conn.execute("SET application_name = 'left-behind'")
        await conn.execute("SELECT pg_advisory_lock(4242)")
        await conn.execute("LISTEN left_behind")
        conn.add_log_listener(lambda *_: None)

    @saga.step()
    async def check(scope: Scope, message: Message[Any]) -> None:
        conn = scope.connection
        row = await conn.fetchrow(
            """SELECT current_setting('application_name') AS app,
                      (SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()
                          AND locktype = 'advisory' AND objid = 4242) AS locks,
                      (SELECT count(*) FROM pg_listening_channels()) AS channels"""
        )
        assert row is not None
        seen.append((row["app"], row["locks"], row["channels"]))

    async with make_coop() as coop:
        assert await run_backlog(coop, saga, "mess", 10) == {"committed"}

    assert True in handovers, "no step that used its connection was handed over"
    assert seen == [("scoopy", 0, 0)] * 10


@pytest.mark.parametrize("handing_over", [False, True], ids=["two round trips", "handover"])
async def test_commit_time_triggers_see_the_settings_of_a_step_that_used_its_connection(
    make_coop: Callable[..., Cooperation],
    db: asyncpg.Connection[asyncpg.Record],
    monkeypatch: pytest.MonkeyPatch,
    handovers: list[bool],
    handing_over: bool,
) -> None:
    """The session reset of a handover comes after the step's COMMIT, not before it."""
    monkeypatch.setattr(handover, "SUPPORTED", handing_over)
    schema = await db.fetchval("SELECT current_schema()")
    await db.execute("CREATE TABLE thing (n int)")
    await db.execute("CREATE TABLE audit (n int, actor text)")
    await db.execute(
        f"""CREATE FUNCTION record_actor() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
              INSERT INTO "{schema}".audit VALUES (NEW.n, current_setting('app.actor', true));
              RETURN NULL;
            END $$"""
    )
    await db.execute(
        """CREATE CONSTRAINT TRIGGER audit_at_commit AFTER INSERT ON thing
           DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION record_actor()"""
    )
    saga = Saga("audited-at-commit")

    @saga.step()
    async def write(scope: Scope, message: Message[Any]) -> None:
        await scope.connection.execute("SET app.actor = 'alice'")
        await scope.connection.execute(f'INSERT INTO "{schema}".thing VALUES ($1)', message.payload)

    @saga.step()
    async def after(scope: Scope, message: Message[Any]) -> None:
        pass

    runs = 10
    async with make_coop() as coop:
        assert await run_backlog(coop, saga, "things", runs) == {"committed"}

    assert (True in handovers) == handing_over
    rows = await db.fetch("SELECT n, actor FROM audit ORDER BY n")
    assert [(r["n"], r["actor"]) for r in rows] == [(n, "alice") for n in range(runs)]
