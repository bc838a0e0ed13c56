"""Issue 11, defect 4: every bad input gets a `ScoopyError` naming what was wrong, before
anything is written; payloads JSON cannot represent exactly are refused, not coerced; and a
payload has a size limit.

Today each of these reaches the database or the encoder raw (`CharacterNotInRepertoireError`,
`UntranslatableCharacterError`, `DatetimeFieldOverflowError`, `UnicodeEncodeError`,
`RecursionError`, a traceback) or is silently accepted or changed.
"""

from __future__ import annotations

import math
import subprocess
import sys
from collections.abc import Callable
from typing import Any, TypeAlias

import anyio
import asyncpg
import pytest

from scoopy import (
    Cooperation,
    InvalidNameError,
    Message,
    PayloadError,
    Saga,
    ScoopyError,
    Scope,
)

from .helpers import ROOT, WAIT, eventually

MakeCoop = Callable[..., Cooperation]
Db: TypeAlias = "asyncpg.Connection[asyncpg.Record]"


def noop_saga() -> Saga:
    saga = Saga("noop")

    @saga.step()
    async def nothing(scope: Scope, message: Message[Any]) -> None:
        pass

    return saga


def sleeper_saga() -> Saga:
    saga = Saga("sleeper")

    @saga.step()
    async def doze(scope: Scope, message: Message[Any]) -> None:
        await scope.sleep(3600)

    @saga.step()
    async def wake(scope: Scope, message: Message[Any]) -> None:
        pass

    return saga


async def written(db: Db) -> dict[str, int]:
    """How many rows scoopy's tables hold (its schema is the test's search_path)."""
    counts = {}
    for table in ("message", "run", "event", "cancellation"):
        counts[table] = int(await db.fetchval(f"SELECT count(*) FROM {table}"))
    return counts


def scoopy_cli(*args: str, dsn: str, schema: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scoopy", "--dsn", dsn, "--schema", schema, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=WAIT,
        check=False,
    )


# -- NUL characters PostgreSQL cannot store --------------------------------------------------


@pytest.mark.xfail(
    strict=True, reason="issue 11 defect 4: a NUL in a key raises CharacterNotInRepertoireError"
)
async def test_a_nul_in_a_launch_key_is_refused(make_coop: MakeCoop, db: Db) -> None:
    async with make_coop() as coop:
        coop.subscribe("orders", noop_saga())
        before = await written(db)
        with pytest.raises(ScoopyError, match=r"`?key`?.*NUL|NUL.*`?key`?"):
            await coop.launch("orders", {}, key="k\x00")
        assert await written(db) == before


@pytest.mark.xfail(
    strict=True,
    reason="issue 11 defect 4: a NUL in a cancel reason raises UntranslatableCharacterError",
)
async def test_a_nul_in_a_cancel_reason_is_refused(make_coop: MakeCoop, db: Db) -> None:
    async with make_coop() as coop:
        coop.subscribe("sleepers", sleeper_saga())
        handle = await coop.launch("sleepers", {})

        async def asleep() -> bool:
            return any(e.type == "SUSPENDED" for e in await coop.events(handle.id))

        await eventually(asleep)
        before = await written(db)
        with pytest.raises(ScoopyError, match=r"reason.*NUL|NUL.*reason"):
            await coop.cancel(handle.id, "the customer\x00left")
        assert await written(db) == before
        assert await coop.outcome(handle.id) is None  # still asleep, not cancelled


@pytest.mark.xfail(
    strict=True,
    reason="issue 11 defect 4: a NUL in a rollback reason raises UntranslatableCharacterError",
)
async def test_a_nul_in_a_rollback_reason_is_refused(make_coop: MakeCoop, db: Db) -> None:
    async with make_coop() as coop:
        coop.subscribe("orders", noop_saga())
        handle = await coop.launch("orders", {})
        assert (await handle.wait(timeout=WAIT)).status == "committed"
        before = await written(db)
        with pytest.raises(ScoopyError, match=r"reason.*NUL|NUL.*reason"):
            await coop.rollback(handle.id, "GDPR\x00erasure")
        assert await written(db) == before
        outcome = await coop.outcome(handle.id)
        assert outcome is not None and outcome.status == "committed"


# -- `after` ---------------------------------------------------------------------------------


@pytest.mark.xfail(
    strict=True,
    reason="issue 11 defect 4: after=NaN/inf raise DatetimeFieldOverflowError, after=-5 is "
    "silently accepted",
)
@pytest.mark.parametrize("after", [math.nan, math.inf, -math.inf, -5.0], ids=str)
async def test_an_after_that_is_not_a_finite_delay_is_refused(
    make_coop: MakeCoop, db: Db, after: float
) -> None:
    async with make_coop() as coop:
        coop.subscribe("orders", noop_saga())
        before = await written(db)
        with pytest.raises(ScoopyError, match="after"):
            await coop.launch("orders", {}, after=after)
        assert await written(db) == before


# -- payloads JSON cannot represent exactly --------------------------------------------------


@pytest.mark.xfail(
    strict=True, reason="issue 11 defect 4: a lone surrogate raises UnicodeEncodeError"
)
async def test_a_lone_surrogate_in_a_payload_is_refused(make_coop: MakeCoop, db: Db) -> None:
    async with make_coop() as coop:
        coop.subscribe("orders", noop_saga())
        with pytest.raises(PayloadError, match="payload for topic 'orders'"):
            await coop.launch("orders", {"name": "caf\ud800"})
        assert (await written(db))["message"] == 0


@pytest.mark.xfail(
    strict=True, reason="issue 11 defect 4: 5,000-deep nesting raises RecursionError"
)
async def test_a_payload_nested_5000_deep_is_refused(make_coop: MakeCoop, db: Db) -> None:
    deep: Any = "bottom"
    for _ in range(5000):
        deep = [deep]
    async with make_coop() as coop:
        coop.subscribe("orders", noop_saga())
        with pytest.raises(PayloadError, match="payload for topic 'orders'"):
            await coop.launch("orders", {"deep": deep})
        assert (await written(db))["message"] == 0


@pytest.mark.xfail(
    strict=True,
    reason="issue 11 defect 4: payloads JSON cannot represent are coerced silently "
    "(NaN and inf to null, a set to a list, bytes to base64)",
)
@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, {1, 2, 3}, b"\x00\x01binary"],
    ids=["nan", "inf", "set", "bytes"],
)
async def test_a_payload_json_cannot_represent_exactly_is_refused(
    make_coop: MakeCoop, db: Db, value: Any
) -> None:
    async with make_coop() as coop:
        coop.subscribe("orders", noop_saga())
        with pytest.raises(PayloadError, match="payload for topic 'orders'"):
            await coop.launch("orders", {"value": value})
        assert (await written(db))["message"] == 0


@pytest.mark.xfail(
    strict=True, reason="issue 11 defect 4: a NaN context value is stored as null silently"
)
async def test_a_context_value_json_cannot_represent_exactly_is_refused(
    make_coop: MakeCoop, db: Db
) -> None:
    async with make_coop() as coop:
        coop.subscribe("orders", noop_saga())
        with pytest.raises(PayloadError, match="context value for key 'ratio'"):
            await coop.launch("orders", {}, context={"ratio": math.nan})
        assert (await written(db))["message"] == 0


@pytest.mark.xfail(
    strict=True, reason="issue 11 defect 4: the CLI stores a NaN in a JSON payload as null"
)
def test_the_cli_refuses_a_payload_with_nan(dsn: str, schema: str) -> None:
    result = scoopy_cli("launch", "orders", '{"ratio": NaN}', dsn=dsn, schema=schema)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "scoopy: error:" in result.stderr and "NaN" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.xfail(
    strict=True, reason="issue 11 defect 4: there is no payload size limit (100 MB accepted)"
)
async def test_a_100_mb_payload_is_refused_by_the_default_size_limit(
    make_coop: MakeCoop, db: Db
) -> None:
    async with make_coop() as coop:
        coop.subscribe("orders", noop_saga())
        with pytest.raises(PayloadError, match=r"payload for topic 'orders'.*(size|large|limit)"):
            await coop.launch("orders", {"blob": "x" * (100 * 1024 * 1024)})
        assert (await written(db))["message"] == 0


# -- configuration ---------------------------------------------------------------------------


@pytest.mark.xfail(strict=True, reason="issue 11 defect 4: schema='' silently means 'scoopy'")
def test_an_empty_schema_name_is_refused() -> None:
    with pytest.raises(InvalidNameError, match="schema"):
        Cooperation("postgresql://unused/x", schema="")


@pytest.mark.xfail(
    strict=True,
    reason="issue 11 defect 4: a module that raises on import under `scoopy worker` prints a "
    "full traceback (only ImportError is wrapped)",
)
async def test_a_worker_app_that_raises_on_import_is_a_usage_error(dsn: str, schema: str) -> None:
    result = await anyio.to_thread.run_sync(
        lambda: scoopy_cli("worker", "tests.apps.broken_on_import:setup", dsn=dsn, schema=schema)
    )
    assert result.returncode == 2, result.stderr
    assert "scoopy: error:" in result.stderr
    assert "tests.apps.broken_on_import" in result.stderr
    assert "SHOP_DATABASE is not set" in result.stderr  # what the module said
    assert "Traceback" not in result.stderr
