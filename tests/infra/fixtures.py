"""Fixtures for tests that break infrastructure on purpose (see tests/infra/__init__.py).

- `private_pg`: the private, restartable PostgreSQL (one per test session, running again
  after every test that stopped it), never the shared embedded server.
- `private_schema`: a fresh schema on it, dropped afterwards.
- `pgbouncer_binary`, `make_bouncer`, `pgbouncer`: a real PgBouncer in transaction mode in
  front of the private server.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import asyncpg
import pytest

from .pgbouncer import Bouncer, Unavailable, ensure_installed
from .postgres import PrivateServer


async def connect(dsn: str, schema: str | None = None) -> asyncpg.Connection[asyncpg.Record]:
    """A new plain connection (a test's own connection does not survive a restart)."""
    conn = await asyncpg.connect(dsn)
    if schema is not None:
        await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        await conn.execute(f'SET search_path TO "{schema}"')
    return conn


@pytest.fixture(scope="session")
def private_pg_server() -> Iterator[PrivateServer]:
    server = PrivateServer()
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def private_pg(private_pg_server: PrivateServer) -> Iterator[PrivateServer]:
    """The private server, running; a test may restart, stop or terminate backends of it."""
    private_pg_server.ensure_running()
    yield private_pg_server
    private_pg_server.ensure_running()


@pytest.fixture
async def private_schema(private_pg: PrivateServer) -> AsyncIterator[str]:
    name = "t_" + uuid.uuid4().hex[:20]
    yield name
    private_pg.ensure_running()
    conn = await connect(private_pg.dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="session")
def pgbouncer_binary() -> str:
    """PgBouncer's binary, installed if missing; skipped where it cannot be (failed in CI)."""
    try:
        return ensure_installed()
    except Unavailable as exc:
        if in_ci():
            pytest.fail(f"PgBouncer is required in CI: {exc}")
        pytest.skip(f"PgBouncer is not available: {exc}")


@pytest.fixture
def make_bouncer(
    pgbouncer_binary: str, private_pg: PrivateServer
) -> Iterator[Callable[..., Bouncer]]:
    """Start a PgBouncer in front of the private server (`settings` override the ini)."""
    started: list[Bouncer] = []

    def make(**settings: Any) -> Bouncer:
        bouncer = Bouncer(
            pgbouncer_binary,
            private_pg.socket_dir,
            user=private_pg.user,
            settings={key: str(value) for key, value in settings.items()},
        )
        started.append(bouncer)
        bouncer.start()
        return bouncer

    yield make
    for bouncer in started:
        bouncer.stop()


@pytest.fixture
def pgbouncer(make_bouncer: Callable[..., Bouncer]) -> Bouncer:
    """PgBouncer 1.x in `pool_mode = transaction`, its own defaults otherwise."""
    return make_bouncer()
