"""A PostgreSQL wire-protocol relay that counts round trips, for exact query accounting.

Clients (an in-process `Cooperation`, or a worker subprocess) connect to a unix socket
in a private directory; every byte is relayed unchanged to the real server. The relay
parses the message framing on the side: each ReadyForQuery ('Z') the server sends ends
exactly one round trip, and it is credited to the statement the client sent in that
batch (a simple Query's text, or the statement a Bind executes; a batch with a Parse but
no Bind is asyncpg preparing a statement). Nothing in the engine is hooked or patched,
and asyncpg's own traffic (pool resets, type introspection) is counted too.

The relay costs latency, so only the accounting runs use it, never the timed ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import anyio

from .dsn import Address, via_socket_dir

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_RELAY_PORT = 5432


def normalise(sql: str) -> str:
    return " ".join(sql.split())


def fallback_label(sql: str) -> str:
    text = normalise(sql)
    return text if len(text) <= 72 else text[:69] + "..."


@dataclass
class Tally:
    """What crossed the relay: round trips and statement executions, by label."""

    round_trips: Counter[str] = field(default_factory=Counter)
    executions: Counter[str] = field(default_factory=Counter)
    notifications: int = 0
    connections: int = 0

    def copy(self) -> Tally:
        return Tally(
            Counter(self.round_trips),
            Counter(self.executions),
            self.notifications,
            self.connections,
        )

    def __sub__(self, other: Tally) -> Tally:
        return Tally(
            self.round_trips - other.round_trips,
            self.executions - other.executions,
            self.notifications - other.notifications,
            self.connections - other.connections,
        )

    @property
    def total_round_trips(self) -> int:
        return sum(self.round_trips.values())


class _Connection:
    """Framing state of one relayed connection (both directions)."""

    def __init__(
        self,
        tally: Tally,
        label: Callable[[str], str],
        on_round_trip: Callable[[str], None],
    ) -> None:
        self.tally = tally
        self.label = label
        self.on_round_trip = on_round_trip
        self.client_buf = bytearray()
        self.server_buf = bytearray()
        self.client_startup = True
        self.single_byte_replies = 0
        self.opaque = False  # TLS or GSS negotiated: the bytes cannot be read any more
        self.statements: dict[bytes, str] = {}
        self.batch_parse: str | None = None
        self.batch_bind: str | None = None
        self.batches: deque[str] = deque()

    def from_client(self, data: bytes) -> None:
        if self.opaque:
            return
        buf = self.client_buf
        buf += data
        while True:
            if self.client_startup:
                if len(buf) < 8:
                    return
                (length, code) = struct.unpack_from("!ii", buf)
                if len(buf) < length:
                    return
                del buf[:length]
                if code in (_SSL_REQUEST, _GSSENC_REQUEST):
                    self.single_byte_replies += 1
                elif code != _CANCEL_REQUEST:
                    self.client_startup = False
                continue
            if len(buf) < 5:
                return
            kind = buf[0]
            (length,) = struct.unpack_from("!i", buf, 1)
            if len(buf) < 1 + length:
                return
            body = bytes(buf[5 : 1 + length])
            del buf[: 1 + length]
            self._client_message(kind, body)

    def _client_message(self, kind: int, body: bytes) -> None:
        if kind == ord("Q"):
            text = body.rstrip(b"\0").decode(errors="replace")
            label = self.label(text)
            self.tally.executions[label] += 1
            self.batches.append(label)
        elif kind == ord("P"):
            name, rest = body.split(b"\0", 1)
            text = rest.split(b"\0", 1)[0].decode(errors="replace")
            self.statements[name] = self.label(text)
            if self.batch_parse is None:
                self.batch_parse = self.statements[name]
        elif kind == ord("B"):
            _portal, rest = body.split(b"\0", 1)
            name = rest.split(b"\0", 1)[0]
            label = self.statements.get(name, "<unknown prepared statement>")
            self.tally.executions[label] += 1
            if self.batch_bind is None:
                self.batch_bind = label
        elif kind == ord("S"):
            if self.batch_bind is not None:
                self.batches.append(self.batch_bind)
            elif self.batch_parse is not None:
                self.batches.append("prepare: " + self.batch_parse)
            else:
                self.batches.append("<sync>")
            self.batch_parse = self.batch_bind = None

    def from_server(self, data: bytes) -> None:
        if self.opaque:
            return
        buf = self.server_buf
        buf += data
        while True:
            if self.single_byte_replies:
                if not buf:
                    return
                reply = buf[0]
                del buf[:1]
                self.single_byte_replies -= 1
                if reply in (ord("S"), ord("G")):
                    self.opaque = True
                    return
                continue
            if len(buf) < 5:
                return
            kind = buf[0]
            (length,) = struct.unpack_from("!i", buf, 1)
            if len(buf) < 1 + length:
                return
            del buf[: 1 + length]
            if kind == ord("Z"):
                label = self.batches.popleft() if self.batches else "<connect>"
                self.tally.round_trips[label] += 1
                self.on_round_trip(label)
            elif kind == ord("A"):
                self.tally.notifications += 1


class WireTap:
    """`async with WireTap(upstream, labels) as tap:` then connect to `tap.dsn(dsn)`."""

    def __init__(self, upstream: Address, labels: Mapping[str, str] | None = None) -> None:
        self.upstream = upstream
        self.labels = {normalise(sql): name for sql, name in (labels or {}).items()}
        self.tally = Tally()
        self.marks: list[tuple[float, Tally]] = []  # (perf_counter, tally so far) ...
        self.mark_label: str | None = None  # ... taken at each round trip of this statement
        self._changed = anyio.Event()
        self._dir: tempfile.TemporaryDirectory[str] | None = None
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    def label(self, sql: str) -> str:
        return self.labels.get(normalise(sql)) or fallback_label(sql)

    def snapshot(self) -> Tally:
        return self.tally.copy()

    def _on_round_trip(self, label: str) -> None:
        if label == self.mark_label:
            self.marks.append((time.perf_counter(), self.tally.copy()))
        self._changed.set()
        self._changed = anyio.Event()

    async def until(self, condition: Callable[[Tally], bool], timeout: float) -> None:
        """Wait until what crossed the relay satisfies `condition`."""
        with anyio.fail_after(timeout):
            while not condition(self.tally):
                await self._changed.wait()

    def dsn(self, dsn: str) -> str:
        assert self._dir is not None, "the relay is not started"
        return via_socket_dir(dsn, self._dir.name, _RELAY_PORT)

    async def __aenter__(self) -> WireTap:
        self._dir = tempfile.TemporaryDirectory(prefix="scoopy-bench-relay-")
        path = Path(self._dir.name) / f".s.PGSQL.{_RELAY_PORT}"
        self._server = await asyncio.start_unix_server(self._serve, path=str(path))
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        if self._server is not None:
            await self._server.wait_closed()
        if self._dir is not None:
            self._dir.cleanup()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if self.upstream.unix_path is not None:
            server_r, server_w = await asyncio.open_unix_connection(self.upstream.unix_path)
        else:
            server_r, server_w = await asyncio.open_connection(
                self.upstream.host, self.upstream.port
            )
        self.tally.connections += 1
        state = _Connection(self.tally, self.label, self._on_round_trip)
        self._writers |= {client_w, server_w}
        try:
            async with asyncio.TaskGroup() as tg:
                tg.create_task(_pump(client_r, server_w, state.from_client))
                tg.create_task(_pump(server_r, client_w, state.from_server))
        finally:
            self._writers -= {client_w, server_w}


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, observe: Callable[[bytes], None]
) -> None:
    try:
        while data := await reader.read(1 << 16):
            observe(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, OSError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await writer.wait_closed()
