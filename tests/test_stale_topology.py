"""Issue 12, "stale topology is visible": a subscription nobody serves any more must not
hang later hierarchies silently, and it can be removed without writing Python.

The scenario of the issue: the README quick start runs once against a schema and leaves
`stock.reserve -> warehouse` in the shared registry. A later version of the app serves
`stock.reserve` with a saga of another name. Every later order then waits for a `warehouse`
run nobody will ever execute: that wait must say so, and the subscription must be removable
from the command line (and with `unsubscribe` by name).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Any

import anyio

from scoopy import Cooperation, Message, Outcome, Saga, Scope

from .helpers import ROOT, WAIT

MakeCoop = Callable[..., Cooperation]


def order_saga() -> Saga:
    orders = Saga("order")

    @orders.step()
    async def reserve(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("stock.reserve", {"order": message.payload["id"]})

    @orders.step()
    async def confirm(scope: Scope, message: Message[Any]) -> None:
        pass

    return orders


def stock_saga(name: str) -> Saga:
    stock = Saga(name)

    @stock.step()
    async def reserve_stock(scope: Scope, message: Message[Any]) -> None:
        pass

    return stock


async def run_the_quick_start_once(make_coop: MakeCoop) -> None:
    async with make_coop() as coop:
        coop.subscribe("orders", order_saga())
        coop.subscribe("stock.reserve", stock_saga("warehouse"))
        outcome = await (await coop.launch("orders", {"id": 7})).wait(timeout=WAIT)
        assert outcome.status == "committed"


def scoopy_cli(*args: str, dsn: str, schema: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scoopy", "--dsn", dsn, "--schema", schema, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=WAIT,
        check=False,
    )


async def test_an_order_waiting_for_a_stale_subscription_says_what_it_waits_for(
    make_coop: MakeCoop,
) -> None:
    """Either the stale subscription has expired and the order commits without it, or the
    wait's timeout names the saga it is still waiting for. Never a bare TimeoutError."""
    await run_the_quick_start_once(make_coop)
    async with make_coop() as coop:
        coop.subscribe("orders", order_saga())
        coop.subscribe("stock.reserve", stock_saga("depot"))  # renamed in the new release
        handle = await coop.launch("orders", {"id": 8})
        outcome: Outcome | None = None
        timeout: TimeoutError | None = None
        try:
            outcome = await handle.wait(timeout=5)
        except TimeoutError as exc:
            timeout = exc
        if timeout is not None:
            assert "warehouse" in str(timeout), f"a bare timeout: {timeout!r}"
        else:
            assert outcome is not None and outcome.status == "committed"
            assert {run.saga for run in await coop.runs(handle.id)} == {"order", "depot"}


async def test_scoopy_subscriptions_lists_every_subscription(
    make_coop: MakeCoop, dsn: str, schema: str
) -> None:
    await run_the_quick_start_once(make_coop)
    result = await anyio.to_thread.run_sync(
        lambda: scoopy_cli("subscriptions", dsn=dsn, schema=schema)
    )
    assert result.returncode == 0, result.stderr
    lines = [line.split() for line in result.stdout.splitlines()]
    assert any(line[:2] == ["stock.reserve", "warehouse"] for line in lines), result.stdout
    assert any(line[:2] == ["orders", "order"] for line in lines), result.stdout


async def test_scoopy_unsubscribe_removes_a_stale_subscription_and_releases_the_order(
    make_coop: MakeCoop, dsn: str, schema: str
) -> None:
    await run_the_quick_start_once(make_coop)
    async with make_coop() as coop:
        coop.subscribe("orders", order_saga())
        coop.subscribe("stock.reserve", stock_saga("depot"))
        handle = await coop.launch("orders", {"id": 9})
        removed = await anyio.to_thread.run_sync(
            lambda: scoopy_cli("unsubscribe", "stock.reserve", "warehouse", dsn=dsn, schema=schema)
        )
        assert removed.returncode == 0, removed.stderr
        assert ("stock.reserve", "warehouse") not in await coop.subscriptions()
        outcome = await handle.wait(timeout=WAIT)  # its unstarted warehouse run is skipped
    assert outcome.status == "committed"


async def test_unsubscribe_takes_a_saga_name(make_coop: MakeCoop) -> None:
    """Another service's saga can only be named: this process does not have its object."""
    await run_the_quick_start_once(make_coop)
    async with make_coop(worker=False) as coop:
        coop.unsubscribe("stock.reserve", "warehouse")
        await coop.sync()
        assert ("stock.reserve", "warehouse") not in await coop.subscriptions()
        assert ("orders", "order") in await coop.subscriptions()
