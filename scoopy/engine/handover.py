"""Commit one step's transaction and begin the next in a single round trip.

A worker with more ready runs commits a step and at once opens the transaction its next
claim runs in. Sent as one simple query, `COMMIT; BEGIN` saves a round trip per step under
load: a quarter of a step's round trips, and on a busy host most of the client's and the
server's per-step overhead (see benchmarks/README.md).

asyncpg has no public way to adopt a transaction begun by a query, and step code must
still be able to nest `scope.connection.transaction()` blocks, which needs asyncpg to
know the outer one. So this module, alone in scoopy, sets asyncpg's transaction
bookkeeping by hand: the committed transaction is marked committed, the new one started
and registered as the connection's top transaction, exactly as `Transaction.commit()` and
`Transaction.start()` leave them. `SUPPORTED` is false when the installed asyncpg does not
look the way this expects; the worker then commits and begins in two round trips.
tests/test_handover.py checks that it is true with the pinned asyncpg.

A step whose code used `scope.connection` may have left session state behind (settings,
LISTEN, session advisory locks, cursors). Its connection used to go back to the pool for
asyncpg's reset: three more round trips. With `reset`, asyncpg's own reset query runs in
the same round trip, after the COMMIT (deferred triggers must see the step's settings, and
a session lock must not be released before the step's writes are visible) and in a
transaction of its own (in the claim's, an empty claim's ROLLBACK would undo UNLISTEN and
RESET ALL). The callbacks user code registered on the connection are dropped, as asyncpg's
pool does on release.
"""

from __future__ import annotations

from typing import Any, cast

import asyncpg
from asyncpg.pool import PoolConnectionProxy
from asyncpg.transaction import Transaction, TransactionState

from ..vocab import Connection

QUERY = "COMMIT; BEGIN"
SUPPORTED = (
    {"_state", "_nested", "_connection"} <= set(getattr(Transaction, "__slots__", ()))
    and {"_top_xact", "_listeners", "_log_listeners"}
    <= set(getattr(asyncpg.Connection, "__slots__", ()))
    and "_con" in getattr(PoolConnectionProxy, "__slots__", ())
    and hasattr(TransactionState, "STARTED")
)


def _raw(conn: Connection) -> Any:
    """The asyncpg Connection behind a pool's proxy (which forwards reads, not writes)."""
    return getattr(conn, "_con") if isinstance(conn, PoolConnectionProxy) else conn  # noqa: B009


async def commit_and_begin(conn: Connection, tx: Transaction, reset: bool = False) -> Transaction:
    """Commit `tx`, the connection's top transaction, and return a started new one.

    With `reset`, the session is reset first, as asyncpg's pool resets a released connection.
    """
    raw = _raw(conn)
    if raw._top_xact is not tx or tx._state is not TransactionState.STARTED:
        raise RuntimeError("commit_and_begin needs the connection's open top transaction")
    query = f"{QUERY};\n{raw.get_reset_query()}\n{QUERY}" if reset else QUERY
    raw._top_xact = None
    try:
        await raw.execute(query)
    except BaseException:
        # As Transaction.commit() leaves it. A COMMIT that failed ended the transaction
        # and skipped the BEGIN; a lost connection ends both.
        tx._state = TransactionState.FAILED
        raise
    tx._state = TransactionState.COMMITTED
    if reset:
        raw._listeners.clear()
        raw._log_listeners.clear()
    nxt = raw.transaction()
    nxt._state = TransactionState.STARTED
    raw._top_xact = nxt
    return cast(Transaction, nxt)
