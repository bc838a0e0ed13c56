"""`make demo`: the three-level fan-out hierarchy completes in the order the rule demands."""

from __future__ import annotations

import pytest

from scoopy.demo import run_demo


async def test_the_demo_hierarchy_completes_in_order(
    dsn: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each parent step prints only after every run it waited for, grandchildren included."""
    await run_demo(dsn)
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
