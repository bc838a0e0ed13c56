"""Running the selected workloads in order and turning repetitions into figures.

Figures compared with each other are measured side by side: each repetition of a ratio
runs both sides back to back (alternating which goes first), and the ratio reported is
the median of the per-repetition ratios. Single figures are medians of repetitions.
History runs last: its bulk load leaves the most write-back behind it.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import anyio

from . import accounting, ceiling, dbos_bench, drain, history, peers, procs, sagas, workloads
from .machine import CpuMeter
from .pg import fresh_schema, postmaster
from .report import NOT_RUN, Figure, Target, median, package_version
from .settings import Settings

# The job queues measured side by side with scoopy's one-step roots, and their packages.
PEERS = {"pgqueuer": "pgqueuer", "procrastinate": "procrastinate"}
PEERS_LABELS = {"pgqueuer": "PgQueuer", "procrastinate": "Procrastinate"}

# The figures every JSON file holds at its top level, and the workloads that make each.
REQUIRED: dict[str, tuple[str, ...]] = {
    "ceiling_tps": ("ceiling",),
    "flat_steps_per_s": ("flat",),
    "flat_vs_ceiling": ("ceiling", "flat"),
    "fanout_per_s": ("fanout",),
    "deep_per_s": ("deep",),
    "wakeup_p50_ms": ("wakeup",),
    "wakeup_p99_ms": ("wakeup",),
    "history_ratio": ("history",),
    "dbos_per_s": ("dbos",),
    "scoopy_vs_dbos": ("dbos",),
    "pgqueuer_per_s": ("pgqueuer",),
    "scoopy_vs_pgqueuer": ("pgqueuer",),
    "procrastinate_per_s": ("procrastinate",),
    "scoopy_vs_procrastinate": ("procrastinate",),
    "flat_processes_1_steps_per_s": ("workers",),
    "rate_limit_error": ("limits",),
    "worker_rss_mb": ("memory",),
    "idle_queries_per_s": ("idle",),
}


def describe_error(exc: BaseException) -> str:
    """The first real error inside task-group wrappers, as `Type: message`."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


@dataclass
class Results:
    figures: dict[str, Figure] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    cpu: dict[str, dict[str, float]] = field(default_factory=dict)
    others_per_rep: dict[str, float] = field(default_factory=dict)

    def add(self, figure: Figure) -> None:
        self.figures[figure.key] = figure


class Suite:
    def __init__(self, dsn: str, settings: Settings, selected: list[str], meter: CpuMeter) -> None:
        self.dsn = dsn
        self.meter = meter
        self.settings = settings
        self.selected = selected
        self.results = Results()
        self.started = time.perf_counter()

    def say(self, message: str) -> None:
        elapsed = time.perf_counter() - self.started
        print(f"[{elapsed:6.1f}s] {message}", file=sys.stderr, flush=True)

    def reps(self) -> range:
        return range(self.settings.reps)

    @contextmanager
    def observed(self, label: str) -> Iterator[None]:
        """Record which share of the machine other processes used during one measurement."""
        before = self.meter.sample()
        yield
        share = CpuMeter.foreign(before, self.meter.sample())["others_share"]
        self.results.others_per_rep[label] = share

    def said(self, label: str, message: str) -> None:
        """Report one measurement, with how disturbed it was."""
        share = self.results.others_per_rep.get(label)
        self.say(message if share is None else f"{message}  (others {share:.0%})")

    async def run(self) -> Results:
        groups: list[tuple[str, Callable[[], Awaitable[None]]]] = []
        if "ceiling" in self.selected or "flat" in self.selected:
            groups.append(("ceiling+flat", self.ceiling_and_flat))
        peer_groups = [name for name in PEERS if name in self.selected]
        if peer_groups:
            groups.append(("+".join(peer_groups), self.peers))
        named: list[tuple[str, Callable[[], Awaitable[None]]]] = [
            ("unanalyzed", self.unanalyzed),
            ("fanout", self.fanout),
            ("deep", self.deep),
            ("wakeup", self.wakeup),
            ("dbos", self.dbos),
            ("workers", self.workers),
            ("limits", self.limits),
            ("memory", self.memory),
            ("idle", self.idle),
            ("roundtrips", self.roundtrips),
            ("history", self.history),
        ]
        for name, group in named:
            if name in self.selected:
                groups.append((name, group))
        for name, group in [("server warm-up", self.warm_server), *groups]:
            began = time.perf_counter()
            before = self.meter.sample()
            try:
                await group()
            except Exception as exc:
                self.results.errors[name] = describe_error(exc)
                self.say(f"{name} FAILED: {self.results.errors[name]}")
            self.results.seconds[name] = time.perf_counter() - began
            cpu = self.results.cpu[name] = CpuMeter.foreign(before, self.meter.sample())
            if cpu["others_share"] > 0.05:
                self.say(
                    f"{name}: other processes used {cpu['others_share']:.0%} of the machine "
                    "meanwhile: its figures are disturbed"
                )
        for key, needs in REQUIRED.items():
            if key not in self.results.figures:
                ran = all(workload in self.selected for workload in needs)
                self.results.add(Figure(key, key, "", None, note="failed" if ran else NOT_RUN))
        return self.results

    async def warm_server(self) -> None:
        """One unmeasured ceiling pass: a freshly started server first creates WAL segments
        and fills its caches, which would otherwise fall on whichever workload runs first."""
        s = self.settings
        async with fresh_schema(self.dsn, "warm") as schema:
            await ceiling.measure(
                self.dsn, schema, s.concurrency, s.ceiling_transactions // 2, 0, s.seed
            )
        self.say("server warmed up (one unmeasured ceiling pass)")

    # -- groups ----------------------------------------------------------------------------

    async def ceiling_and_flat(self) -> None:
        s = self.settings
        want_ceiling = "ceiling" in self.selected
        want_flat = "flat" in self.selected
        tps: list[float] = []
        folded_tps: list[float] = []
        steps: list[float] = []
        ratios: list[float] = []
        folded_ratios: list[float] = []
        kinds = ["ceiling", "flat", "ceiling_folded"]
        for rep in range(s.ratio_reps):
            order = kinds[rep % 3 :] + kinds[: rep % 3]  # each goes first once in 3 reps
            measured: dict[str, float] = {}
            for which in order:
                label = f"{which} {rep + 1}"
                if which.startswith("ceiling") and want_ceiling:
                    fold = which == "ceiling_folded"
                    with self.observed(label):
                        async with fresh_schema(self.dsn, "ceiling") as schema:
                            result = await ceiling.measure(
                                self.dsn,
                                schema,
                                s.concurrency,
                                s.ceiling_transactions,
                                s.warmup * 10,
                                s.seed,
                                fold=fold,
                            )
                    measured[which] = result.tps
                    self.said(
                        label,
                        f"{'folded ' if fold else ''}ceiling rep {rep + 1}: "
                        f"{result.tps:,.0f} transactions/s",
                    )
                elif which == "flat" and want_flat:
                    with self.observed(label):
                        timed = await workloads.throughput(
                            self.dsn, s, workloads.FLAT, s.flat_roots
                        )
                    measured["flat"] = timed.steps_per_s
                    self.said(label, f"flat rep {rep + 1}: {timed.steps_per_s:,.0f} steps/s")
            if "ceiling" in measured:
                tps.append(measured["ceiling"])
                folded_tps.append(measured["ceiling_folded"])
            if "flat" in measured:
                steps.append(measured["flat"])
            if len(measured) == 3:
                ratios.append(measured["flat"] / measured["ceiling"])
                folded_ratios.append(measured["flat"] / measured["ceiling_folded"])
        r = self.results
        if tps:
            r.add(
                Figure(
                    "ceiling_tps",
                    "ceiling: raw asyncpg, step-shaped",
                    "tx/s",
                    median(tps),
                    tps,
                    note=f"{s.concurrency} connections",
                )
            )
        if folded_tps:
            r.add(
                Figure(
                    "ceiling_folded_tps",
                    "ceiling, COMMIT; BEGIN folded",
                    "tx/s",
                    median(folded_tps),
                    folded_tps,
                    note="not a target: the round trip scoopy saves, given to raw asyncpg",
                )
            )
        if steps:
            r.add(Figure("flat_steps_per_s", "flat: 2-step roots", "steps/s", median(steps), steps))
        if ratios:
            r.add(
                Figure(
                    "flat_vs_ceiling",
                    "flat / ceiling",
                    "ratio",
                    median(ratios),
                    ratios,
                    Target("min", 0.5),
                )
            )
        if folded_ratios:
            r.add(
                Figure(
                    "flat_vs_ceiling_folded",
                    "flat / folded ceiling",
                    "ratio",
                    median(folded_ratios),
                    folded_ratios,
                    note="not a target",
                )
            )

    async def unanalyzed(self) -> None:
        """Flat on tables never ANALYZEd, as right after deployment: an engine weakness."""
        steps: list[float] = []
        for rep in self.reps():
            measurement = f"unanalyzed {rep + 1}"
            with self.observed(measurement):
                timed = await workloads.throughput(
                    self.dsn, self.settings, workloads.FLAT, self.settings.flat_roots, analyze=False
                )
            steps.append(timed.steps_per_s)
            self.said(measurement, f"{measurement}: {timed.steps_per_s:,.0f} steps/s")
        self.results.add(
            Figure(
                "flat_unanalyzed_steps_per_s",
                "flat, tables never ANALYZEd",
                "steps/s",
                median(steps),
                steps,
                note="not a target: shows what missing statistics cost",
            )
        )

    async def _throughput(self, key: str, label: str, shape: workloads.Shape, n: int) -> None:
        per_s: list[float] = []
        runs: list[dict[str, Any]] = []
        for rep in self.reps():
            measurement = f"{shape.root_saga} {rep + 1}"
            with self.observed(measurement):
                timed = await workloads.throughput(self.dsn, self.settings, shape, n)
            per_s.append(timed.per_s)
            runs.append(workloads.describe(timed))
            self.said(measurement, f"{measurement}: {timed.per_s:,.0f} hierarchies/s")
        self.results.add(Figure(key, label, "hier/s", median(per_s), per_s))
        self.results.details[key] = runs

    async def fanout(self) -> None:
        await self._throughput(
            "fanout_per_s",
            "fan-out: root + 4 children",
            workloads.FANOUT,
            self.settings.fanout_roots,
        )

    async def deep(self) -> None:
        await self._throughput(
            "deep_per_s", "deep: chain of 5 levels", workloads.DEEP, self.settings.deep_roots
        )

    async def wakeup(self) -> None:
        p50: list[float] = []
        p99: list[float] = []
        peaks: list[float] = []
        runs: list[dict[str, Any]] = []
        for rep in self.reps():
            label = f"wakeup {rep + 1}"
            with self.observed(label):
                _, latencies = await workloads.wakeup(self.dsn, self.settings)
            summary = latencies.summary()
            p50.append(summary["p50_ms"])
            p99.append(summary["p99_ms"])
            peaks.append(summary["max_ms"])
            runs.append(summary)
            self.said(
                label,
                f"wakeup rep {rep + 1}: p50 {summary['p50_ms']:.2f} ms, "
                f"p99 {summary['p99_ms']:.2f} ms, max {summary['max_ms']:.2f} ms",
            )
        inflight = f"{self.settings.wakeup_inflight} in flight"
        r = self.results
        r.add(
            Figure("wakeup_p50_ms", "wake-up latency p50", "ms", median(p50), p50, Target("max", 5))
        )
        r.add(
            Figure(
                "wakeup_p99_ms",
                "wake-up latency p99",
                "ms",
                median(p99),
                p99,
                Target("max", 25),
                note=inflight,
            )
        )
        r.add(Figure("wakeup_max_ms", "wake-up latency max (all reps)", "ms", max(peaks), peaks))
        r.details["wakeup"] = runs

    async def dbos(self) -> None:
        s = self.settings
        if dbos_bench.dbos_version() is None:
            raise RuntimeError("dbos is not installed: `pip install -e '.[bench]'`")
        ours: list[float] = []
        theirs: list[float] = []
        ratios: list[float] = []
        runs: list[dict[str, Any]] = []
        for rep in self.reps():
            order = ["scoopy", "dbos"] if rep % 2 == 0 else ["dbos", "scoopy"]
            measured: dict[str, float] = {}
            for which in order:
                label = f"{which} pair {rep + 1}"
                if which == "scoopy":
                    with self.observed(label):
                        timed = await workloads.pair(self.dsn, s)
                    measured["scoopy"] = timed.per_s
                else:
                    with self.observed(label):
                        result = await dbos_bench.run(
                            self.dsn, s.dbos_hierarchies, s.concurrency, s.warmup, 20, s.timeout
                        )
                    measured["dbos"] = result.per_s
                    runs.append({"dbos_launch_seconds": result.launch_seconds})
                self.said(label, f"{label}: {measured[which]:,.0f} hierarchies/s")
            ours.append(measured["scoopy"])
            theirs.append(measured["dbos"])
            ratios.append(measured["scoopy"] / measured["dbos"])
        r = self.results
        note = f"parent + 1 child, {s.concurrency} in flight"
        r.add(Figure("dbos_per_s", "DBOS: parent + child", "hier/s", median(theirs), theirs))
        r.add(
            Figure(
                "scoopy_pair_per_s",
                "scoopy: parent + child",
                "hier/s",
                median(ours),
                ours,
                note=note,
            )
        )
        r.add(
            Figure(
                "scoopy_vs_dbos",
                "scoopy / DBOS",
                "ratio",
                median(ratios),
                ratios,
                Target("min", 5),
            )
        )
        r.details["dbos"] = runs

    async def _peer(self, which: str, server: int | None) -> peers.Drained:
        s = self.settings
        pid = ["--postmaster", str(server or 0)]
        if which == "scoopy":
            return await drain.one_step(self.dsn, s, s.peer_jobs, server)
        if which == "pgqueuer":
            args = [
                "--jobs", str(s.peer_jobs), "--warmup", str(s.warmup),
                "--batch-size", str(s.pgqueuer_batch_size),
                "--managers", str(s.pgqueuer_managers),
                "--max-concurrent", str(s.pgqueuer_max_concurrent),
            ]  # fmt: skip
            return await peers.run("pgqueuer_bench", self.dsn, "pgqueuer", args + pid, s.timeout)
        args = [
            "--jobs", str(s.procrastinate_jobs), "--warmup", str(s.warmup),
            "--concurrency", str(s.concurrency), "--pool-size", str(s.pool_size),
        ]  # fmt: skip
        return await peers.run(
            "procrastinate_bench", self.dsn, "procrastinate", args + pid, s.timeout
        )

    async def peers(self) -> None:
        """scoopy's one-step roots beside each selected job queue, in the same repetitions.

        Every pair of sides swaps its order from one repetition to the next (the order is
        reversed), and each ratio is the median of the per-repetition ratios.
        """
        s = self.settings
        chosen = [name for name in PEERS if name in self.selected]
        missing = [PEERS[name] for name in chosen if package_version(PEERS[name]) is None]
        if missing:
            raise RuntimeError(f"{', '.join(missing)} not installed: `pip install -e '.[bench]'`")
        server = await postmaster(self.dsn)
        sides = ["scoopy", *chosen]
        rates: dict[str, list[float]] = {side: [] for side in sides}
        cpu: dict[str, list[float]] = {side: [] for side in sides}
        ratios: dict[str, list[float]] = {name: [] for name in chosen}
        runs: list[dict[str, Any]] = []
        for rep in range(s.ratio_reps):
            measured: dict[str, peers.Drained] = {}
            for which in sides if rep % 2 == 0 else sides[::-1]:
                label = f"{which} drain {rep + 1}"
                with self.observed(label):
                    measured[which] = await self._peer(which, server)
                done = measured[which]
                server_cpu = done.server_cpu_us_per_item
                self.said(
                    label,
                    f"{label}: {done.per_s:,.0f} items/s, worker CPU {done.cpu_us_per_item:,.0f}"
                    " µs/item"
                    + ("" if server_cpu is None else f", server CPU {server_cpu:,.0f} µs/item"),
                )
            for which, done in measured.items():
                rates[which].append(done.per_s)
                cpu[which].append(done.cpu_us_per_item)
            for name in chosen:
                ratios[name].append(measured["scoopy"].per_s / measured[name].per_s)
            runs.append({which: done.describe() for which, done in measured.items()})
        r = self.results
        r.add(
            Figure(
                "scoopy_one_step_per_s",
                "scoopy: one-step roots, 1 worker process",
                "runs/s",
                median(rates["scoopy"]),
                rates["scoopy"],
                note=f"{s.peer_jobs:,} roots, {s.concurrency} steps in flight",
            )
        )
        if "pgqueuer" in chosen:
            cap = s.pgqueuer_max_concurrent or "no cap"
            r.add(
                Figure(
                    "pgqueuer_per_s",
                    "PgQueuer: no-op jobs, 1 process",
                    "jobs/s",
                    median(rates["pgqueuer"]),
                    rates["pgqueuer"],
                    note=f"batch {s.pgqueuer_batch_size}, {s.pgqueuer_managers} manager(s), "
                    f"in flight: {cap}",
                )
            )
            r.add(
                Figure(
                    "scoopy_vs_pgqueuer",
                    "scoopy one-step / PgQueuer",
                    "ratio",
                    median(ratios["pgqueuer"]),
                    ratios["pgqueuer"],
                    Target("min", 1.0),
                )
            )
        if "procrastinate" in chosen:
            r.add(
                Figure(
                    "procrastinate_per_s",
                    "Procrastinate: no-op jobs, asyncio worker",
                    "jobs/s",
                    median(rates["procrastinate"]),
                    rates["procrastinate"],
                    note=f"{s.procrastinate_jobs:,} jobs, concurrency {s.concurrency}",
                )
            )
            r.add(
                Figure(
                    "scoopy_vs_procrastinate",
                    "scoopy one-step / Procrastinate",
                    "ratio",
                    median(ratios["procrastinate"]),
                    ratios["procrastinate"],
                    Target("min", 5),
                )
            )
        names = {"scoopy": "scoopy one-step", **{name: PEERS_LABELS[name] for name in chosen}}
        for which in sides:
            r.add(
                Figure(
                    f"{which}_cpu_us_per_item",
                    f"worker CPU per item, {names[which]}",
                    "µs",
                    median(cpu[which]),
                    cpu[which],
                    note="the draining process: user + system",
                )
            )
        r.details["peers"] = {
            "versions": {
                name: package_version(name)
                for name in ("scoopy", "pgqueuer", "procrastinate", "psycopg", "asyncpg")
            },
            "repetitions": runs,
        }

    async def workers(self) -> None:
        """The flat workload drained by 1, 2 and 4 worker processes against one server."""
        s = self.settings
        server = await postmaster(self.dsn)
        counts = list(s.worker_processes)
        steps: dict[int, list[float]] = {n: [] for n in counts}
        server_busy: dict[int, list[float]] = {n: [] for n in counts}
        runs: list[dict[str, Any]] = []
        for rep in self.reps():
            for n in counts if rep % 2 == 0 else counts[::-1]:
                label = f"flat, {n} worker process(es), rep {rep + 1}"
                with self.observed(label):
                    done = await drain.flat(self.dsn, s, n, server)
                rate = done.extra["steps_per_s"]
                steps[n].append(rate)
                busy = done.describe()["server_cores_busy"]
                if busy is not None:
                    server_busy[n].append(busy)
                runs.append(done.describe())
                self.said(
                    label,
                    f"{label}: {rate:,.0f} steps/s, workers "
                    f"{done.cpu_seconds / done.seconds:.2f} cores"
                    + ("" if busy is None else f", server {busy:.2f} cores"),
                )
        for n in counts:
            busy = f", server busy {median(server_busy[n]):.2f} cores" if server_busy[n] else ""
            self.results.add(
                Figure(
                    f"flat_processes_{n}_steps_per_s",
                    f"flat, {n} worker process{'es' if n > 1 else ''}",
                    "steps/s",
                    median(steps[n]),
                    steps[n],
                    note=f"{s.concurrency} steps in flight each{busy}",
                )
            )
        self.results.details["workers"] = runs

    async def limits(self) -> None:
        """A rate-limited saga's achieved rate against its limit, across worker processes."""
        s = self.settings
        server = await postmaster(self.dsn)
        rates: list[float] = []
        for rep in self.reps():
            label = f"rate-limited saga, {s.paced_processes} processes, rep {rep + 1}"
            with self.observed(label):
                done = await drain.paced(self.dsn, s, s.paced_processes, server)
            # n starts spaced 1/limit apart take (n - 1)/limit seconds.
            rates.append((done.items - 1) / done.seconds)
            self.said(label, f"{label}: {rates[-1]:,.1f} starts/s (limit {sagas.PACED_RATE})")
        self.results.add(
            Figure(
                "rate_limited_per_s",
                f"rate-limited saga (limit {sagas.PACED_RATE}/s)",
                "starts/s",
                median(rates),
                rates,
                note=f"{s.paced_processes} worker processes",
            )
        )
        errors = [abs(rate / sagas.PACED_RATE - 1) for rate in rates]
        self.results.add(
            Figure(
                "rate_limit_error",
                "|achieved / limit - 1|",
                "ratio",
                median(errors),
                errors,
                Target("max", 0.05),
            )
        )

    async def memory(self) -> None:
        peaks: list[float] = []
        runs: list[dict[str, Any]] = []
        for rep in self.reps():
            label = f"memory {rep + 1}"
            with self.observed(label):
                result = await procs.memory(self.dsn, self.settings)
            peaks.append(result.peak_rss_kb / 1024)
            runs.append(result.describe())
            self.said(
                label,
                f"memory rep {rep + 1}: peak RSS {peaks[-1]:.1f} MB "
                f"with {result.suspended:,} suspended runs",
            )
        self.results.add(
            Figure(
                "worker_rss_mb",
                f"worker peak RSS, {self.settings.memory_runs:,} suspended",
                "MB",
                median(peaks),
                peaks,
                Target("max", 150),
            )
        )
        self.results.details["memory"] = runs

    async def idle(self) -> None:
        rates: list[float] = []
        runs: list[dict[str, Any]] = []
        for rep in self.reps():
            label = f"idle {rep + 1}"
            with self.observed(label):
                result = await procs.idle(self.dsn, self.settings)
            rates.append(result.round_trips_per_s)
            runs.append(result.describe())
            self.said(label, f"idle rep {rep + 1}: {result.round_trips_per_s:.2f} queries/s")
        self.results.add(
            Figure(
                "idle_queries_per_s",
                f"idle worker, {self.settings.idle_sagas} sagas",
                "queries/s",
                median(rates),
                rates,
            )
        )
        self.results.details["idle"] = runs

    async def roundtrips(self) -> None:
        counted = await accounting.all_shapes(self.dsn, self.settings)
        for result in counted:
            per_hierarchy = result.window.total_round_trips / result.hierarchies
            self.say(
                f"round trips, {result.shape}: {result.per_step:.2f} per step, "
                f"{per_hierarchy:.1f} per hierarchy"
            )
            self.results.details[f"round_trips_{result.shape}"] = result.describe()
        flat, fan, pair, one_step = counted
        self.results.add(
            Figure("round_trips_per_step", "SQL round trips per flat step", "", flat.per_step)
        )
        self.results.add(
            Figure("fanout_round_trips_per_step", "... per fan-out step", "", fan.per_step)
        )
        self.results.add(
            Figure(
                "pair_round_trips_per_hierarchy",
                "... per parent+child, launch and wait included",
                "",
                pair.window.total_round_trips / pair.hierarchies,
            )
        )
        self.results.add(
            Figure(
                "one_step_round_trips_per_run",
                "... per one-step root (the job-queue comparison's)",
                "",
                one_step.per_step,
            )
        )

    async def history(self) -> None:
        s = self.settings
        shape = workloads.FLAT
        async with fresh_schema(self.dsn, "history") as schema:
            # The template is a real hierarchy of the measured saga, run by the engine.
            async with workloads.session(
                self.dsn, schema, s, shape.subscriptions(s.concurrency)
            ) as session:
                await workloads.backlog(session, shape.topic, shape.root_saga, 1, 1, 2)
                template = session.hierarchies[0]
            self.say(f"history: loading {s.history_runs:,} finished runs")
            loaded = await history.load(self.dsn, schema, template, s.history_runs)
            # The load's dirty pages would otherwise be written back during the timed runs
            # (meaningful for the embedded server on this host; harmless for a remote one).
            await anyio.to_thread.run_sync(os.sync)
            self.say(
                f"history: loaded {loaded.runs:,} runs, {loaded.events:,} events "
                f"({loaded.bytes / 2**30:.2f} GiB) in {loaded.seconds:.1f} s"
            )
            empty: list[float] = []
            full: list[float] = []
            ratios: list[float] = []
            for rep in self.reps():
                order = [False, True] if rep % 2 == 0 else [True, False]
                measured: dict[bool, float] = {}
                for loaded_schema in order:
                    label = f"{'history' if loaded_schema else 'empty'} {rep + 1}"
                    with self.observed(label):
                        timed = await workloads.throughput(
                            self.dsn,
                            s,
                            shape,
                            s.flat_roots,
                            schema=schema if loaded_schema else None,
                        )
                    measured[loaded_schema] = timed.steps_per_s
                    self.said(label, f"flat on {label}: {timed.steps_per_s:,.0f} steps/s")
                empty.append(measured[False])
                full.append(measured[True])
                ratios.append(measured[True] / measured[False])
        r = self.results
        r.add(
            Figure(
                "history_steps_per_s",
                f"flat with {s.history_runs:,} runs of history",
                "steps/s",
                median(full),
                full,
            )
        )
        r.add(
            Figure(
                "history_ratio",
                "history / empty tables",
                "ratio",
                median(ratios),
                ratios,
                Target("min", 0.8),
                note=f"baseline {median(empty):,.0f} steps/s",
            )
        )
        r.details["history"] = {
            "runs_loaded": loaded.runs,
            "events_loaded": loaded.events,
            "load_seconds": loaded.seconds,
            "table_bytes": loaded.bytes,
            "empty_steps_per_s": empty,
            "history_steps_per_s": full,
        }
