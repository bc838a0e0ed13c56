"""An order saga in several releases, for the deploy tests (tests/test_deploys.py).

A worker process runs one release: `python -m scoopy worker tests.apps.deploys:coop` with
`ORDER_RELEASE` naming it. Every step and compensation writes one row to `effect`, so a
test counts what ran. `reserve_stock` launches an inventory child, served by the test
process itself, which keeps it paused to hold the order suspended in `reserve_stock`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from scoopy import Cooperation, Message, Saga, Scope


def schema() -> str:
    return os.environ["SCOOPY_TEST_SCHEMA"]


async def record(scope: Scope, message: Message[Any], step: str, kind: str = "do") -> None:
    await scope.connection.execute(
        f'INSERT INTO "{schema()}".effect (order_id, saga, step, kind) VALUES ($1, $2, $3, $4)',
        message.payload["id"],
        scope.saga,
        step,
        kind,
    )


def add(saga: Saga, name: str, *, launches: str | None = None, aliases: Sequence[str] = ()) -> None:
    """A step that records itself (and its compensation), launching onto `launches`."""

    async def run(scope: Scope, message: Message[Any]) -> None:
        await record(scope, message, name)
        if launches is not None:
            await scope.launch(launches, message.payload)

    async def undo(scope: Scope, message: Message[Any], failure: BaseException) -> None:
        await record(scope, message, name, "undo")

    step = saga.step(name, aliases=aliases)(run)
    step.rollback(undo)


# Each release of the order saga: its steps, in order.
RELEASES: dict[str, Callable[[Saga], None]] = {}


def release(name: str) -> Callable[[Callable[[Saga], None]], Callable[[Saga], None]]:
    def register(build: Callable[[Saga], None]) -> Callable[[Saga], None]:
        RELEASES[name] = build
        return build

    return register


@release("v1")
def v1(saga: Saga) -> None:
    add(saga, "validate")
    add(saga, "reserve_stock", launches="inventory")
    add(saga, "charge")


@release("append")
def appended(saga: Saga) -> None:
    v1(saga)
    add(saga, "notify")


@release("body")
def new_body(saga: Saga) -> None:
    add(saga, "validate")
    add(saga, "reserve_stock", launches="inventory")

    @saga.step("charge")
    async def charge(scope: Scope, message: Message[Any]) -> None:
        await record(scope, message, "charge", "do-v2")


@release("insert")
def inserted(saga: Saga) -> None:
    add(saga, "validate")
    add(saga, "fraud_screen")
    add(saga, "reserve_stock", launches="inventory")
    add(saga, "charge")


@release("insert-after")
def inserted_after(saga: Saga) -> None:
    add(saga, "validate")
    add(saga, "reserve_stock", launches="inventory")
    add(saga, "fraud_screen")
    add(saga, "charge")


@release("remove")
def removed(saga: Saga) -> None:
    add(saga, "validate")
    add(saga, "charge")


@release("rename")
def renamed(saga: Saga) -> None:
    add(saga, "validate")
    add(saga, "reserve_inventory", launches="inventory")
    add(saga, "charge")


@release("rename-declared")
def renamed_with_alias(saga: Saga) -> None:
    add(saga, "validate")
    add(saga, "reserve_inventory", launches="inventory", aliases=["reserve_stock"])
    add(saga, "charge")


@release("reorder")
def reordered(saga: Saga) -> None:
    add(saga, "reserve_stock", launches="inventory")
    add(saga, "validate")
    add(saga, "charge")


def order_saga(name: str) -> Saga:
    """Release `name` of the order saga: the first release is version 1, later ones 2."""
    saga = Saga("order", version=1 if name == "v1" else 2)
    RELEASES[name](saga)
    return saga


def inventory_saga() -> Saga:
    saga = Saga("inventory")
    add(saga, "take")
    return saga


def build() -> Cooperation:
    """The worker of one release, with liveness at test speed."""
    coop = Cooperation(
        os.environ.get("SCOOPY_DSN"),
        schema=schema(),
        heartbeat=0.2,
        liveness_timeout=1.5,
        shutdown_grace=5,
    )
    coop.subscribe("orders", order_saga(os.environ.get("ORDER_RELEASE", "v1")))
    return coop


coop: Cooperation | None = build() if os.environ.get("ORDER_RELEASE") else None
