"""Errors raised for bad input or configuration, before anything is written."""

from __future__ import annotations

import re


class ScoopyError(Exception):
    """Base class for scoopy's usage and configuration errors."""


class InvalidNameError(ScoopyError, ValueError):
    """A topic, saga, step or schema name is not allowed."""


class PayloadError(ScoopyError, ValueError):
    """A payload cannot be encoded as JSON or does not match its topic's type."""


class SagaDefinitionError(ScoopyError, ValueError):
    """A saga is defined in a way that cannot run (no steps, duplicate step names, ...)."""


class SchemaVersionError(ScoopyError):
    """The database schema does not match this version of scoopy."""


class DatabaseUnavailableError(ScoopyError, ConnectionError):
    """PostgreSQL could not be reached."""


class UnhandledTopicError(ScoopyError):
    """A root launch onto a topic no saga subscribes to: it would never run."""


class WaitTimeout(ScoopyError, TimeoutError):
    """A hierarchy did not finish in time; the message says what it still waits for."""


class HierarchyTooDeepError(ScoopyError):
    """A launch would nest the hierarchy deeper than the configured maximum."""


class RecursionLimitError(ScoopyError):
    """A saga launched onto its own topic from too many nested runs of itself."""


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}")
_SCHEMA = re.compile(r"[a-z_][a-z0-9_]{0,40}")


def check_name(kind: str, name: object) -> str:
    """Return `name` if it is a valid topic/saga/step name, else raise `InvalidNameError`."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InvalidNameError(
            f"invalid {kind} name {name!r}: use 1-128 letters, digits, '.', '_', '-', ':' or '/', "
            "starting with a letter or digit"
        )
    return name


def check_step_name(name: object) -> str:
    """Step names may contain spaces ("First parent step"), but not control characters."""
    if (
        not isinstance(name, str)
        or not 1 <= len(name) <= 200
        or name != name.strip()
        or not name.isprintable()
    ):
        raise InvalidNameError(
            f"invalid step name {name!r}: use 1-200 printable characters, "
            "no leading or trailing spaces"
        )
    return name


def check_schema(name: object) -> str:
    if not isinstance(name, str) or not _SCHEMA.fullmatch(name):
        raise InvalidNameError(
            f"invalid schema name {name!r}: use 1-41 lowercase letters, digits or '_', "
            "not starting with a digit"
        )
    return name


# A JSON "\u0000" escape that is not itself an escaped backslash followed by "u0000".
_NUL_ESCAPE = re.compile(rb"(?<!\\)(?:\\\\)*\\u0000")


def check_storable(data: bytes, what: str) -> bytes:
    """Return JSON `data` unless it holds a NUL character, which PostgreSQL cannot store."""
    if b"\\u0000" in data and _NUL_ESCAPE.search(data):
        raise PayloadError(
            f"{what} contains a NUL character (\\x00), which PostgreSQL cannot store"
        )
    return data
