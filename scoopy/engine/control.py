"""Operators' requests on hierarchies: cancel one that runs, undo one that committed."""

from __future__ import annotations

import uuid

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


async def cancel(
    store: Store,
    conn: Connection,
    target: uuid.UUID,
    reason: str,
    source: str,
    worker: str,
    listen: bool,
) -> bool:
    """Record a cancellation of `target`'s sub-tree; False if one was requested already."""
    failure = CancellationRequested.build(reason, source).failure
    root_id, lineage = await locate(store, conn, target)
    return await store.cancel(
        conn, target, root_id, lineage, failure.to_json().decode(), worker, listen
    )


async def undo(
    store: Store,
    conn: Connection,
    target: uuid.UUID,
    reason: str,
    source: str,
    worker: str,
    listen: bool,
) -> tuple[uuid.UUID, str]:
    """Ask the committed runs `target` addresses to roll back, in one transaction.

    Returns the root id of the hierarchy and the topic of the message undone. Refuses (with
    a `ScoopyError` naming why) a hierarchy still running, a target that started no runs,
    and runs that did not commit.
    """
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
            worker,
            listen,
        )
    return root_id, topic


async def move(
    store: Store,
    conn: Connection,
    target: uuid.UUID,
    to_step: str | None,
    worker: str,
    listen: bool,
) -> str:
    """Let a held run go on under the definition its workers run now; return its saga."""
    await locate(store, conn, target)
    saga = await store.move(conn, target, to_step, worker, listen)
    if saga is None:
        raise ScoopyError(f"run {target} is not held: only a held run can be moved")
    return saga
