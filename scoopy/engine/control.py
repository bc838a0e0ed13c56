"""Operators' requests on hierarchies: cancel one that runs, undo one that committed, move a
held run on."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import msgspec

from ..errors import ScoopyError
from ..failure import CancellationRequested, RollbackRequested
from ..vocab import COMMITTED, Connection
from .records import RollbackRequest
from .store import Store


async def locate(
    store: Store, conn: Connection, target: uuid.UUID
) -> tuple[uuid.UUID, list[uuid.UUID]]:
    """The root id and lineage of a run id or a root message id; LookupError if neither."""
    found = await store.find_root(conn, target)
    if found is None:
        raise LookupError(f"no run or root message {target} in schema {store.schema!r}")
    return found


@dataclass(frozen=True, slots=True)
class Control:
    """The requests one process makes, signed with its worker id."""

    store: Store
    worker: str
    listen: bool

    async def cancel(self, conn: Connection, target: uuid.UUID, reason: str, source: str) -> bool:
        """Record a cancellation of `target`'s sub-tree; False if one was requested already."""
        failure = CancellationRequested.build(reason, source).failure
        root_id, lineage = await locate(self.store, conn, target)
        return await self.store.cancel(
            conn, target, root_id, lineage, failure.to_json().decode(), self.worker, self.listen
        )

    async def undo(
        self, conn: Connection, target: uuid.UUID, reason: str, source: str
    ) -> tuple[uuid.UUID, str]:
        """Ask the committed runs `target` addresses to roll back, in one transaction.

        Returns the root id of the hierarchy and the topic of the message undone. Refuses
        (with a `ScoopyError` naming why) a hierarchy still running, a target that started
        no runs, and runs that did not commit.
        """
        store = self.store
        failure = RollbackRequested.build(reason, source).failure
        request = msgspec.json.encode(RollbackRequest("external", failure)).decode()
        async with conn.transaction():
            root_id, _ = await locate(store, conn, target)
            candidates = await store.undo_candidates(conn, root_id, target)
            topic = await store.topic_of(conn, candidates[0].message_id) if candidates else ""
            if await store.unfinished(conn, root_id):
                raise ScoopyError(
                    f"hierarchy {root_id} is still running: cancel it instead of undoing it"
                )
            if not candidates:
                raise ScoopyError(f"{target} started no runs: there is nothing to undo")
            not_committed = [run for run in candidates if run.status != COMMITTED]
            if not_committed:
                states = ", ".join(f"{run.saga} is {run.status}" for run in not_committed)
                raise ScoopyError(f"only committed runs can be undone: {states}")
            await store.undo(
                conn,
                [run.id for run in candidates],
                request,
                failure.to_json().decode(),
                self.worker,
                self.listen,
            )
        return root_id, topic

    async def move(self, conn: Connection, target: uuid.UUID, to_step: str | None) -> str:
        """Let a held run go on under the definition its workers run now; return its saga."""
        await locate(self.store, conn, target)
        saga = await self.store.move(conn, target, to_step, self.worker, self.listen)
        if saga is None:
            raise ScoopyError(f"run {target} is not held: only a held run can be moved")
        return saga
