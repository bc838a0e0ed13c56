"""Every statement scoopy runs, as methods that take a connection and return records.

The SQL text lives in `engine/sql/*.sql` (see `queries`); no value is ever spliced into it.
No `asyncpg.Record` leaves this module: each method returns plain values or the records of
`engine/records.py` and `scoopy/results.py`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any, TypeVar

import asyncpg
import msgspec

from ..errors import check_schema
from ..failure import CooperationFailure
from ..message import NewMessage
from ..results import Event, RunInfo
from ..vocab import Connection
from . import queries
from .records import (
    ChildFailure,
    Claimed,
    Committed,
    RunEnding,
    RunWrite,
    UndoCandidate,
    from_row,
)

_events = msgspec.json.Encoder()


_decode = msgspec.json.decode
R = TypeVar("R")


def _built(kind: Callable[..., R], row: asyncpg.Record, **decoded: Any) -> R:
    """A public record from a row whose columns are its fields (JSON ones decoded)."""
    return kind(
        **{**row, "lineage": list(row["lineage"]), "failure": _failure(row["failure"]), **decoded}
    )


def _failure(data: str | None) -> CooperationFailure | None:
    return None if data is None else CooperationFailure.from_json(data)


class Store:
    """The statements of one scoopy schema."""

    def __init__(self, schema: str) -> None:
        self.schema = check_schema(schema)
        self.sql = queries.statements(schema)
        self.channel = f"scoopy_{schema}"
        self.lock_key = f"scoopy:{schema}"
        self.versions_table = f'"{schema}".schema_version'

    # -- schema ----------------------------------------------------------------------------

    async def applied_versions(self, conn: Connection) -> list[int] | None:
        """Applied migration versions, or None when the schema was never migrated."""
        if not await conn.fetchval(self.sql["versions_exist"], self.versions_table):
            return None
        return [row[0] for row in await conn.fetch(self.sql["versions"])]

    async def apply_migrations(
        self, conn: Connection, migrations: Sequence[tuple[int, str, str]]
    ) -> list[int]:
        """Apply the migrations not yet applied, under an advisory lock; return their versions."""
        await conn.execute(self.sql["lock"], self.lock_key)
        try:
            await conn.execute(self.sql["create_schema"])
            await conn.execute(self.sql["create_versions"])
            done = set(await self.applied_versions(conn) or [])
            applied: list[int] = []
            for version, name, sql in migrations:
                if version in done:
                    continue
                async with conn.transaction():
                    await conn.execute(self.sql["search_path"])
                    await conn.execute(sql)
                    await conn.execute(self.sql["record_version"], version, name)
                applied.append(version)
            return applied
        finally:
            await conn.execute(self.sql["unlock"], self.lock_key)

    async def drop_schema(self, conn: Connection) -> None:
        await conn.execute(self.sql["drop_schema"])

    # -- claiming and running --------------------------------------------------------------

    async def claim(
        self,
        conn: Connection,
        saga: str,
        count_up_to: int,
        accepted: Sequence[str],
        starts_new: bool,
        by_priority: bool = False,
    ) -> Claimed | None:
        """Lock the oldest ready run of `saga` whose prefix is `accepted` (or, with
        `starts_new`, that has not started); also count ready runs, up to `count_up_to`.

        `by_priority` takes the highest-priority such run instead (None if none has one).
        """
        sql = self.sql["claim_priority"] if by_priority else self.sql["claim"]
        row = await conn.fetchrow(sql, saga, count_up_to, accepted, starts_new)
        return None if row is None else from_row(Claimed, row, sql)

    async def plan_claim(self, conn: Connection) -> None:
        """Have this connection plan `claim` as an index walk (see `plan_by_index` in claim.sql)."""
        await conn.execute(self.sql["plan_by_index"])
        try:
            await conn.fetchrow(self.sql["claim"], "", 0, [], True)  # no saga has an empty name
        finally:
            await conn.execute(self.sql["plan_reset"])

    async def reclaim(
        self, conn: Connection, run_id: uuid.UUID, unless_paused: bool = False
    ) -> Claimed | None:
        """Lock one run by id, waiting for whoever holds it; None if it is gone (or, with
        `unless_paused`, if its saga is paused)."""
        sql = self.sql["reclaim_unpaused"] if unless_paused else self.sql["reclaim"]
        row = await conn.fetchrow(sql, run_id, 1)
        return None if row is None else from_row(Claimed, row, sql)

    async def emit(
        self, conn: Connection, messages: Sequence[NewMessage], emitter: Claimed
    ) -> tuple[set[uuid.UUID], list[tuple[uuid.UUID, str]]]:
        """Insert messages and one run per subscribed saga.

        Returns the ids of the messages inserted (a message whose key exists already is
        not) and a (message id, saga) pair per run created.
        """
        rows = await conn.fetch(
            self.sql["emit"],
            [m.id for m in messages],
            # A scoped message belongs to its emitter's hierarchy, whatever the scope said.
            [emitter.root_id if m.scoped else m.root_id for m in messages],
            [m.topic for m in messages],
            [m.payload for m in messages],
            [m.context for m in messages],
            [emitter.id if m.scoped else None for m in messages],
            [m.instance for m in messages],
            emitter.lineage,
            [m.key for m in messages],
            [m.priority for m in messages],
        )
        inserted = {row[0] for row in rows if row[1] is None}
        return inserted, [(row[0], row[1]) for row in rows if row[1] is not None]

    async def finish(
        self, conn: Connection, write: RunWrite, worker: str, listen: bool
    ) -> tuple[str | None, int | None, bool]:
        """Write the run's events and new state; return the parent's saga and pending count,
        and whether the run (or an ancestor) is cancelled as of now.

        Every event belongs to this run, or (run_id None) starts a hierarchy of its own.
        """
        ev = write.events
        assert all(e.run_id in (write.run_id, None) for e in ev)
        args = (
            write.run_id,
            write.status,
            write.state,
            write.pending,
            write.reset_failed,
            write.ready_at,
            write.resume_at,
            write.deadline_at,
            write.context,
            write.failure,
            write.rollback_failure,
            write.result,
            write.terminal,
            write.sleeping,
            _events.encode(ev).decode(),
            write.lineage,
            worker,
            write.definition,
            write.prefix,
        )
        notify = write.notify if listen else []
        if write.notify_parent:
            row = await conn.fetchrow(
                self.sql["finish_parent"],
                *args,
                write.parent_id,
                write.parent_failed,
                self.channel,
                notify,
                listen,
            )
        elif notify:
            row = await conn.fetchrow(self.sql["finish_notify"], *args, self.channel, notify)
        else:
            row = await conn.fetchrow(self.sql["finish"], *args)
        if row is None:
            raise RuntimeError(f"run {write.run_id} vanished while it was locked")
        return row["parent_saga"], row["parent_pending"], row["cancelled"]

    async def defer(self, conn: Connection, run_id: uuid.UUID, seconds: float) -> None:
        await conn.execute(self.sql["defer"], run_id, seconds)

    async def child_failures(
        self, conn: Connection, parent_id: uuid.UUID, wait: int
    ) -> list[ChildFailure]:
        rows = await conn.fetch(self.sql["child_failures"], parent_id, wait)
        return [from_row(ChildFailure, row, self.sql["child_failures"]) for row in rows]

    async def history(
        self, conn: Connection, root_id: uuid.UUID, run_id: uuid.UUID
    ) -> list[Committed]:
        """The run's committed step and handler instances, oldest first."""
        rows = await conn.fetch(self.sql["history"], root_id, run_id)
        return [from_row(Committed, row, self.sql["history"]) for row in rows]

    async def rollback_children(
        self,
        conn: Connection,
        parent_id: uuid.UUID,
        instance: int,
        wait: int,
        request: str,
        contexts: dict[uuid.UUID, str | None],
    ) -> tuple[list[uuid.UUID], list[str]]:
        """Ask the committed children of one step instance (from `committed_children`) to
        roll back, each with the context given for it.

        Returns the messages that instance emitted and the sagas of the children asked.
        """
        rows = await conn.fetch(
            self.sql["rollback_children"],
            parent_id,
            instance,
            request,
            wait,
            list(contexts),
            list(contexts.values()),
        )
        messages = sorted(row["message_id"] for row in rows if row["kind"] == "message")
        sagas = [row["saga"] for row in rows if row["kind"] == "run"]
        return messages, sagas

    async def committed_children(
        self, conn: Connection, parent_id: uuid.UUID, instance: int
    ) -> list[tuple[uuid.UUID, str | None]]:
        """Lock the committed children of one step instance; (id, context) of each."""
        rows = await conn.fetch(self.sql["committed_children"], parent_id, instance)
        return [(row["id"], row["context"]) for row in rows]

    async def skip_unstarted(self, conn: Connection, parent_id: uuid.UUID) -> int:
        return int(await conn.fetchval(self.sql["skip_unstarted"], parent_id))

    # -- launching, inspecting, controlling ------------------------------------------------

    async def launch(
        self,
        conn: Connection,
        message: NewMessage,
        worker: str,
        listen: bool,
        *,
        at: datetime | None = None,
        after: float | None = None,
        allow_unhandled: bool = False,
    ) -> tuple[uuid.UUID, list[str]] | None:
        """Insert a root message and its runs; return its id and the sagas that got a run.

        With a key that exists already nothing is inserted and the existing id is returned.
        None: no saga subscribes to the topic (and `allow_unhandled` is false): nothing was
        inserted.
        """
        row = await conn.fetchrow(
            self.sql["launch"],
            message.id,
            message.topic,
            message.payload,
            message.context,
            worker,
            self.channel,
            listen,
            message.key,
            at,
            after,
            message.priority,
            allow_unhandled,
        )
        assert row is not None
        if not row["inserted"]:
            existing = row["existing"]
            if existing is None and not row["handled"]:
                return None
            if existing is None:  # the other launch with this key has not committed yet
                existing = await conn.fetchval(self.sql["message_by_key"], message.key)
            return existing, []
        return message.id, list(row["sagas"])

    async def root_runs(self, conn: Connection, root_id: uuid.UUID) -> list[RunEnding]:
        rows = await conn.fetch(self.sql["root_runs"], root_id)
        return [from_row(RunEnding, row, self.sql["root_runs"]) for row in rows]

    async def cancellation_of(
        self, conn: Connection, lineage: Sequence[uuid.UUID]
    ) -> tuple[str | None, datetime]:
        row = await conn.fetchrow(self.sql["cancellation_of"], list(lineage))
        assert row is not None
        return row[0], row[1]

    async def topic_of(self, conn: Connection, message_id: uuid.UUID) -> str:
        return str(await conn.fetchval(self.sql["topic_of"], message_id) or "")

    async def run_by_id(self, conn: Connection, run_id: uuid.UUID) -> RunEnding | None:
        row = await conn.fetchrow(self.sql["run_by_id"], run_id)
        return None if row is None else from_row(RunEnding, row, self.sql["run_by_id"])

    async def message_exists(self, conn: Connection, message_id: uuid.UUID) -> bool:
        return bool(await conn.fetchval(self.sql["message_exists"], message_id))

    async def events(self, conn: Connection, root_id: uuid.UUID) -> list[Event]:
        rows = await conn.fetch(self.sql["events"], root_id)
        return [
            _built(Event, row, context=None if row["context"] is None else _decode(row["context"]))
            for row in rows
        ]

    async def runs_of(self, conn: Connection, root_id: uuid.UUID) -> list[RunInfo]:
        """Every run of a hierarchy, oldest first."""
        rows = await conn.fetch(self.sql["runs_of"], root_id)
        return [
            _built(RunInfo, row, rollback_failure=_failure(row["rollback_failure"])) for row in rows
        ]

    async def poll(
        self, conn: Connection, sagas: Sequence[str]
    ) -> tuple[list[tuple[str, datetime | None]], datetime | None]:
        rows = await conn.fetch(self.sql["poll"], list(sagas))
        now = rows[0]["now"] if rows else None
        return [(row["saga"], row["ready_at"]) for row in rows], now

    async def subscribe(self, conn: Connection, pairs: Sequence[tuple[str, str]]) -> None:
        await conn.execute(
            self.sql["subscribe"], [topic for topic, _ in pairs], [saga for _, saga in pairs]
        )

    async def unsubscribe(
        self, conn: Connection, topic: str, saga: str, listen: bool
    ) -> tuple[int, list[str]]:
        """Remove a subscription and skip that saga's runs on `topic` that have not started.

        Returns how many runs were skipped and the sagas of parents that became ready.
        """
        await conn.execute(self.sql["lock_registry"])  # waits out steps emitting right now
        row = await conn.fetchrow(self.sql["unsubscribe"], topic, saga, self.channel, listen)
        assert row is not None
        return int(row["skipped"]), list(row["ready"])

    async def pause(self, conn: Connection, saga: str, reason: str | None) -> None:
        await conn.execute(self.sql["pause"], saga, reason)

    async def resume(self, conn: Connection, saga: str, listen: bool) -> None:
        await conn.execute(self.sql["resume"], saga, self.channel, listen)

    async def paused(self, conn: Connection) -> list[str]:
        return [row[0] for row in await conn.fetch(self.sql["paused"])]

    async def message_by_key(self, conn: Connection, key: str) -> uuid.UUID | None:
        value = await conn.fetchval(self.sql["message_by_key"], key)
        return None if value is None else uuid.UUID(str(value))

    async def now(self, conn: Connection) -> datetime:
        value: datetime = await conn.fetchval(self.sql["now"])
        return value

    async def lock(self, conn: Connection, name: str) -> None:
        """Serialize with other transactions taking the same named lock (until commit)."""
        await conn.execute(self.sql["lock_xact"], f"{self.schema}:{name}")

    async def schedule_links(self, conn: Connection, saga: str) -> list[str]:
        """Payloads (JSON) of the schedule chain links still waiting or running."""
        return [row[0] for row in await conn.fetch(self.sql["schedules"], saga)]

    async def active_chains(
        self, conn: Connection, saga: str, key: str, prefix: str
    ) -> list[uuid.UUID]:
        """Root ids of a schedule's chain links that are still waiting or running."""
        return [row[0] for row in await conn.fetch(self.sql["active_chains"], saga, key, prefix)]

    async def child_results(
        self, conn: Connection, parent_id: uuid.UUID, instance: int
    ) -> list[tuple[str, str, str]]:
        """(saga, result JSON, topic) of the committed children of a step instance and of the
        child-failure handler instances that followed it (a retry's children count too)."""
        rows = await conn.fetch(self.sql["child_results"], parent_id, instance)
        return [(row[0], row[1], row[2]) for row in rows]

    async def saga_in_lineage(
        self, conn: Connection, lineage: Sequence[uuid.UUID], saga: str
    ) -> int:
        return int(await conn.fetchval(self.sql["saga_in_lineage"], list(lineage), saga))

    async def detach_unstarted(self, conn: Connection, parent_id: uuid.UUID) -> int:
        return int(await conn.fetchval(self.sql["detach_unstarted"], parent_id))

    async def subscriptions(self, conn: Connection) -> list[tuple[str, str]]:
        return [(row[0], row[1]) for row in await conn.fetch(self.sql["subscriptions"])]

    async def find_root(
        self, conn: Connection, target: uuid.UUID
    ) -> tuple[uuid.UUID, list[uuid.UUID]] | None:
        row = await conn.fetchrow(self.sql["find_root"], target)
        return None if row is None else (row[0], list(row[1]))

    async def cancel(
        self,
        conn: Connection,
        target: uuid.UUID,
        root_id: uuid.UUID,
        lineage: Sequence[uuid.UUID],
        failure: str,
        worker: str,
        listen: bool,
    ) -> bool:
        """Record a cancellation request, then wake the waiting runs it concerns.

        The request commits first, so a step polling `give_up_if_needed` sees it at once.
        Runs in the middle of a long step are not waited for: they see the request when
        they finish (see `sql_finish`).
        """
        async with conn.transaction():
            row = await conn.fetchrow(
                self.sql["cancel"], target, root_id, failure, list(lineage), worker
            )
            assert row is not None
        args = (target, root_id, self.channel, listen)
        try:
            async with conn.transaction():
                await conn.execute(self.sql["lock_timeout"])
                await conn.execute(self.sql["wake_cancelled"], *args)
        except asyncpg.exceptions.LockNotAvailableError:
            async with conn.transaction():
                await conn.execute(self.sql["wake_cancelled_unlocked"], *args)
        return bool(row["inserted"])

    async def move(
        self,
        conn: Connection,
        run_id: uuid.UUID,
        to_step: str | None,
        worker: str,
        listen: bool,
    ) -> str | None:
        """Release a held run to go on (at `to_step`, by name); its saga, or None if it was
        not held."""
        row = await conn.fetchrow(self.sql["move"], run_id, to_step, worker, self.channel, listen)
        assert row is not None
        return None if row["saga"] is None else str(row["saga"])

    async def undo_candidates(
        self, conn: Connection, root_id: uuid.UUID, target: uuid.UUID
    ) -> list[UndoCandidate]:
        rows = await conn.fetch(self.sql["undo_candidates"], root_id, target)
        return [from_row(UndoCandidate, row, self.sql["undo_candidates"]) for row in rows]

    async def unfinished(self, conn: Connection, root_id: uuid.UUID) -> int:
        return int(await conn.fetchval(self.sql["unfinished_in_root"], root_id))

    async def undo(
        self,
        conn: Connection,
        run_ids: Sequence[uuid.UUID],
        request: str,
        failure: str,
        worker: str,
        listen: bool,
    ) -> int:
        row = await conn.fetchrow(
            self.sql["undo"], list(run_ids), request, failure, worker, self.channel, listen
        )
        assert row is not None
        return int(row["updated"])
