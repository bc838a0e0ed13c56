"""How the engine classifies what goes wrong in a step transaction.

Four kinds of trouble, four answers:
- transient (the connection, the server, a lost race): abandon the transaction and run the
  step again later; the saga is never rolled back for them;
- user code that failed after writing through the step's connection (`Redo`): roll the whole
  transaction back and advance the run again with that failure in place of the code;
- a cancellation that arrived while the step's code ran (`CancelledMeanwhile`): discard the
  transaction and advance the run again, which then gives up at the step's boundary;
- anything else raised by user code is the step's failure, handled by the state machine.
"""

from __future__ import annotations

import asyncpg

from ..context import CooperationContext
from ..vocab import Connection

# The server or the connection to it went away: a restart, a failover, a terminated
# backend, a network blip, a transaction idle past idle_in_transaction_session_timeout.
CONNECTION_LOST: tuple[type[BaseException], ...] = (
    OSError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
)

# Database errors that say nothing about the step's business logic: the connection or the
# server failed, or the transaction lost a race (serialization, deadlock).
DB_TRANSIENT: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,
    asyncpg.exceptions.PostgresConnectionError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.TooManyConnectionsError,
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    asyncpg.exceptions.IdleInTransactionSessionTimeoutError,
)


def gone(conn: Connection) -> bool:
    """Whether `conn` can no longer be used.

    When a pooled connection dies, asyncpg returns it to the pool at once and detaches its
    proxy; every call on the proxy, `is_closed()` included, then raises `InterfaceError`.
    """
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:
        return True


def connection_lost(exc: BaseException, conn: Connection | None = None) -> bool:
    """Whether `exc` says the database went away (rather than that something is wrong)."""
    return isinstance(exc, CONNECTION_LOST) or (conn is not None and gone(conn))


class KeyRaced(Exception):
    """A keyed launch of the step lost to a launch of the same key that committed while
    the step ran: the id the step was given does not exist. The transaction is abandoned
    and the step run again, when the launch finds the winner's message."""


# Around scoopy's own statements, a lost socket or a timeout is transient too. (Raised by
# user code, the same exceptions are business failures: an HTTP client's ConnectionError
# is the step's failure, not the database's.)
TRANSIENT: tuple[type[BaseException], ...] = (
    *DB_TRANSIENT,
    ConnectionError,
    TimeoutError,
    KeyRaced,
)


class CancelledMeanwhile(Exception):
    """The run (or an ancestor) was cancelled while its step's code ran: the step must not
    commit. The transaction is discarded and the run advanced again, when it gives up."""


class Redo(Exception):
    """User code failed after writing through the step's connection: the whole transaction
    must be rolled back and the run advanced again with this failure."""

    def __init__(self, error: BaseException, context: CooperationContext | None = None) -> None:
        super().__init__(repr(error))
        self.error = error
        self.context = context
