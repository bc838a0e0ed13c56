"""Numbered SQL migrations: finding them and checking the database against them."""

from __future__ import annotations

import re
from pathlib import Path

from ..errors import SchemaVersionError
from ..vocab import Connection
from .store import Store

_FILE = re.compile(r"(\d+)_([A-Za-z0-9_]+)\.sql")


def migrations_dir() -> Path:
    package = Path(__file__).resolve().parent.parent
    for candidate in (package / "_migrations", package.parent / "migrations"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError("scoopy's migrations directory is missing from this installation")


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) of every migration, in order."""
    found = []
    for path in sorted(migrations_dir().iterdir()):
        match = _FILE.fullmatch(path.name)
        if match:
            found.append((int(match.group(1)), match.group(2), path.read_text()))
    versions = [version for version, _, _ in found]
    if len(set(versions)) != len(versions):
        raise SchemaVersionError(f"duplicate migration numbers in {migrations_dir()}")
    return found


def latest_version() -> int:
    return max(version for version, _, _ in migrations())


async def migrate(conn: Connection, store: Store) -> list[int]:
    """Bring the schema up to date (safe to run from many processes at once)."""
    await ensure_not_newer(conn, store)
    return await store.apply_migrations(conn, migrations())


async def ensure_not_newer(conn: Connection, store: Store) -> None:
    applied = await store.applied_versions(conn) or []
    newest = latest_version()
    if applied and max(applied) > newest:
        raise SchemaVersionError(
            f"schema {store.schema!r} is at version {max(applied)}, but this scoopy only knows "
            f"versions up to {newest}: upgrade scoopy"
        )


async def ensure_current(conn: Connection, store: Store) -> None:
    """Raise `SchemaVersionError` unless the schema is exactly at this code's version."""
    await ensure_not_newer(conn, store)
    applied = await store.applied_versions(conn)
    newest = latest_version()
    if not applied or max(applied) < newest:
        current = max(applied) if applied else "none"
        raise SchemaVersionError(
            f"schema {store.schema!r} is at version {current}, this scoopy needs {newest}: "
            "run `scoopy migrate` (or start with migrate=True)"
        )
