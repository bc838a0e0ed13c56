"""The connections of one Cooperation: its pool, its LISTEN connection, and what it knows
about their backends.

Two sets of backend pids are kept here and read by the worker:
- `own`: backends of this pool. Notifications they sent announce what this process has
  already woken itself for, so the listener skips them.
- `dirty`: backends whose session user code used (a step's `scope.connection`). Only those
  get asyncpg's full session reset when they return to the pool; scoopy's own statements
  leave no session state behind.
"""

from __future__ import annotations

import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeAlias

import anyio
import asyncpg
import structlog

from ..errors import DatabaseUnavailableError, ScoopyError
from ..postgres import embedded_dsn
from .faults import connection_lost, gone

if TYPE_CHECKING:
    Pooled: TypeAlias = asyncpg.pool.PoolConnectionProxy[asyncpg.Record]

log = structlog.get_logger("scoopy")

# Generic plans: scoopy's statements are index lookups whose plan never depends on the
# parameters, and planning them cost more than running them.
SERVER_SETTINGS = {
    "jit": "off",
    "plan_cache_mode": "force_generic_plan",
    "application_name": "scoopy",
}


def resolve_dsn(dsn: str | None) -> str | None:
    """`dsn`, else `$SCOOPY_DSN`; None means the embedded server."""
    return dsn or os.environ.get("SCOOPY_DSN") or None


def redact(dsn: str) -> str:
    """The DSN without its password, for messages."""
    if "@" in dsn and "://" in dsn:
        scheme, rest = dsn.split("://", 1)
        credentials, host = rest.rsplit("@", 1)
        user = credentials.split(":", 1)[0]
        return f"{scheme}://{user}:***@{host}"
    return dsn


class Outage:
    """Says once that the database went away and once that it is back.

    Every task that touches the database reports trouble here, so an outage costs one
    warning, not one per step, poll and saga; in between, retries log at debug level.
    """

    def __init__(self) -> None:
        self.since: float | None = None
        self.failures = 0

    @property
    def down(self) -> bool:
        return self.since is not None

    def lost(self, where: str, exc: BaseException) -> None:
        self.failures += 1
        if self.since is None:
            self.since = time.monotonic()
            log.warning(
                "lost the database; retrying until it is back", where=where, error=repr(exc)
            )
        else:
            log.debug("database still unavailable", where=where, error=repr(exc))

    def back(self) -> None:
        if self.since is not None:
            log.warning(
                "database is back",
                after_s=round(time.monotonic() - self.since, 3),
                failed_attempts=self.failures,
            )
            self.since = None
            self.failures = 0


class Database:
    """A pool of `pool_size` connections to one server, and LISTEN connections on demand."""

    def __init__(
        self,
        *,
        pool_size: int,
        connect_timeout: float,
        server_settings: dict[str, str],
    ) -> None:
        self.pool_size = pool_size
        self.connect_timeout = connect_timeout
        self.server_settings = server_settings
        self.own: set[int] = set()
        self.dirty: set[int] = set()
        self.outage = Outage()
        self.dsn: str | None = None
        self._pool: asyncpg.Pool[asyncpg.Record] | None = None

    async def open(self, dsn: str | None, data_dir: Path | None) -> None:
        """Connect to `dsn` (else `$SCOOPY_DSN`, else the embedded server in `data_dir`)."""
        resolved = resolve_dsn(dsn) or await self._embedded(data_dir)
        self.dsn = resolved
        try:
            pool = await asyncpg.create_pool(
                resolved,
                init=self._remember_backend,
                reset=self._reset_if_used,
                min_size=1,
                max_size=self.pool_size,
                timeout=self.connect_timeout,
                server_settings=self.server_settings,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
            raise DatabaseUnavailableError(
                f"could not connect to PostgreSQL at {redact(resolved)}: {exc}"
            ) from exc
        assert pool is not None
        self._pool = pool

    @staticmethod
    async def _embedded(data_dir: Path | None) -> str:
        return await anyio.to_thread.run_sync(embedded_dsn, data_dir)

    async def close(self) -> None:
        if self._pool is not None:
            with anyio.CancelScope(shield=True):
                await self._pool.close()

    @property
    def pool(self) -> asyncpg.Pool[asyncpg.Record]:
        if self._pool is None:
            raise ScoopyError("the Cooperation is not started: use `async with Cooperation(...)`")
        return self._pool

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[Pooled]:
        """A pooled connection for one request of the API; a lost database is reported as
        `DatabaseUnavailableError`, not as the driver's exception."""
        try:
            async with self.pool.acquire() as conn:
                try:
                    yield conn
                except Exception as exc:
                    # A connection lost in the middle of a call may surface as the driver's
                    # internal-state error rather than as a connection error.
                    if not isinstance(exc, DatabaseUnavailableError) and gone(conn):
                        raise ConnectionResetError(repr(exc)) from exc
                    raise
        except DatabaseUnavailableError:
            raise
        except Exception as exc:
            if not connection_lost(exc):
                raise
            where = redact(self.dsn) if self.dsn else "PostgreSQL"
            raise DatabaseUnavailableError(f"lost the connection to {where}: {exc!r}") from exc

    async def connect_listener(self) -> asyncpg.Connection[asyncpg.Record]:
        """A connection of its own for LISTEN (a pooled one would be reset and reused)."""
        assert self.dsn is not None
        return await asyncpg.connect(
            self.dsn,
            timeout=self.connect_timeout,
            server_settings={"application_name": "scoopy-listen"},
        )

    async def _remember_backend(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        pid = conn.get_server_pid()
        self.own.add(pid)
        conn.add_termination_listener(lambda _conn: self.own.discard(pid))

    async def _reset_if_used(self, conn: asyncpg.Connection[asyncpg.Record]) -> None:
        pid = conn.get_server_pid()
        if pid in self.dirty:
            self.dirty.discard(pid)
            await conn.execute(conn.get_reset_query())
