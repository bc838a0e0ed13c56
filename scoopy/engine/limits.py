"""Flow control decided where a run is claimed, so it holds across every worker process.

- **Concurrency** (`Saga(concurrency=N)`): each step transaction of the saga holds one of N
  advisory slot locks from its claim to its end; a claim that finds them all taken claims
  nothing. The lock goes with the transaction, so a crash frees its slot.
- **Rate** (`Saga(rate=Rate(N, per=T))`): a generic cell rate algorithm on one row per saga,
  updated in a transaction of its own before the claim's (a step never holds the row), so
  starts are spaced T/N apart whichever process makes them.
- **Priorities** (`Saga(priorities=True)`): claims take the highest-priority ready run
  first, except every `FAIR_EVERY`th claim, which takes the oldest: the lowest priority
  always gets a share and never starves.
Sagas that declare none of these claim exactly as before, at no cost.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..vocab import Connection
from .records import Binding
from .store import Store

FAIR_EVERY = 8
SLOT_RETRY = (0.02, 0.5)  # back-off bounds while every concurrency slot is taken


@dataclass(frozen=True, slots=True)
class Limited:
    """A claim that did not happen because of a limit: try again in `wait` seconds."""

    wait: float
    reason: str


class Limits:
    """The flow-control statements of one schema."""

    def __init__(self, store: Store) -> None:
        self.sql = store.sql

    async def take_token(self, conn: Connection, binding: Binding) -> Limited | None:
        """Take one start under the saga's rate (autocommit); a `Limited` if none is free."""
        rate = binding.saga.rate
        assert rate is not None
        row = await conn.fetchrow(self.sql["take_token"], binding.saga.name, rate.interval)
        assert row is not None
        if row["taken"]:
            return None
        wait = max(0.001, float(row["wait"] or 0.0))
        return Limited(wait, f"rate limit of {rate.starts} per {rate.per:g} s")

    async def refund_token(self, conn: Connection, binding: Binding) -> None:
        rate = binding.saga.rate
        assert rate is not None
        await conn.execute(self.sql["refund_token"], binding.saga.name, rate.interval)

    async def take_slot(self, conn: Connection, binding: Binding, misses: int) -> Limited | None:
        """Hold one of the saga's concurrency slots for this transaction, or a `Limited`."""
        limit = binding.saga.concurrency
        assert limit is not None
        if await conn.fetchval(self.sql["take_slot"], binding.saga.name, limit) is not None:
            return None
        low, high = SLOT_RETRY
        return Limited(min(high, low * 2**misses), f"concurrency limit of {limit}")
