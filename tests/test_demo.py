"""`make demo`: the three-level fan-out hierarchy completes in the order the rule demands."""

from __future__ import annotations

import asyncpg
import pytest

from scoopy.demo import run_demo


async def test_the_demo_hierarchy_completes_in_order(
    dsn: str, schema: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each parent step prints only after every run it waited for, grandchildren included."""
    await run_demo(dsn, schema)  # its own schema: another run of the demo may serve the default
    out = capsys.readouterr().out
    lines = out.splitlines()

    def at(text: str) -> int:
        found = [i for i, line in enumerate(lines) if text in line]
        assert len(found) == 1, (text, out)
        return found[0]

    warehouses = [at("warehouse-east"), at("warehouse-west")]
    assert at("asks both warehouses") < min(warehouses)
    assert max(warehouses) < at("charging the card")
    assert at("charging the card") < at("asks for a fraud check") < at("scores the order")
    assert at("scores the order") < at("captures the money") < at("order confirmed")
    assert " committed in " in out


async def test_the_demo_runs_in_the_schema_it_is_given(
    dsn: str, schema: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCOOPY_DSN", dsn)
    await run_demo(schema=schema)
    out = capsys.readouterr().out
    assert "(embedded)" not in out.splitlines()[0]  # the DSN came from $SCOOPY_DSN
    assert f"scoopy --schema {schema} trace " in out
    conn = await asyncpg.connect(dsn)
    try:
        runs = await conn.fetchval(f'SELECT count(*) FROM "{schema}".run')
    finally:
        await conn.close()
    assert runs == 5  # order, two warehouses, payment, fraud check
