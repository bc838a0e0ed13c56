"""The events one step transaction appends to the event log, kept in order until it ends.

They are written by the transaction's last statement (`Store.finish`), so the entries a
transaction wrote commit or vanish with it; the run's own entries carry its context as it
was when each transition happened.
"""

from __future__ import annotations

import uuid

import msgspec

from ..failure import CooperationFailure
from ..message import NewMessage
from .machine import EventSpec, EventType, Instance, Phase
from .records import Claimed, NewEvent


def failure_text(failure: CooperationFailure | None) -> str | None:
    return None if failure is None else failure.to_json().decode()


def text(data: bytes | None) -> str | None:
    return None if data is None else data.decode()


def _raw_failure(failure: CooperationFailure | None) -> msgspec.Raw | None:
    return None if failure is None else msgspec.Raw(failure.to_json())


class TransactionEvents:
    """The entries of one run's transaction, in the order they happened."""

    def __init__(self, run: Claimed, saga: str) -> None:
        self.run = run
        self.saga = saga
        self.rows: list[NewEvent] = []

    def transition(self, spec: EventSpec, context: bytes | None) -> None:
        """A transition of the run itself, as the machine described it."""
        self.rows.append(
            NewEvent(
                root_id=self.run.root_id,
                type=spec.type,
                message_id=self.run.message_id,
                run_id=self.run.id,
                saga=self.saga,
                step=spec.step,
                phase=spec.phase,
                step_index=spec.step_index,
                instance=spec.instance,
                iteration=spec.iteration,
                handler_iteration=spec.handler_iteration,
                failure=_raw_failure(spec.failure),
                context=None if context is None else msgspec.Raw(context),
            )
        )

    def emitted(self, launch: NewMessage, step: str) -> None:
        """A message the run's step launched: in its hierarchy, or starting one of its own."""
        self.rows.append(
            NewEvent(
                root_id=launch.root_id,
                type=EventType.EMITTED,
                message_id=launch.id,
                run_id=self.run.id if launch.scoped else None,
                saga=self.saga if launch.scoped else None,
                step=step if launch.scoped else None,
                instance=launch.instance,
                context=None if launch.context is None else msgspec.Raw(launch.context.encode()),
            )
        )

    def rollback_emitted(
        self,
        message_id: uuid.UUID,
        step: str,
        instance: int,
        failure: CooperationFailure,
        context: str | None,
    ) -> None:
        """The run asked the runs one of its messages started to roll back."""
        self.rows.append(
            NewEvent(
                root_id=self.run.root_id,
                type=EventType.ROLLBACK_EMITTED,
                message_id=message_id,
                run_id=self.run.id,
                saga=self.saga,
                step=step,
                instance=instance,
                failure=_raw_failure(failure),
                context=None if context is None else msgspec.Raw(context.encode()),
            )
        )

    def committed_instances(self) -> tuple[Instance, ...]:
        """Step and handler instances this very transaction committed (not yet in the log)."""
        return tuple(
            Instance(e.instance, e.step_index, e.iteration, e.handler_iteration)
            for e in self.rows
            if e.type == EventType.SUSPENDED
            and e.run_id == self.run.id
            and e.phase in (Phase.STEP, Phase.HANDLER)
            and e.instance is not None
            and e.step_index is not None
            and e.iteration is not None
        )
