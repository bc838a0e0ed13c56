"""The demo: an order hierarchy three levels deep with fan-out, printing what ran when."""

from __future__ import annotations

import os
import time
from typing import Any

from .cooperation import Cooperation
from .message import Message
from .saga import Saga
from .scope import Scope

_started = time.monotonic()


def _say(scope: Scope, what: str) -> None:
    elapsed = (time.monotonic() - _started) * 1000
    indent = "  " * (scope.depth - 1)
    print(f"{elapsed:8.1f} ms  {indent}{scope.saga:<16} {scope.step:<14} {what}", flush=True)


def build() -> list[tuple[str, Saga]]:
    """The demo's sagas and the topics they listen on."""
    order = Saga("order")

    @order.step()
    async def reserve(scope: Scope, message: Message[Any]) -> None:
        _say(scope, "asks both warehouses to reserve stock")
        await scope.launch("stock.reserve", {"order": message.payload["order"]})

    @order.step()
    async def charge(scope: Scope, message: Message[Any]) -> None:
        _say(scope, "stock is reserved everywhere; charging the card")
        await scope.launch("payment.charge", {"order": message.payload["order"], "amount": 42})

    @order.step()
    async def confirm(scope: Scope, message: Message[Any]) -> None:
        _say(scope, "payment and fraud check are done; order confirmed")

    sagas: list[tuple[str, Saga]] = [("orders", order)]
    for name in ("warehouse-east", "warehouse-west"):
        warehouse = Saga(name)

        @warehouse.step("reserve-stock")
        async def reserve_stock(scope: Scope, message: Message[Any]) -> None:
            _say(scope, f"reserves stock for order {message.payload['order']}")

        sagas.append(("stock.reserve", warehouse))

    payment = Saga("payment")

    @payment.step()
    async def authorize(scope: Scope, message: Message[Any]) -> None:
        _say(scope, "authorizes; asks for a fraud check")
        await scope.launch("fraud.check", {"order": message.payload["order"]})

    @payment.step()
    async def capture(scope: Scope, message: Message[Any]) -> None:
        _say(scope, "fraud check passed; captures the money")

    fraud = Saga("fraud-check")

    @fraud.step()
    async def score(scope: Scope, message: Message[Any]) -> None:
        _say(scope, "scores the order (grandchild of the order)")

    sagas += [("payment.charge", payment), ("fraud.check", fraud)]
    return sagas


async def run_demo(dsn: str | None = None, schema: str | None = None) -> None:
    """Run the demo on `dsn` ($SCOOPY_DSN, else embedded) in `schema` ($SCOOPY_SCHEMA, else
    scoopy_demo, so that it never mixes with an application's runs)."""
    global _started
    where = "" if dsn or os.environ.get("SCOOPY_DSN") else " (embedded)"
    print(f"scoopy demo: starting PostgreSQL{where}...", flush=True)
    schema = schema or os.environ.get("SCOOPY_SCHEMA") or "scoopy_demo"
    async with Cooperation(dsn, schema=schema) as coop:
        for topic, saga in build():
            coop.subscribe(topic, saga)
        print("     time  saga             step           what happened", flush=True)
        _started = time.monotonic()
        handle = await coop.launch("orders", {"order": 7})
        outcome = await handle.wait(timeout=60)
        elapsed = (time.monotonic() - _started) * 1000
        print(f"\nhierarchy {handle.id} {outcome.status} in {elapsed:.1f} ms", flush=True)
        events = await coop.events(handle.id)
        print(
            f"event log: {len(events)} events, "
            f"see `scoopy --schema {coop.schema} trace {handle.id}`"
        )
