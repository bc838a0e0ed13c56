"""Test fixtures: a real PostgreSQL (embedded unless SCOOPY_TEST_DSN), one schema per test."""

from __future__ import annotations

import logging
import os
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import asyncpg
import pytest
import structlog

from scoopy import Cooperation
from scoopy.postgres import embedded_dsn

pytest_plugins = ["tests.infra.fixtures"]

structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


@pytest.fixture(scope="session")
def dsn() -> str:
    return os.environ.get("SCOOPY_TEST_DSN") or embedded_dsn()


@pytest.fixture
async def schema(dsn: str) -> AsyncIterator[str]:
    """A fresh schema for this test, dropped afterwards."""
    name = "t_" + uuid.uuid4().hex[:20]
    yield name
    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        await conn.close()


@pytest.fixture
async def db(dsn: str, schema: str) -> AsyncIterator[asyncpg.Connection[asyncpg.Record]]:
    """A plain connection whose search_path is the test schema (for business tables)."""
    conn = await asyncpg.connect(dsn)
    await conn.execute(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
    await conn.execute(f'SET search_path TO "{schema}"')
    try:
        yield conn
    finally:
        await conn.close()


@pytest.fixture
def make_coop(dsn: str, schema: str) -> Callable[..., Cooperation]:
    """Build a Cooperation on the test schema (start it with `async with`)."""

    def make(**options: Any) -> Cooperation:
        options.setdefault("shutdown_grace", 5.0)
        return Cooperation(dsn, schema=schema, **options)

    return make
