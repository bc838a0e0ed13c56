"""Migrations: applied on start or by `scoopy migrate`, under an advisory lock, versioned."""

from __future__ import annotations

from collections.abc import Callable

import anyio
import asyncpg
import pytest

from scoopy import Cooperation, SchemaVersionError
from scoopy.engine.migrate import latest_version, migrations


async def versions(db: asyncpg.Connection[asyncpg.Record]) -> list[int]:
    return [row[0] for row in await db.fetch("SELECT version FROM schema_version ORDER BY 1")]


async def test_migrations_apply_once(
    make_coop: Callable[..., Cooperation], db: asyncpg.Connection[asyncpg.Record]
) -> None:
    async with make_coop(worker=False):
        pass
    async with make_coop(worker=False):
        pass
    assert await versions(db) == [v for v, _, _ in migrations()]
    assert latest_version() >= 1
    tables = {
        row[0]
        for row in await db.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
        )
    }
    assert {"message", "run", "event", "subscription", "cancellation"} <= tables


async def test_workers_starting_together_do_not_race(
    make_coop: Callable[..., Cooperation], db: asyncpg.Connection[asyncpg.Record]
) -> None:
    async def start_one() -> None:
        async with make_coop(worker=False):
            pass

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(start_one)
    assert await versions(db) == [v for v, _, _ in migrations()]


async def test_a_schema_newer_than_the_code_is_refused(
    make_coop: Callable[..., Cooperation], db: asyncpg.Connection[asyncpg.Record]
) -> None:
    async with make_coop(worker=False):
        pass
    await db.execute("INSERT INTO schema_version (version, name) VALUES (9999, 'from_the_future')")
    for migrate in (True, False):
        with pytest.raises(SchemaVersionError, match=r"at version 9999.*upgrade scoopy"):
            async with make_coop(worker=False, migrate=migrate):
                pass


async def test_without_migrate_an_old_schema_is_refused(
    make_coop: Callable[..., Cooperation],
) -> None:
    with pytest.raises(SchemaVersionError, match="run `scoopy migrate`"):
        async with make_coop(worker=False, migrate=False):
            pass
