"""Periodic launches, built from two primitives: durable sleep and launches outside the hierarchy.

A schedule is a chain of runs of the built-in `scoopy.periodic` saga. Each run sleeps until
its firing is due, then, in one transaction, launches the job (keyed by its due time, so it
can never fire twice) and the next link of the chain (keyed likewise). Several workers
cannot fire it twice and a restart misses nothing: the chain lives in the database.

Catch-up after downtime: with `catch_up="latest"` (the default) a schedule that missed
several firings fires once, late, then resumes on its regular times; with `"all"` it fires
once for every missed time, back to back. Cron expressions are evaluated in UTC.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from typing import Literal

import msgspec
from cronsim import CronSim, CronSimError

from .context import CooperationContext
from .errors import ScoopyError
from .message import Message, Topic
from .saga import Saga
from .scope import Scope

PERIODIC = "scoopy.periodic"
CatchUp = Literal["latest", "all"]


class Schedule(msgspec.Struct, frozen=True, kw_only=True):
    """One link of a schedule's chain: what to launch, how often, and when this firing is due."""

    key: str
    topic: str
    payload: msgspec.Raw
    context: msgspec.Raw | None = None
    every: float | None = None  # seconds
    cron: str | None = None
    due: datetime
    catch_up: CatchUp = "latest"
    chain: str = ""  # one per `schedule` call: a key scheduled anew never meets its old links


SCHEDULES: Topic[Schedule] = Topic(PERIODIC, Schedule)


def check_cadence(every: timedelta | float | None, cron: str | None) -> float | None:
    """Validate `every`/`cron`; return `every` in seconds. Raise `ScoopyError` if unusable."""
    if (every is None) == (cron is None):
        raise ScoopyError("a schedule needs exactly one of `every` and `cron`")
    if cron is not None:
        try:
            CronSim(cron, datetime.now())
        except CronSimError as exc:
            raise ScoopyError(f"invalid cron expression {cron!r}: {exc}") from exc
        return None
    assert every is not None
    seconds = every.total_seconds() if isinstance(every, timedelta) else float(every)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ScoopyError(f"`every` must be a positive duration, got {every!r}")
    return seconds


def next_due(schedule: Schedule, after: datetime) -> datetime:
    """The first firing time of `schedule` strictly after `after`."""
    if schedule.cron is not None:
        return next(CronSim(schedule.cron, after.astimezone(UTC)))
    assert schedule.every is not None
    period = timedelta(seconds=schedule.every)
    if after < schedule.due:
        return schedule.due
    missed = math.floor((after - schedule.due) / period) + 1
    return schedule.due + missed * period


def chain_key(key: str, link: Schedule | None = None) -> str:
    """The prefix of every link key of schedule `key`, or the key of one link."""
    prefix = f"{PERIODIC}:{key}"
    return prefix if link is None else f"{prefix}@{link.due.isoformat()}/{link.chain}"


def build() -> Saga:
    """The saga every worker runs to drive schedules."""
    saga = Saga(PERIODIC, instances=4)

    @saga.step("wait")
    async def wait(scope: Scope, message: Message[Schedule]) -> None:
        await scope.sleep_until(message.payload.due)

    @saga.step("fire")
    async def fire(scope: Scope, message: Message[Schedule]) -> None:
        schedule = message.payload
        context = CooperationContext.decode(schedule.context) if schedule.context else None
        await scope.launch_global(
            schedule.topic,
            schedule.payload,
            context=context,
            key=f"{PERIODIC}:{schedule.key}:fired@{schedule.due.isoformat()}/{schedule.chain}",
        )
        base = schedule.due if schedule.catch_up == "all" else max(schedule.due, scope.now())
        following = msgspec.structs.replace(schedule, due=next_due(schedule, base))
        await scope.launch_global(SCHEDULES, following, key=chain_key(schedule.key, following))

    return saga


def first_link(
    key: str,
    topic: str,
    payload: bytes,
    context: bytes | None,
    every: float | None,
    cron: str | None,
    start: datetime,
    catch_up: CatchUp,
    chain: str,
) -> Schedule:
    start = start.astimezone(UTC)
    draft = Schedule(
        key=key,
        topic=topic,
        payload=msgspec.Raw(payload),
        context=None if context is None else msgspec.Raw(context),
        every=every,
        cron=cron,
        due=start,
        catch_up=catch_up,
        chain=chain,
    )
    due = start if cron is None else next_due(draft, start - timedelta(microseconds=1))
    return msgspec.structs.replace(draft, due=due)
