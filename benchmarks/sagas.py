"""The sagas the workloads run, and the setup functions of the worker subprocesses.

Steps do no business work: what is measured is the engine's cost per step.
"""

from __future__ import annotations

import os
import time
import uuid
from typing import Any

from scoopy import Cooperation, Message, Rate, Saga, Scope

FANOUT = 4
DEPTH = 5
INSTANCES_ENV = "SCOOPY_BENCH_INSTANCES"


def flat(instances: int) -> list[tuple[str, Saga]]:
    """Two steps, no children."""
    saga = Saga("flat", instances=instances)

    @saga.step()
    async def first(scope: Scope, message: Message[Any]) -> None:
        return None

    @saga.step()
    async def second(scope: Scope, message: Message[Any]) -> None:
        return None

    return [("flat", saga)]


def one_step(instances: int) -> list[tuple[str, Saga]]:
    """The job-queue comparison: one no-op step, no children (a plain job, as a saga)."""
    saga = Saga("one_step", instances=instances)

    @saga.step()
    async def work(scope: Scope, message: Message[Any]) -> None:
        return None

    return [("one_step", saga)]


# The rate-limited workload's limit: well below what one worker drains unlimited, so the
# figure measures the limiter, not the machine.
PACED_RATE = 200


def paced(instances: int) -> list[tuple[str, Saga]]:
    """One no-op step under a cluster-wide rate limit of `PACED_RATE` starts a second."""
    saga = Saga("paced", instances=instances, rate=Rate(PACED_RATE, per=1.0))

    @saga.step()
    async def work(scope: Scope, message: Message[Any]) -> None:
        return None

    return [("paced", saga)]


def fanout(instances: int) -> list[tuple[str, Saga]]:
    """A root whose one step launches to a topic that `FANOUT` one-step sagas listen on."""
    root = Saga("fan_root", instances=instances)

    @root.step()
    async def spread(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("fan_out", message.payload)

    sagas = [("fan_root", root)]
    for index in range(FANOUT):
        leaf = Saga(f"fan_leaf_{index}", instances=instances)

        @leaf.step()
        async def handle(scope: Scope, message: Message[Any]) -> None:
            return None

        sagas.append(("fan_out", leaf))
    return sagas


def _level(level: int, instances: int) -> Saga:
    saga = Saga(f"deep_{level}", instances=instances)
    below = f"deep_{level + 1}" if level < DEPTH else None

    @saga.step()
    async def descend(scope: Scope, message: Message[Any]) -> None:
        if below is not None:
            await scope.launch(below, message.payload)

    return saga


def deep(instances: int) -> list[tuple[str, Saga]]:
    """A chain `DEPTH` runs deep: each level's one step launches the next level."""
    return [(f"deep_{level}", _level(level, instances)) for level in range(1, DEPTH + 1)]


def wakeup(instances: int, started: dict[uuid.UUID, float]) -> list[tuple[str, Saga]]:
    """A parent whose second step notes (wall clock) when it starts, after its child."""
    parent = Saga("wake_parent", instances=instances)

    @parent.step()
    async def launch(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("wake_child", message.payload)

    @parent.step()
    async def after(scope: Scope, message: Message[Any]) -> None:
        # Wall clock, not monotonic: it is compared with the database's clock_timestamp()
        # on the same host. Overwritten if the transaction is ever retried: the last wins.
        started[scope.run_id] = time.time()

    child = Saga("wake_child", instances=instances)

    @child.step()
    async def work(scope: Scope, message: Message[Any]) -> None:
        return None

    return [("wake_parent", parent), ("wake_child", child)]


def pair(instances: int) -> list[tuple[str, Saga]]:
    """The DBOS comparison: a parent whose one step launches one one-step child."""
    parent = Saga("pair_parent", instances=instances)

    @parent.step()
    async def launch(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("pair_child", message.payload)

    child = Saga("pair_child", instances=instances)

    @child.step()
    async def work(scope: Scope, message: Message[Any]) -> None:
        return None

    return [("pair_parent", parent), ("pair_child", child)]


def _instances() -> int:
    return int(os.environ.get(INSTANCES_ENV, "16"))


def memory_parent(instances: int) -> Saga:
    """Launches one child, then waits for it: with the child unserved, it stays suspended."""
    saga = Saga("mem_parent", instances=instances)

    @saga.step()
    async def launch(scope: Scope, message: Message[Any]) -> None:
        await scope.launch("mem_child", message.payload)

    @saga.step()
    async def after(scope: Scope, message: Message[Any]) -> None:
        return None

    return saga


def memory_child() -> Saga:
    saga = Saga("mem_child", instances=1)

    @saga.step()
    async def work(scope: Scope, message: Message[Any]) -> None:
        return None

    return saga


def idle(count: int) -> list[tuple[str, Saga]]:
    sagas = []
    for index in range(count):
        saga = Saga(f"idle_{index:02d}", instances=_instances())

        @saga.step()
        async def work(scope: Scope, message: Message[Any]) -> None:
            return None

        sagas.append((f"idle_{index:02d}", saga))
    return sagas


def subscribe(coop: Cooperation, sagas: list[tuple[str, Saga]]) -> None:
    for topic, saga in sagas:
        coop.subscribe(topic, saga)


# -- setup functions for `python -m scoopy worker benchmarks.sagas:...` --------------------


def memory_setup(coop: Cooperation) -> None:
    """Serves the parents only: their children are never run, so the parents stay suspended."""
    coop.subscribe("mem", memory_parent(_instances()))


def one_step_setup(coop: Cooperation) -> None:
    subscribe(coop, one_step(_instances()))


def paced_setup(coop: Cooperation) -> None:
    subscribe(coop, paced(_instances()))


def flat_setup(coop: Cooperation) -> None:
    subscribe(coop, flat(_instances()))


def idle_setup(coop: Cooperation) -> None:
    subscribe(coop, idle(int(os.environ.get("SCOOPY_BENCH_IDLE_SAGAS", "20"))))
