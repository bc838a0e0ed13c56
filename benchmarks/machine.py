"""How much of the machine was not ours while a workload ran.

On a shared host every figure is only as good as the quiet around it, so each workload
records the CPU time that processes outside the benchmark used meanwhile: the
machine's busy time (/proc/stat) minus that of the harness's process tree and of the
PostgreSQL server's (found from a backend's parent, when the server is local). Times
of children that exited are in their parents' cutime/cstime, so nothing is lost.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

_TICK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, int] | None:
    """(ppid, utime+stime+cutime+cstime in ticks) of a process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), sum(int(x) for x in fields[11:15])


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of one process (all its threads, not its children).

    For this process the same figure comes at nanosecond resolution (CLOCK_PROCESS_CPUTIME_ID)
    rather than in clock ticks (10 ms): a peer drains its jobs in well under a second.
    """
    if pid == os.getpid():
        return time.process_time()
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def _machine() -> tuple[int, int, int]:
    """(busy, steal, total) ticks over all CPUs."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = values[:8]
    busy = user + nice + system + irq + softirq
    return busy, steal, busy + idle + iowait + steal


def postmaster_of(backend_pid: int) -> int | None:
    """The local postmaster's pid, from one of its backends' (None if not on this host)."""
    found = _stat(backend_pid)
    if found is None:
        return None
    try:
        name = Path(f"/proc/{found[0]}/comm").read_text().strip()
    except OSError:
        return None
    return found[0] if name.startswith("postgres") else None


@dataclass(frozen=True, slots=True)
class Sample:
    busy: int
    steal: int
    total: int
    ours: int


class CpuMeter:
    def __init__(self, roots: list[int]) -> None:
        self.roots = roots

    def _ours(self) -> int:
        parents: dict[int, int] = {}
        ticks: dict[int, int] = {}
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                found = _stat(int(entry.name))
                if found is not None:
                    parents[int(entry.name)], ticks[int(entry.name)] = found
        children: dict[int, list[int]] = {}
        for pid, ppid in parents.items():
            children.setdefault(ppid, []).append(pid)
        total = 0
        stack = [root for root in self.roots if root in ticks]
        seen: set[int] = set()
        while stack:
            pid = stack.pop()
            if pid in seen:
                continue
            seen.add(pid)
            total += ticks[pid]
            stack.extend(children.get(pid, []))
        return total

    @staticmethod
    def ticks_per_second() -> int:
        return _TICK

    def sample(self) -> Sample:
        busy, steal, total = _machine()
        return Sample(busy, steal, total, self._ours())

    @staticmethod
    def foreign(start: Sample, end: Sample) -> dict[str, float]:
        """Shares of the machine's capacity (all CPUs) over the interval."""
        total = max(1, end.total - start.total)
        others = max(0, (end.busy - start.busy) - (end.ours - start.ours))
        return {
            "others_share": others / total,
            "ours_share": (end.ours - start.ours) / total,
            "steal_share": (end.steal - start.steal) / total,
            "seconds": total / _TICK / (os.cpu_count() or 1),
        }
