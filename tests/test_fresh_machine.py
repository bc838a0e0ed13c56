"""A fresh machine: the embedded PostgreSQL, the demo and the commands a newcomer runs first.

The embedded server is started by a program of its own (`tests/apps/embedded.py`), because
it is stopped when the last process that uses it exits, not when a `Cooperation` closes.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import pytest

from .helpers import ROOT, WAIT, eventually

# Each start of the embedded server costs seconds (initdb on the first one).
STARTUP = 120.0


def run_embedded(data_dir: Path, *args: str) -> dict[str, Any]:
    """Run tests/apps/embedded.py to completion and return the JSON it printed."""
    result = subprocess.run(
        [sys.executable, "-m", "tests.apps.embedded", str(data_dir), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=STARTUP,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    found: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    return found


async def refuses_connections(dsn: str) -> bool:
    """Whether nothing answers at `dsn` any more."""
    try:
        conn = await asyncpg.connect(dsn, timeout=5)
    except (OSError, asyncpg.PostgresError):
        return True
    await conn.close()
    return False


async def exited(pid: int) -> bool:
    """Whether process `pid` has exited (a zombie not yet reaped counts as exited)."""
    try:
        state = (await anyio.Path(f"/proc/{pid}/stat").read_text()).rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in ("Z", "X")


@pytest.mark.timeout(2 * STARTUP + 60)
async def test_embedded_postgres_starts_commits_stops_and_keeps_its_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no DSN anywhere, `Cooperation(data_dir=...)` starts a private PostgreSQL from the
    pip package and a hierarchy commits on it; when the program exits the server is stopped;
    a second program on the same data directory starts it again and finds the first
    program's hierarchy and its event log."""
    for name in ("SCOOPY_DSN", "SCOOPY_TEST_DSN", "SCOOPY_PGDATA", "SCOOPY_SCHEMA"):
        monkeypatch.delenv(name, raising=False)
    data_dir = tmp_path / "pgdata"

    first = await anyio.to_thread.run_sync(lambda: run_embedded(data_dir, "launch"))
    assert first["status"] == "committed"
    assert (data_dir / "PG_VERSION").read_text().strip() == "18"
    assert [(saga, step) for kind, saga, step in first["events"] if kind == "COMMITTED"] == [
        ("stock", "take"),
        ("order", "confirm"),
    ]
    # Stopped on exit: no postmaster.pid, no postmaster process, nothing at the old DSN.
    assert not (data_dir / "postmaster.pid").exists()
    await eventually(lambda: exited(first["postmaster"]))
    assert await refuses_connections(first["dsn"])

    second = await anyio.to_thread.run_sync(lambda: run_embedded(data_dir, "read", first["root"]))
    assert second["postmaster"] != first["postmaster"]  # a new server on the kept data
    assert second["root"] == first["root"]
    assert second["status"] == "committed"
    assert second["events"] == first["events"]
    assert not (data_dir / "postmaster.pid").exists()
    await eventually(lambda: exited(second["postmaster"]))
    assert await refuses_connections(second["dsn"])


def test_the_demo_prints_the_three_level_fan_out_in_order(dsn: str, schema: str) -> None:
    """What `make demo` runs (`scoopy --log-level warning demo`), pointed at the test database
    by $SCOOPY_DSN (and a schema of its own by $SCOOPY_SCHEMA, so that no other demo running
    on the same server serves its sagas): every step of a parent prints only after
    everything its previous step started has finished, the grandchild included, and the
    hierarchy commits."""
    result = subprocess.run(
        [sys.executable, "-m", "scoopy", "--log-level", "warning", "demo"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "SCOOPY_DSN": dsn, "SCOOPY_SCHEMA": schema},
        timeout=WAIT * 2,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warnings on the happy path
    out = result.stdout
    lines = out.splitlines()

    def at(text: str) -> int:
        found = [i for i, line in enumerate(lines) if text in line]
        assert len(found) == 1, (text, out)
        return found[0]

    def depth(text: str) -> int:
        """Indentation of a step's line: two spaces per level below the root."""
        line = lines[at(text)].split(" ms  ", 1)[1]
        return (len(line) - len(line.lstrip(" "))) // 2

    reserve, confirm = at("asks both warehouses"), at("order confirmed")
    warehouses = [at("warehouse-east"), at("warehouse-west")]
    charge, authorize = at("charging the card"), at("asks for a fraud check")
    score, capture = at("scores the order"), at("captures the money")
    # Step 1 fans out to both warehouses; step 2 starts after both committed.
    assert reserve < min(warehouses) and max(warehouses) < charge
    # Step 2's child starts a grandchild; the child's second step waits for it...
    assert charge < authorize < score < capture
    # ... and the parent's last step waits for the child and the grandchild.
    assert capture < confirm
    assert [depth("asks both warehouses"), depth("warehouse-east"), depth("scores the order")] == [
        0,
        1,
        2,
    ]
    assert re.search(r"^hierarchy [0-9a-f-]{36} committed in [0-9.]+ ms$", out, re.MULTILINE), out


def test_a_newcomer_needs_only_make_demo_and_make_test() -> None:
    """README's first commands are `make demo` then `make test`; CI (`.ci/run`) runs
    `make test`; the Makefile has the install, test, lint, demo and bench targets."""
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```sh\n(.*?)```", readme, re.DOTALL)
    assert first_block is not None
    commands = [line.split("#", 1)[0].strip() for line in first_block.group(1).splitlines()]
    assert [c for c in commands if c][:2] == ["make demo", "make test"]
    assert readme.index("```sh") < readme.index("```python")  # before any code

    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[0].startswith("#!")
    assert "make test" in [line.split("#", 1)[0].strip() for line in ci]

    makefile = (ROOT / "Makefile").read_text()
    targets = set(re.findall(r"^([A-Za-z][\w-]*):", makefile, re.MULTILINE))
    assert {"install", "test", "lint", "demo", "bench"} <= targets
    phony = re.search(r"^\.PHONY:(.*)$", makefile, re.MULTILINE)
    assert phony is not None
    assert {"install", "test", "lint", "demo", "bench"} <= set(phony.group(1).split())
