"""Workload sizes: fixed numbers (never "as many as fit in N seconds"), so runs compare."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

WORKLOADS = (
    "ceiling",
    "flat",
    "unanalyzed",
    "fanout",
    "deep",
    "wakeup",
    "history",
    "dbos",
    "pgqueuer",
    "procrastinate",
    "workers",
    "limits",
    "memory",
    "idle",
    "roundtrips",
)


@dataclass(frozen=True, slots=True)
class Settings:
    quick: bool = False
    seed: int = 1
    reps: int = 3
    # flat / ceiling sits closest to its target and swings most with the host's noise:
    # its three measurements get more repetitions (`--reps` sets both).
    ratio_reps: int = 5
    # How many step transactions scoopy may have in flight: every saga's `instances`, and
    # (plus a few for polling and launching) the pool size; the ceiling uses as many
    # connections, the DBOS comparison as many hierarchies in flight.
    concurrency: int = 16
    warmup: int = 50  # unmeasured hierarchies before each timed scoopy repetition
    ceiling_transactions: int = 20_000
    flat_roots: int = 4_000
    fanout_roots: int = 1_000
    deep_roots: int = 800
    wakeup_hierarchies: int = 500
    wakeup_inflight: int = 4
    history_runs: int = 1_000_000
    dbos_hierarchies: int = 1_000
    # The job-queue peers: one-step scoopy roots and PgQueuer's no-op jobs, `peer_jobs` of
    # each; Procrastinate drains ~20x slower, so it gets fewer to keep the run short
    # (rates, not durations, are compared).
    peer_jobs: int = 10_000
    procrastinate_jobs: int = 2_000
    # PgQueuer's best figure on this machine (2 cores): one queue manager, dequeue batches
    # of 200, no cap on jobs in flight (README, "PgQueuer").
    pgqueuer_batch_size: int = 200
    pgqueuer_managers: int = 1
    pgqueuer_max_concurrent: int = 0  # per manager; 0: no cap
    worker_processes: tuple[int, ...] = (1, 2, 4)
    paced_seconds: int = 10  # the rate-limited saga's backlog lasts this long at its limit
    paced_processes: int = 2
    memory_runs: int = 10_000
    idle_sagas: int = 20
    idle_polls: int = 10  # the idle window spans this many of the worker's poll cycles
    roundtrip_roots: int = 200
    timeout: float = 300.0  # upper bound for any single wait; a hang fails loudly

    @property
    def pool_size(self) -> int:
        return self.concurrency + 4

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


QUICK = {
    "reps": 1,
    "ratio_reps": 1,
    "warmup": 20,
    "ceiling_transactions": 5_000,
    "flat_roots": 1_000,
    "fanout_roots": 200,
    "deep_roots": 200,
    "history_runs": 1_000_000,
    "dbos_hierarchies": 300,
    "peer_jobs": 3_000,
    "procrastinate_jobs": 500,
    "idle_polls": 5,
    "paced_seconds": 5,
    "roundtrip_roots": 100,
}


def build(quick: bool, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(QUICK) if quick else {}
    values.update({key: value for key, value in overrides.items() if value is not None})
    if overrides.get("reps") is not None:
        values["ratio_reps"] = overrides["reps"]
    return Settings(quick=quick, **values)
