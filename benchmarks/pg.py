"""The PostgreSQL the benchmark runs against, and the throwaway schemas and databases in it."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, TypeAlias

import anyio
import asyncpg

from scoopy.postgres import embedded_dsn

from .dsn import database, with_database
from .machine import postmaster_of

if TYPE_CHECKING:
    Conn: TypeAlias = asyncpg.Connection[asyncpg.Record]
else:
    Conn = asyncpg.Connection


async def resolve(dsn: str | None) -> str:
    """The DSN given, else the embedded server's (started if needed)."""
    if dsn:
        return dsn
    return await anyio.to_thread.run_sync(embedded_dsn)


def fresh_name(kind: str) -> str:
    return f"bench_{kind}_{secrets.token_hex(4)}"


async def connect(dsn: str) -> Conn:
    return await asyncpg.connect(
        dsn, server_settings={"application_name": "scoopy-bench", "jit": "off"}
    )


@asynccontextmanager
async def fresh_schema(dsn: str, kind: str) -> AsyncIterator[str]:
    """A schema name nobody uses; the schema (if anything created it) is dropped afterwards."""
    name = fresh_name(kind)
    try:
        yield name
    finally:
        with anyio.CancelScope(shield=True):
            conn = await connect(dsn)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
            finally:
                await conn.close()


@asynccontextmanager
async def fresh_database(dsn: str, kind: str) -> AsyncIterator[str]:
    """A new database on the same server; yields its DSN, drops it afterwards."""
    name = fresh_name(kind)
    admin = await connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield with_database(dsn, name)
        finally:
            with anyio.CancelScope(shield=True):
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


async def server_facts(dsn: str) -> dict[str, str]:
    """The server's version and the settings that bear on commit latency and caching."""
    conn = await connect(dsn)
    try:
        # Looked up while this backend is alive: its parent is the server's postmaster.
        postmaster = postmaster_of(conn.get_server_pid())
        facts = {"database": database(dsn), "postmaster_pid": str(postmaster or "")}
        for setting in (
            "server_version",
            "fsync",
            "synchronous_commit",
            "shared_buffers",
            "max_connections",
            "wal_level",
            "jit",
        ):
            facts[setting] = str(await conn.fetchval(f"SHOW {setting}"))
        return facts
    finally:
        await conn.close()


async def postmaster(dsn: str) -> int | None:
    """The server's postmaster pid, if the server runs on this host (for its CPU time)."""
    conn = await connect(dsn)
    try:
        return postmaster_of(conn.get_server_pid())
    finally:
        await conn.close()
