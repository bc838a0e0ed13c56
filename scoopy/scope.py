"""Scope: what a running step can do — launch messages, read its context, use its transaction."""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import datetime, timedelta
from typing import Any, Protocol

from .context import CooperationContext
from .errors import HierarchyTooDeepError, RecursionLimitError
from .ids import uuid7
from .message import Message, NewMessage, Topic, as_topic
from .vocab import Connection

_current: ContextVar[Scope | None] = ContextVar("scoopy_scope", default=None)


def current_scope() -> Scope:
    """The scope of the step running in this task; `LookupError` outside a step."""
    scope = _current.get()
    if scope is None:
        raise LookupError("no scoopy step is running in this task")
    return scope


@contextmanager
def in_scope(scope: Scope) -> Iterator[None]:
    """Make `scope` the current scope while user code runs (see `current_scope`)."""
    token = _current.set(scope)
    try:
        yield
    finally:
        _current.reset(token)


# Keys are ContextKeys or strings (checked when set). Mapping's key type is invariant, so
# anything narrower than Any would refuse a dict[ContextKey[Deadline], Deadline].
ContextArg = CooperationContext | Mapping[Any, Any] | None


class StepServices(Protocol):
    """What the engine lends a scope while a step runs."""

    def now(self) -> datetime: ...
    async def give_up_check(self) -> None: ...
    async def child_results(self, instance: int) -> list[tuple[str, str, str]]: ...
    async def saga_in_lineage(self) -> int: ...
    async def message_by_key(self, key: str) -> uuid.UUID | None: ...


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
        topic: Topic[Any],
        own_topics: set[str],
        max_depth: int,
        max_recursion: int,
        services: StepServices,
        handler_iteration: int | None = None,
    ) -> None:
        # Where the run is in its hierarchy: read-only (seed 004, Security: a run cannot
        # forge its position), and scoped launches take it from the engine, not from here.
        self._run_id = run_id
        self._root_id = root_id
        self._lineage = tuple(lineage)
        self._saga = saga
        self._step = step
        self._iteration = iteration
        self._attempt = attempt
        self._handler_iteration = handler_iteration
        self.context = context
        self.launches: list[NewMessage] = []
        self.resume_at: datetime | None = None  # set by sleep(); the run resumes then
        self.result: str | None = None
        self.touched = False  # whether user code reached for the connection
        self.previous_instance = 0  # the step instance whose children `child_results` reads
        # (with the children its child-failure handlers launched after it)
        self._connection = connection
        self._instance = instance
        self._topic = topic
        self._own_topics = own_topics
        self._max_depth = max_depth
        self._max_recursion = max_recursion
        self._services = services

    @property
    def run_id(self) -> uuid.UUID:
        """This run's id."""
        return self._run_id

    @property
    def root_id(self) -> uuid.UUID:
        """The id of the hierarchy: its root message."""
        return self._root_id

    @property
    def lineage(self) -> tuple[uuid.UUID, ...]:
        """The root id, then every run id from the root run down to this one."""
        return self._lineage

    @property
    def saga(self) -> str:
        return self._saga

    @property
    def step(self) -> str:
        """The step (or "Rollback of <step>") this code runs as."""
        return self._step

    @property
    def iteration(self) -> int:
        """How many times this step ran before in this run (loops: `NextStep.REPEAT`)."""
        return self._iteration

    @property
    def attempt(self) -> int:
        """1 for the first attempt of the step, then 2, 3... under a retry policy."""
        return self._attempt

    @property
    def handler_iteration(self) -> int | None:
        """In an `on_child_failure` handler, how many times it ran before for this step."""
        return self._handler_iteration

    @property
    def connection(self) -> Connection:
        """The step's own database transaction (asyncpg connection)."""
        self.touched = True
        return self._connection

    @property
    def depth(self) -> int:
        """How many runs deep this run is (a root run is 1)."""
        return len(self.lineage) - 1

    def now(self) -> datetime:
        """The database clock, as seen by this step."""
        return self._services.now()

    # -- launching -------------------------------------------------------------------------

    async def launch(
        self,
        topic: Topic[Any] | str,
        payload: Any,
        context: ContextArg = None,
        *,
        key: str | None = None,
    ) -> Message[Any]:
        """Emit a message inside this run's hierarchy; the run waits for everyone it reaches.

        The children start from this step's context as of now, with `context` on top. With
        `key`, at most one message per key is ever launched: a later launch returns the first.
        """
        resolved = as_topic(topic)
        body = resolved.encode(payload)
        existing = await self._existing(key, resolved, payload)
        if existing is not None:
            return existing
        if self.depth + 1 > self._max_depth:
            raise HierarchyTooDeepError(
                f"launching onto {resolved.name!r} from {self.saga!r} would make the hierarchy "
                f"{self.depth + 1} runs deep; the maximum is {self._max_depth}"
            )
        if resolved.name in self._own_topics:
            nested = await self._services.saga_in_lineage()
            if nested >= self._max_recursion:
                raise RecursionLimitError(
                    f"saga {self.saga!r} launches onto its own topic {resolved.name!r} from "
                    f"{nested} nested runs of itself; the limit is {self._max_recursion}"
                )
        extra = CooperationContext.coerce(context) if context is not None else None
        child_context = self.context.merged(extra)
        return self._buffer(resolved, payload, body, child_context, self.root_id, key, True)

    async def launch_global(
        self,
        topic: Topic[Any] | str,
        payload: Any,
        context: ContextArg = None,
        *,
        key: str | None = None,
    ) -> Message[Any]:
        """Start an independent hierarchy (committed with this step); nobody waits for it.

        Only `context` is passed on, not this step's context. The message's id is the new
        hierarchy's root id.
        """
        resolved = as_topic(topic)
        body = resolved.encode(payload)
        existing = await self._existing(key, resolved, payload)
        if existing is not None:
            return existing
        own = CooperationContext.coerce(context)
        return self._buffer(resolved, payload, body, own, None, key, False)

    async def _existing(
        self, key: str | None, topic: Topic[Any], payload: Any
    ) -> Message[Any] | None:
        if key is None:
            return None
        for launch in self.launches:
            if launch.key == key:
                return Message(launch.id, launch.topic, payload)
        found = await self._services.message_by_key(key)
        return None if found is None else Message(found, topic.name, payload)

    def _buffer(
        self,
        topic: Topic[Any],
        payload: Any,
        body: bytes,
        context: CooperationContext,
        root_id: uuid.UUID | None,
        key: str | None,
        scoped: bool,
    ) -> Message[Any]:
        message_id = uuid7()
        encoded = context.encode()
        self.launches.append(
            NewMessage(
                id=message_id,
                root_id=root_id or message_id,
                topic=topic.name,
                payload=body.decode(),
                context=None if encoded is None else encoded.decode(),
                instance=self._instance if scoped else None,
                key=key,
            )
        )
        return Message(message_id, topic.name, payload)

    # -- time and control ------------------------------------------------------------------

    async def give_up_if_needed(self) -> None:
        """Raise `GaveUp` now if this run was cancelled or missed a deadline."""
        await self._services.give_up_check()

    async def sleep(self, duration: timedelta | float) -> None:
        """Suspend the run after this step until `duration` has passed (survives restarts)."""
        span = duration if isinstance(duration, timedelta) else timedelta(seconds=duration)
        self.resume_at = self.now() + span

    async def sleep_until(self, when: datetime) -> None:
        """Suspend the run after this step until `when` (survives restarts)."""
        self.resume_at = when

    # -- results ---------------------------------------------------------------------------

    def set_result(self, value: Any) -> None:
        """The value this run returns to its parent (validated against the topic's result type)."""
        self.result = self._topic.encode_result(value).decode()

    async def child_results(self, topic: Topic[Any] | str | None = None) -> dict[str, list[Any]]:
        """Results of the children of this run's previous step, by saga name.

        With a typed `topic` (one with a `result` type), only children that received a
        message on that topic are included, and their results are decoded to that type.
        """
        wanted = None if topic is None else as_topic(topic)
        results: dict[str, list[Any]] = {}
        for saga, raw, topic_name in await self._services.child_results(self.previous_instance):
            if wanted is not None and topic_name != wanted.name:
                continue
            decoder = wanted or Topic(topic_name)
            results.setdefault(saga, []).append(decoder.decode_result(raw))
        return results

    async def child_result(self, saga: str, topic: Topic[Any] | str | None = None) -> Any:
        """The one result of the previous step's child run of `saga`."""
        values = (await self.child_results(topic)).get(saga, [])
        if len(values) != 1:
            raise LookupError(
                f"expected one result from a child run of {saga!r}, found {len(values)}"
            )
        return values[0]
