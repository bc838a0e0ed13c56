"""Issue 12, live topology: a saga whose workers all died is reported, and resumes when one
returns; a subscription nobody serves any more expires."""

from __future__ import annotations

from collections.abc import Callable, MutableMapping
from typing import Any

import pytest
import structlog

from scoopy import Cooperation, Message, Saga, Scope

from .helpers import WAIT, WorkerProcess, eventually

MakeCoop = Callable[..., Cooperation]
FAST = {"heartbeat": 0.2, "liveness_timeout": 1.5}
WORKER_ARGS = ("--heartbeat", "0.2", "--liveness-timeout", "1.5")


def parent_saga() -> Saga:
    parent = Saga("near-parent")

    @parent.step()
    async def ask(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("far-child", {})

    @parent.step()
    async def done(scope: Scope, message: Message[Any]) -> None:
        pass

    return parent


def child_worker(dsn: str, schema: str) -> WorkerProcess:
    worker = WorkerProcess(dsn, schema, "tests.apps.liveness:setup")
    worker.args += WORKER_ARGS
    return worker


async def test_a_saga_whose_workers_all_died_is_reported_and_resumes_when_one_returns(
    make_coop: MakeCoop, dsn: str, schema: str
) -> None:
    async with make_coop(**FAST) as coop:
        coop.subscribe("near-parent", parent_saga())
        async with child_worker(dsn, schema) as worker:
            await worker.kill()  # the only worker of far-child dies, without a word
        with structlog.testing.capture_logs() as logs:
            handle = await coop.launch("near-parent", {})

            async def reported() -> bool:
                waiting = await coop.waiting_for(handle.id)
                return any(w.kind == "unserved" and w.saga == "far-child" for w in waiting)

            await eventually(reported)
            await eventually(lambda: _warned(logs))
        with pytest.raises(TimeoutError, match="no live worker serves saga 'far-child'"):
            await handle.wait(timeout=0.5)
        async with child_worker(dsn, schema):
            outcome = await handle.wait(timeout=WAIT)
    assert outcome.status == "committed"


async def _warned(logs: list[MutableMapping[str, Any]]) -> bool:
    return any(
        entry["event"] == "runs wait for a saga no live worker serves"
        and entry["saga"] == "far-child"
        for entry in logs
    )


async def test_a_subscription_no_live_worker_serves_expires(make_coop: MakeCoop) -> None:
    async with make_coop(**FAST) as coop:  # an app that ran once against this schema
        stale = Saga("warehouse")

        @stale.step()
        async def reserve(scope: Scope, message: Message[Any]) -> None:
            pass

        coop.subscribe("stock.reserve", stale)
        await coop.sync()
    async with make_coop(**FAST, subscription_ttl=2.0) as coop:
        depot = Saga("depot")

        @depot.step()
        async def take(scope: Scope, message: Message[Any]) -> None:
            pass

        coop.subscribe("stock.reserve", depot)
        handle = await coop.launch("stock.reserve", {})  # fans out to warehouse and depot
        outcome = await handle.wait(timeout=WAIT)
        assert ("stock.reserve", "warehouse") not in await coop.subscriptions()
    assert outcome.status == "committed"
    assert [run.saga for run in outcome.runs] == ["depot", "warehouse"]
    assert [run.status for run in outcome.runs] == ["committed", "skipped"]
