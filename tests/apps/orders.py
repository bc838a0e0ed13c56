"""A small business app for the reliability and chaos tests: order -> inventory + payment.

Started as `python -m scoopy --dsn DSN --schema S worker tests.apps.orders:setup`.

Every step and every compensation writes one row to the business table `effect` through
`scope.connection`, so a step whose transaction committed twice, or a compensation that ran
twice, shows as a doubled row; nothing here is idempotent on purpose. The payload's `fail`
makes a hierarchy fail on purpose:
- "payment": the payment child's only step raises; the order rolls back (its inventory
  child compensated, if it got that far);
- "order": the order's last step raises after both children committed; everything is
  compensated.

`ORDERS_STEP_SECONDS` (default 0.005) keeps each step's transaction open that long after
its write, so a SIGKILL, a restart or a terminated backend often lands inside a step.
"""

from __future__ import annotations

import os
from typing import Any

import anyio

from scoopy import Cooperation, Message, Saga, Scope

TABLE = """
CREATE TABLE effect (
    id bigserial PRIMARY KEY,
    order_id int NOT NULL,
    saga text NOT NULL,
    step text NOT NULL,
    kind text NOT NULL CHECK (kind IN ('do', 'undo')),
    pid int NOT NULL
)
"""

# The steps whose `do` row a hierarchy writes, and those with a compensation.
STEPS = {
    ("order", "place"),
    ("order", "confirm"),
    ("inventory", "reserve"),
    ("inventory", "commit_stock"),
    ("payment", "charge"),
}
COMPENSATED = {("order", "place"), ("inventory", "reserve"), ("payment", "charge")}
FAILS_IN = {"payment": ("payment", "charge"), "order": ("order", "confirm")}


class OutOfMoney(Exception):
    """The business failure of a payment."""


class OrderRejected(Exception):
    """The business failure of an order's last step."""


def _schema() -> str:
    return os.environ["SCOOPY_TEST_SCHEMA"]


def _step_seconds() -> float:
    return float(os.environ.get("ORDERS_STEP_SECONDS", "0.005"))


async def _effect(scope: Scope, message: Message[Any], step: str, kind: str) -> None:
    await scope.connection.execute(
        f'INSERT INTO "{_schema()}".effect (order_id, saga, step, kind, pid) '
        "VALUES ($1, $2, $3, $4, $5)",
        message.payload["order"],
        scope.saga,
        step,
        kind,
        os.getpid(),
    )
    await anyio.sleep(_step_seconds())


order = Saga("order", instances=8)
inventory = Saga("inventory", instances=8)
payment = Saga("payment", instances=8)


@order.step()
async def place(scope: Scope, message: Message[Any]) -> None:
    await _effect(scope, message, "place", "do")
    await scope.launch("inventory", message.payload)
    await scope.launch("payment", message.payload)


@place.rollback
async def unplace(scope: Scope, message: Message[Any], failure: BaseException) -> None:
    await _effect(scope, message, "place", "undo")


@order.step()
async def confirm(scope: Scope, message: Message[Any]) -> None:
    await _effect(scope, message, "confirm", "do")
    if message.payload.get("fail") == "order":
        raise OrderRejected(f"order {message.payload['order']} rejected")


@inventory.step()
async def reserve(scope: Scope, message: Message[Any]) -> None:
    await _effect(scope, message, "reserve", "do")


@reserve.rollback
async def unreserve(scope: Scope, message: Message[Any], failure: BaseException) -> None:
    await _effect(scope, message, "reserve", "undo")


@inventory.step()
async def commit_stock(scope: Scope, message: Message[Any]) -> None:
    await _effect(scope, message, "commit_stock", "do")


@payment.step()
async def charge(scope: Scope, message: Message[Any]) -> None:
    await _effect(scope, message, "charge", "do")
    if message.payload.get("fail") == "payment":
        raise OutOfMoney(f"order {message.payload['order']}: card declined")


@charge.rollback
async def refund(scope: Scope, message: Message[Any], failure: BaseException) -> None:
    await _effect(scope, message, "charge", "undo")


def setup(coop: Cooperation) -> None:
    coop.subscribe("orders", order)
    coop.subscribe("inventory", inventory)
    coop.subscribe("payment", payment)


def fail_mode(n: int) -> str | None:
    """Which orders fail on purpose: about one in five by payment, one in seven at the end."""
    if n % 5 == 3:
        return "payment"
    if n % 7 == 5:
        return "order"
    return None


def payload(n: int) -> dict[str, Any]:
    mode = fail_mode(n)
    return {"order": n} if mode is None else {"order": n, "fail": mode}


class Audit:
    """What the business table says about a set of order hierarchies."""

    def __init__(self) -> None:
        self.hierarchies = 0
        self.committed = 0
        self.rolled_back = 0
        self.lost: list[int] = []  # unfinished, or finished the wrong way
        self.doubled: list[tuple[int, str, str, str, int]] = []  # (order, saga, step, kind, n)
        self.missing: list[tuple[int, str, str, str]] = []  # an effect that should exist
        self.spurious: list[tuple[int, str, str, str]] = []  # an effect that must not
        self.compensations = 0  # undo rows of rolled-back hierarchies, each exactly once
        self.expected_compensations = 0

    @property
    def clean(self) -> bool:
        return not (self.lost or self.doubled or self.missing or self.spurious)

    def summary(self) -> str:
        return (
            f"{self.hierarchies} hierarchies ({self.committed} committed, "
            f"{self.rolled_back} rolled back); lost {len(self.lost)}, "
            f"doubled {len(self.doubled)}, missing {len(self.missing)}, "
            f"spurious {len(self.spurious)}; compensations "
            f"{self.compensations}/{self.expected_compensations}"
        )

    def details(self, limit: int = 10) -> str:
        return (
            f"lost={self.lost[:limit]} doubled={self.doubled[:limit]} "
            f"missing={self.missing[:limit]} spurious={self.spurious[:limit]}"
        )


def audit(
    rows: list[tuple[int, str, str, str]], statuses: dict[int, str | None], orders: list[int]
) -> Audit:
    """Check `effect` rows (order, saga, step, kind) against each order's outcome.

    `statuses[n]` is the order's outcome (`committed`, `rolled_back`...), None if unfinished.
    """
    counts: dict[tuple[int, str, str, str], int] = {}
    for row in rows:
        counts[row] = counts.get(row, 0) + 1
    result = Audit()
    result.hierarchies = len(orders)
    for key, n in counts.items():
        if n > 1:
            result.doubled.append((*key, n))
    for n in orders:
        mode = fail_mode(n)
        status = statuses.get(n)
        expected = "committed" if mode is None else "rolled_back"
        if status != expected:
            result.lost.append(n)
            continue

        def has(saga: str, step: str, kind: str, n: int = n) -> bool:
            return counts.get((n, saga, step, kind), 0) > 0

        if status == "committed":
            result.committed += 1
            for saga, step in sorted(STEPS):
                if not has(saga, step, "do"):
                    result.missing.append((n, saga, step, "do"))
                if has(saga, step, "undo"):
                    result.spurious.append((n, saga, step, "undo"))
            continue
        result.rolled_back += 1
        assert mode is not None
        failing = FAILS_IN[mode]
        if has(*failing, "do"):
            result.spurious.append((n, *failing, "do"))  # its transaction rolled back
        # Failing at the end, the order had every other step committed first.
        required = STEPS - {failing} if mode == "order" else {("order", "place")}
        for saga, step in sorted(required):
            if not has(saga, step, "do"):
                result.missing.append((n, saga, step, "do"))
        for saga, step in sorted(COMPENSATED):
            done, undone = has(saga, step, "do"), has(saga, step, "undo")
            if done:
                result.expected_compensations += 1
                if undone:
                    result.compensations += 1
                else:
                    result.missing.append((n, saga, step, "undo"))
            elif undone:
                result.spurious.append((n, saga, step, "undo"))  # compensated, never done
    return result
