"""The statements of live topology: saga definitions, workers' heartbeats, held runs,
subscriptions nobody serves, and what a hierarchy waits for.

A second face of the same named statements as `Store` (engine/sql/liveness.sql and the
definitions in step.sql): kept apart so that each module holds one concern.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from datetime import datetime

import msgspec

from ..results import SubscriptionInfo
from ..vocab import Connection
from .definition import Definition, decode_steps
from .records import UnfitRun, WaitRow, from_row
from .store import Store

_json = msgspec.json.Encoder()


class TopologyStore:
    """Live-topology statements of one scoopy schema."""

    def __init__(self, store: Store) -> None:
        self.sql = store.sql
        self.store = store

    async def definition(self, conn: Connection, saga: str, fingerprint: str) -> str | None:
        """The steps (JSON) of a definition of `saga` some worker registered."""
        value = await conn.fetchval(self.sql["definition"], saga, fingerprint)
        return None if value is None else str(value)

    async def register_definitions(
        self, conn: Connection, definitions: Sequence[tuple[str, str, str]]
    ) -> None:
        """Record (saga, fingerprint, steps JSON) of the definitions this process serves."""
        await conn.execute(
            self.sql["register_definitions"],
            [saga for saga, _, _ in definitions],
            [fingerprint for _, fingerprint, _ in definitions],
            [steps for _, _, steps in definitions],
        )

    async def heartbeat(
        self, conn: Connection, worker: str, host: str, pid: int, serves: Mapping[str, object]
    ) -> None:
        """Say `worker` is alive and serves `serves` (saga -> definition, accepted prefixes)."""
        await conn.fetchrow(
            self.sql["heartbeat"], worker, host, pid, list(serves), _json.encode(serves).decode()
        )

    async def newest_versions(
        self, conn: Connection, sagas: Sequence[str], liveness: float
    ) -> dict[str, int]:
        """The highest version of each saga that a live worker serves."""
        rows = await conn.fetch(self.sql["newest_versions"], list(sagas), liveness)
        return {row["saga"]: int(row["version"] or 0) for row in rows}

    async def worker_stopped(self, conn: Connection, worker: str) -> None:
        await conn.execute(self.sql["worker_stopped"], worker)

    async def forget_workers(self, conn: Connection, older_than: float) -> None:
        await conn.execute(self.sql["forget_workers"], older_than)

    async def unfit(
        self, conn: Connection, sagas: Sequence[str], liveness: float, ready_for: float
    ) -> list[UnfitRun]:
        """Lock ready runs of `sagas`, ready for `ready_for` s, that no live worker fits."""
        rows = await conn.fetch(self.sql["unfit"], list(sagas), liveness, ready_for)
        return [from_row(UnfitRun, row, self.sql["unfit"]) for row in rows]

    async def hold(
        self,
        conn: Connection,
        runs: Sequence[uuid.UUID],
        reasons: Sequence[str],
        failures: Sequence[str],
        worker: str,
    ) -> None:
        await conn.fetchrow(self.sql["hold"], list(runs), list(reasons), list(failures), worker)

    async def release(
        self, conn: Connection, fits: Sequence[tuple[str, str]], worker: str
    ) -> list[str]:
        """Release held runs whose (saga, prefix) is in `fits`; return their sagas."""
        rows = await conn.fetch(
            self.sql["release"], [saga for saga, _ in fits], [p for _, p in fits], worker
        )
        return [row["saga"] for row in rows]

    async def unserved(
        self, conn: Connection, ready_for: float, liveness: float
    ) -> list[tuple[str, datetime]]:
        """(saga, last served) of sagas with runs waiting that no live worker serves."""
        rows = await conn.fetch(self.sql["unserved"], ready_for, liveness)
        return [(row["saga"], row["last_served"]) for row in rows]

    async def expired(self, conn: Connection, ttl: float, liveness: float) -> list[tuple[str, str]]:
        """(topic, saga) of subscriptions no live worker has served for `ttl` seconds."""
        rows = await conn.fetch(self.sql["expired"], ttl, liveness)
        return [(row["topic"], row["saga"]) for row in rows]

    async def waits(self, conn: Connection, root_id: uuid.UUID, liveness: float) -> list[WaitRow]:
        rows = await conn.fetch(self.sql["waits"], root_id, liveness)
        return [from_row(WaitRow, row, self.sql["waits"]) for row in rows]

    async def topology(self, conn: Connection, liveness: float) -> list[SubscriptionInfo]:
        rows = await conn.fetch(self.sql["topology"], liveness)
        return [
            SubscriptionInfo(
                topic=row["topic"],
                saga=row["saga"],
                workers=tuple(row["workers"]),
                last_served=row["served_at"],
                created_at=row["created_at"],
            )
            for row in rows
        ]


class KnownDefinitions:
    """Definitions of this worker's sagas that runs started under, read once each."""

    def __init__(self, store: TopologyStore) -> None:
        self.store = store
        self._known: dict[tuple[str, str], Definition] = {}

    async def get(self, conn: Connection, saga: str, fingerprint: str) -> Definition | None:
        found = self._known.get((saga, fingerprint))
        if found is None:
            steps = await self.store.definition(conn, saga, fingerprint)
            if steps is None:
                return None
            found = self._known[(saga, fingerprint)] = decode_steps(saga, steps)
        return found
