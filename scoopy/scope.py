"""Scope: what a running step can do — launch messages, read its context, use its transaction."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, Mapping
from contextvars import ContextVar
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

from .context import AnyKey, CooperationContext
from .errors import HierarchyTooDeepError
from .ids import uuid7
from .message import Message, Topic, as_topic

if TYPE_CHECKING:
    from .engine.store import Connection, NewMessage

_current: ContextVar[Scope | None] = ContextVar("scoopy_scope", default=None)


def current_scope() -> Scope:
    """The scope of the step running in this task; `LookupError` outside a step."""
    scope = _current.get()
    if scope is None:
        raise LookupError("no scoopy step is running in this task")
    return scope


ContextArg = CooperationContext | Mapping[AnyKey, Any] | None


class Scope:
    """Handed to every step, compensation and child-failure handler.

    Messages launched here are written in the step's transaction: they exist only if the
    step commits. `connection` is that transaction, for the step's own business writes.
    """

    def __init__(
        self,
        *,
        run_id: uuid.UUID,
        root_id: uuid.UUID,
        lineage: list[uuid.UUID],
        saga: str,
        step: str,
        iteration: int,
        attempt: int,
        instance: int,
        context: CooperationContext,
        connection: Connection,
        now: Callable[[], datetime],
        max_depth: int,
        give_up_check: Callable[[], Awaitable[None]],
    ) -> None:
        self.run_id = run_id
        self.root_id = root_id
        self.lineage = lineage
        self.saga = saga
        self.step = step
        self.iteration = iteration
        self.attempt = attempt
        self.context = context
        self._connection = connection
        self._instance = instance
        self._now = now
        self._max_depth = max_depth
        self._give_up_check = give_up_check
        self.launches: list[NewMessage] = []
        self.sleep_until: datetime | None = None
        self.touched = False  # whether user code reached for the connection

    @property
    def connection(self) -> Connection:
        """The step's own database transaction (asyncpg connection)."""
        self.touched = True
        return self._connection

    @property
    def depth(self) -> int:
        """How many runs deep this run is (a root run is 1)."""
        return len(self.lineage) - 1

    async def launch(
        self, topic: Topic[Any] | str, payload: Any, context: ContextArg = None
    ) -> Message[Any]:
        """Emit a message inside this run's hierarchy; the run waits for everyone it reaches.

        The children start from this step's context as of now, with `context` on top.
        """
        from .engine.store import NewMessage

        resolved = as_topic(topic)
        body = resolved.encode(payload)
        if self.depth + 1 > self._max_depth:
            raise HierarchyTooDeepError(
                f"launching onto {resolved.name!r} from {self.saga!r} would make the hierarchy "
                f"{self.depth + 1} runs deep; the maximum is {self._max_depth}"
            )
        extra = CooperationContext.coerce(context) if context is not None else None
        child_context = self.context.merged(extra)
        message_id = uuid7()
        self.launches.append(
            NewMessage(
                id=message_id,
                root_id=self.root_id,
                topic=resolved.name,
                payload=body.decode(),
                context=_text(child_context.encode()),
                instance=self._instance,
            )
        )
        return Message(message_id, resolved.name, payload)

    async def launch_global(
        self, topic: Topic[Any] | str, payload: Any, context: ContextArg = None
    ) -> Message[Any]:
        """Start an independent hierarchy (committed with this step); nobody waits for it.

        Only `context` is passed on, not this step's context.
        """
        from .engine.store import NewMessage

        resolved = as_topic(topic)
        body = resolved.encode(payload)
        own = CooperationContext.coerce(context)
        message_id = uuid7()
        self.launches.append(
            NewMessage(
                id=message_id,
                root_id=message_id,
                topic=resolved.name,
                payload=body.decode(),
                context=_text(own.encode()),
                instance=None,
            )
        )
        return Message(message_id, resolved.name, payload)

    async def give_up_if_needed(self) -> None:
        """Raise `GaveUp` now if this run was cancelled or missed a deadline."""
        await self._give_up_check()

    async def sleep(self, duration: timedelta | float) -> None:
        """Suspend the run after this step until `duration` has passed (survives restarts)."""
        span = duration if isinstance(duration, timedelta) else timedelta(seconds=duration)
        self.sleep_until = self._now() + span

    def now(self) -> datetime:
        """The database clock, as seen by this step."""
        return self._now()


def _text(data: bytes | None) -> str | None:
    return None if data is None else data.decode()
