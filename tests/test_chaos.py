"""Chaos (issue 11): order hierarchies across several `scoopy worker` processes while workers
are SIGKILLed and restarted, the database is restarted mid-load and busy backends are
terminated; then every hierarchy must finish, and the business table must show no lost
hierarchy, no doubled effect and every compensation exactly once.

The app is tests/apps/orders.py (order -> inventory + payment, some failing on purpose).
Everything runs on the private server (tests/infra/postgres.py), never the shared one.

Size and length come from the environment (defaults: the CI run, well under 2 minutes):
- SCOOPY_CHAOS_SCALE (1): multiplies the load and the fault window;
- SCOOPY_CHAOS_HIERARCHIES (400 x scale), SCOOPY_CHAOS_SECONDS (15 x scale),
  SCOOPY_CHAOS_WORKERS (3), SCOOPY_CHAOS_SEED, and how often each fault comes:
  SCOOPY_CHAOS_KILL_EVERY (1.0 s, on average), SCOOPY_CHAOS_RESTART_EVERY (5.0 s),
  SCOOPY_CHAOS_TERMINATE_EVERY (4.0 s).
`make chaos` runs a longer one. A summary line is printed (`-s` shows it).

A worker that exits by itself (not SIGKILLed by the test) is restarted so the run can still
be audited, and counted: the test requires none (issue 11 defect 1).
"""

from __future__ import annotations

import contextlib
import os
import random
import time
import uuid
from dataclasses import dataclass, field

import anyio
import asyncpg
import pytest

from scoopy import Cooperation

from .apps import orders
from .infra.load import APP, count_effects, effects, make_tables
from .infra.postgres import PrivateServer
from .infra.workers import WorkerFleet

SCALE = float(os.environ.get("SCOOPY_CHAOS_SCALE", "1"))
HIERARCHIES = int(os.environ.get("SCOOPY_CHAOS_HIERARCHIES", str(int(400 * SCALE))))
SECONDS = float(os.environ.get("SCOOPY_CHAOS_SECONDS", str(15 * SCALE)))
WORKERS = int(os.environ.get("SCOOPY_CHAOS_WORKERS", "3"))
KILL_EVERY = float(os.environ.get("SCOOPY_CHAOS_KILL_EVERY", "1.0"))
RESTART_EVERY = float(os.environ.get("SCOOPY_CHAOS_RESTART_EVERY", "5.0"))
TERMINATE_EVERY = float(os.environ.get("SCOOPY_CHAOS_TERMINATE_EVERY", "4.0"))
SEED = int(os.environ.get("SCOOPY_CHAOS_SEED", str(random.randrange(1 << 30))))
FINISH_WITHIN = 60.0 + 4 * SECONDS  # after the faults stop, for the backlog to drain

TRANSIENT = (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError)


@dataclass
class Faults:
    kills: int = 0
    db_restarts: int = 0
    terminated: int = 0
    downtime: list[float] = field(default_factory=list)
    unexpected_exits: list[str] = field(default_factory=list)
    first_death: str = ""  # the end of the first such worker's output, for the report
    seen: set[int] = field(default_factory=set)  # pids of the exits already counted
    launch_errors: dict[str, int] = field(default_factory=dict)  # retried, by type

    def summary(self) -> str:
        down = f" ({max(self.downtime):.2f} s max)" if self.downtime else ""
        return (
            f"SIGKILLs {self.kills}, database restarts {self.db_restarts}{down}, "
            f"terminated backends {self.terminated}; workers that died by themselves "
            f"{len(self.unexpected_exits)}; launches retried {self.launch_errors or 0}"
        )


def first_error(output: str) -> str:
    """The last line of a worker's output that names an exception (for the summary)."""
    lines = [line for line in output.splitlines() if "Error" in line or "error" in line]
    return lines[-1].strip()[:200] if lines else output.strip()[-200:]


async def launch_all(
    coop: Cooperation, roots: dict[int, uuid.UUID], rate: float, faults: Faults
) -> None:
    """Launch every order at `rate` per second, through restarts: keyed, so a launch
    retried after a lost connection cannot start a second hierarchy.

    A launch during a restart raises raw driver errors today (ConnectionDoesNotExistError,
    FileNotFoundError, even InternalClientError "cannot switch to state 12; another
    operation (2) is in progress"): they are counted and the launch retried.
    """
    started = time.monotonic()
    for n in range(HIERARCHIES):
        due = started + n / rate
        await anyio.sleep(max(0.0, due - time.monotonic()))  # pacing the load
        while True:
            try:
                handle = await coop.launch("orders", orders.payload(n), key=f"order-{n}")
                roots[n] = handle.id
                break
            except Exception as exc:
                name = type(exc).__name__
                faults.launch_errors[name] = faults.launch_errors.get(name, 0) + 1
                await anyio.sleep(0.1)  # the database is restarting: try again


async def inject(
    fleet: WorkerFleet, server: PrivateServer, faults: Faults, rng: random.Random
) -> None:
    """For SECONDS: SIGKILL and restart a worker about every KILL_EVERY s, restart the
    database (fast or immediate) every RESTART_EVERY s and terminate a backend caught
    inside a step every TERMINATE_EVERY s."""
    started = time.monotonic()
    planned = [(t, "restart") for t in _times(RESTART_EVERY)]
    planned += [(t, "terminate") for t in _times(TERMINATE_EVERY, offset=TERMINATE_EVERY / 2)]
    planned.sort()
    next_kill = started + KILL_EVERY
    while (now := time.monotonic()) < started + SECONDS:
        await revive(fleet, faults)
        if planned and now - started >= planned[0][0]:
            _, what = planned.pop(0)
            if what == "restart":
                mode = rng.choice(["fast", "immediate"])
                took = await anyio.to_thread.run_sync(server.restart, mode)
                faults.db_restarts += 1
                faults.downtime.append(took)
            else:
                faults.terminated += await terminate_one_in_a_step(server)
        elif now >= next_kill:
            victim = await fleet.kill_random()
            if victim is not None:
                faults.kills += 1
                # A process that dies at start is counted as an exit of its own, revived later.
                with contextlib.suppress(RuntimeError, TimeoutError):
                    await victim.start()
            next_kill = time.monotonic() + KILL_EVERY * rng.uniform(0.5, 1.5)
        await anyio.sleep(0.05)  # the fault schedule's tick


def _times(every: float, offset: float = 0.0) -> list[float]:
    """Fault times in the window: every `every` seconds from `every` (+ `offset`)."""
    times, t = [], every + offset
    while t < SECONDS - 1.0:  # not in the last second: the faults' effects are watched
        times.append(t)
        t += every
    return times


async def terminate_one_in_a_step(server: PrivateServer) -> int:
    """Terminate one backend caught inside a step (after its business write); 0 if none
    was caught within a second."""
    with anyio.move_on_after(1.0):
        while True:  # steps are short: look until one is caught in the act
            victims = await server.terminate_backends(
                application_name="scoopy",
                busy_only=True,
                query_like="INSERT INTO %effect%",
                limit=1,
            )
            if victims:
                return 1
            await anyio.sleep(0.01)
    return 0


async def revive(fleet: WorkerFleet, faults: Faults) -> None:
    new = [exit for exit in fleet.unexpected_exits() if exit.pid not in faults.seen]
    for exit in new:
        faults.seen.add(exit.pid)
        faults.first_death = faults.first_death or exit.output_tail[-2500:]
        faults.unexpected_exits.append(
            f"worker {exit.worker} pid {exit.pid} rc {exit.returncode}: "
            f"{first_error(exit.output_tail)}"
        )
    if new:
        # A new process that dies at start too is counted; the next tick tries again.
        with contextlib.suppress(RuntimeError, TimeoutError):
            await fleet.revive_dead()


async def wait_for_all(
    coop: Cooperation, roots: dict[int, uuid.UUID], fleet: WorkerFleet, faults: Faults
) -> dict[int, str | None]:
    statuses: dict[int, str | None] = dict.fromkeys(range(HIERARCHIES))
    deadline = time.monotonic() + FINISH_WITHIN
    pending = dict(roots)
    while pending and time.monotonic() < deadline:
        await revive(fleet, faults)
        for n, root in list(pending.items()):
            try:
                outcome = await coop.outcome(root)
            except TRANSIENT:
                break
            except LookupError:  # the launch was acknowledged, the hierarchy is gone
                statuses[n] = "missing"
                del pending[n]
                continue
            if outcome is None:
                break  # in launch order: the rest are likely unfinished too
            statuses[n] = outcome.status
            del pending[n]
        else:
            continue
        await anyio.sleep(0.2)  # outcomes are polled: nothing notifies this process
    return statuses


@pytest.mark.chaos
@pytest.mark.timeout(max(120.0, 3 * SECONDS + FINISH_WITHIN + 60))
async def test_chaos_no_lost_hierarchy_no_doubled_effect(
    private_pg: PrivateServer, private_schema: str
) -> None:
    rng = random.Random(SEED)
    faults = Faults()
    roots: dict[int, uuid.UUID] = {}
    await make_tables(private_pg.dsn, private_schema)
    started = time.monotonic()
    async with (
        Cooperation(private_pg.dsn, schema=private_schema, worker=False, pool_size=4) as coop,
        WorkerFleet(WORKERS, private_pg.dsn, private_schema, APP, seed=SEED) as fleet,
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(launch_all, coop, roots, HIERARCHIES / (SECONDS * 0.8), faults)
            await inject(fleet, private_pg, faults, rng)
        loaded = time.monotonic()
        statuses = await wait_for_all(coop, roots, fleet, faults)
        finished = time.monotonic()
        rows = await count_effects(private_pg.dsn, private_schema)
    audit = orders.audit(
        await effects(private_pg.dsn, private_schema), statuses, list(range(HIERARCHIES))
    )
    print(
        f"\nchaos (seed {SEED}, {WORKERS} workers, scale {SCALE}): load {HIERARCHIES} "
        f"hierarchies ({HIERARCHIES / (finished - started):.0f}/s), {rows} business rows in "
        f"{finished - started:.1f} s "
        f"(faults for {loaded - started:.1f} s, drained in {finished - loaded:.1f} s); "
        f"{faults.summary()}; {audit.summary()}"
    )
    for line in faults.unexpected_exits[:5]:
        print("  died:", line)
    if faults.first_death:
        print("  the first one's last output:\n" + faults.first_death)
    assert audit.clean, audit.details()
    assert faults.unexpected_exits == [], faults.summary()
