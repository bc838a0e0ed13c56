"""A real PgBouncer (the distribution's package) in front of a test server.

`ensure_installed()` installs the Debian package when the binary is missing (idempotent and
quiet; needs root and apt). It raises `Unavailable` when it cannot, and the fixture turns
that into a skip, or into a failure under CI (CI=true), where PgBouncer must be tested.

`Bouncer` runs one PgBouncer on 127.0.0.1 on a free port, in `pool_mode = transaction`,
in front of a server that listens on a unix socket only (the embedded one): PgBouncer is
pointed at the socket's directory. Clients authenticate as `postgres` without a password
(auth_type trust, which still requires the user to be listed in the auth file); the server
trusts its local socket. PgBouncer refuses to run as root, so as root it runs as the
embedded server's system user, who can reach the server's socket.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

CANDIDATES = ("/usr/sbin/pgbouncer", "/usr/bin/pgbouncer")


class Unavailable(Exception):
    """PgBouncer is not installed and could not be installed here."""


def find_binary() -> str | None:
    found = shutil.which("pgbouncer")
    if found:
        return found
    return next((path for path in CANDIDATES if os.access(path, os.X_OK)), None)


def _apt(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(
        ["apt-get", "-qq", "-o", "Dpkg::Use-Pty=0", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )


def ensure_installed() -> str:
    """The path of the pgbouncer binary, installing the Debian package if it is missing."""
    found = find_binary()
    if found:
        return found
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        raise Unavailable("pgbouncer is not installed, and installing it needs root and apt-get")
    # --no-install-recommends: the package only recommends a PostgreSQL client.
    install = ("install", "-y", "--no-install-recommends", "pgbouncer")
    result = _apt(*install)
    if result.returncode != 0:
        # A fresh machine has no package lists yet (or stale ones): update once and retry.
        update = _apt("update")
        result = _apt(*install) if update.returncode == 0 else update
    found = find_binary()
    if result.returncode != 0 or found is None:
        raise Unavailable(
            f"`apt-get install pgbouncer` failed ({result.returncode}): "
            f"{(result.stderr or result.stdout).strip()[-2000:]}"
        )
    return found


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Bouncer:
    """One PgBouncer process; `start()`, then connect to `dsn`; `stop()` at the end."""

    def __init__(
        self,
        binary: str,
        socket_dir: Path,
        *,
        user: str | None,
        pool_mode: str = "transaction",
        settings: dict[str, str] | None = None,
    ) -> None:
        self.binary = binary
        self.socket_dir = socket_dir
        self.user = user
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="scoopy-pgbouncer-"))
        self.dsn = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self.settings = {
            "listen_addr": "127.0.0.1",
            "listen_port": str(self.port),
            "unix_socket_dir": "",
            "auth_type": "trust",
            "auth_file": str(self.dir / "users.txt"),
            "pool_mode": pool_mode,
            "max_client_conn": "500",
            "default_pool_size": "20",
            "logfile": str(self.dir / "pgbouncer.log"),
            "pidfile": str(self.dir / "pgbouncer.pid"),
            "admin_users": "postgres",
            # Defaults of PgBouncer 1.18, spelled out because scoopy's behaviour through
            # the bouncer depends on them.
            "server_reset_query": "DISCARD ALL",
            "server_reset_query_always": "0",
            "ignore_startup_parameters": "",
            **(settings or {}),
        }
        self.process: subprocess.Popen[bytes] | None = None

    def _write_config(self) -> Path:
        lines = [
            "[databases]",
            f"postgres = host={self.socket_dir} port=5432 dbname=postgres user=postgres",
            "",
            "[pgbouncer]",
            *(f"{key} = {value}" for key, value in self.settings.items()),
        ]
        config = self.dir / "pgbouncer.ini"
        config.write_text("\n".join(lines) + "\n")
        (self.dir / "users.txt").write_text('"postgres" ""\n')
        if self.user is not None:
            entry = pwd.getpwnam(self.user)
            os.chmod(self.dir, 0o755)
            for path in (self.dir, config, self.dir / "users.txt"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        return config

    def start(self) -> None:
        config = self._write_config()
        self.process = subprocess.Popen(
            [self.binary, str(config)],
            user=self.user,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 15
        while True:  # PgBouncer says nothing when it is ready: it is once the port accepts
            if self.process.poll() is not None:
                raise RuntimeError(f"pgbouncer exited at start:\n{self.log()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"pgbouncer did not start:\n{self.log()}") from None
                time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()  # SIGTERM: PgBouncer shuts down at once
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log(self) -> str:
        try:
            return (self.dir / "pgbouncer.log").read_text(errors="replace")
        except OSError:
            return ""
