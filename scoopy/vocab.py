"""Names every layer shares: the connection type, a run's statuses, its paths.

The values are the ones stored in the database (`run.status`, `RunState.path`), so they are
plain strings; these names keep them from being spelled differently in different places.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal, TypeAlias

import asyncpg

if TYPE_CHECKING:
    Connection: TypeAlias = (
        asyncpg.Connection[asyncpg.Record] | asyncpg.pool.PoolConnectionProxy[asyncpg.Record]
    )
else:
    Connection = asyncpg.Connection

RunStatus = Literal["pending", "active", "committed", "rolled_back", "rollback_failed", "skipped"]
# How a run ended.
Ending = Literal["committed", "rolled_back", "rollback_failed"]
# How a hierarchy ended: as its runs did, or "unhandled" when its message started none.
OutcomeStatus = Literal["committed", "rolled_back", "rollback_failed", "unhandled"]
Path = Literal["happy", "rollback"]

PENDING: Final = "pending"  # created, no step started yet
ACTIVE: Final = "active"  # started, not finished
COMMITTED: Final = "committed"
ROLLED_BACK: Final = "rolled_back"
ROLLBACK_FAILED: Final = "rollback_failed"
SKIPPED: Final = "skipped"  # never started, and never will (unsubscribed, parent gave up)
UNHANDLED: Final = "unhandled"

UNFINISHED: Final = (PENDING, ACTIVE)
FAILED: Final = (ROLLED_BACK, ROLLBACK_FAILED)

HAPPY: Final = "happy"
ROLLBACK: Final = "rollback"
