"""PostgreSQL DSN surgery: another database, or a relay socket in place of the server."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlsplit, urlunsplit


@dataclass(frozen=True, slots=True)
class Address:
    """Where the server listens: a unix socket file, or a TCP host and port."""

    unix_path: str | None
    host: str
    port: int


def _userinfo(netloc: str) -> str:
    return netloc.rsplit("@", 1)[0] + "@" if "@" in netloc else ""


def address(dsn: str) -> Address:
    """The server address a URL-style DSN names (`host` query parameter included)."""
    parts = urlsplit(dsn)
    query = dict(parse_qsl(parts.query))
    host = query.get("host") or parts.hostname or "localhost"
    port = int(query.get("port") or parts.port or 5432)
    if host.startswith("/"):
        return Address(f"{host}/.s.PGSQL.{port}", host, port)
    return Address(None, host, port)


def with_database(dsn: str, database: str) -> str:
    """The same server and credentials, another database."""
    parts = urlsplit(dsn)
    return urlunsplit(parts._replace(path="/" + quote(database)))


def database(dsn: str) -> str:
    return urlsplit(dsn).path.lstrip("/") or "postgres"


def via_socket_dir(dsn: str, socket_dir: str, port: int) -> str:
    """The same credentials and database, reached through a unix socket in `socket_dir`."""
    parts = urlsplit(dsn)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k not in ("host", "port")]
    query += [("host", socket_dir), ("port", str(port))]
    return urlunsplit(
        parts._replace(netloc=_userinfo(parts.netloc), query=urlencode(query, safe="/"))
    )
