"""What the engine tells the world about each transition it commits.

Every event-log entry a transaction committed is also a structlog event, with the run's
identifiers bound (debug for progress, info for outcomes, warning for failures).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable
from typing import Any

from .machine import EventType
from .records import NewEvent

_LOUD = {EventType.ROLLING_BACK, EventType.ROLLBACK_FAILED, EventType.ATTEMPT_FAILED}
_INFO = {EventType.COMMITTED, EventType.ROLLED_BACK, EventType.CANCELLATION_REQUESTED}


def log_events(
    logger: Any,
    enabled: Callable[[int], bool] | None,
    events: list[NewEvent],
    worker: str,
    lineage: list[uuid.UUID],
) -> None:
    for event in events:
        level = (
            logging.WARNING
            if event.type in _LOUD
            else logging.INFO
            if event.type in _INFO
            else logging.DEBUG
        )
        if enabled is not None and not enabled(level):
            continue  # nobody reads it: skip building the fields
        fields = {
            "saga": event.saga,
            "step": event.step,
            "run_id": str(event.run_id) if event.run_id else None,
            "root_id": str(event.root_id),
            "message_id": str(event.message_id) if event.message_id else None,
            "lineage": [str(item) for item in (lineage if event.run_id else [event.root_id])],
            "worker": worker,
        }
        if event.type in _LOUD:
            failure = None if event.failure is None else bytes(event.failure).decode()
            logger.warning(event.type, failure=failure, **fields)
        elif event.type in _INFO:
            logger.info(event.type, **fields)
        else:
            logger.debug(event.type, **fields)
