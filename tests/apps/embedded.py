"""A program using scoopy on a fresh machine: no DSN, a private PostgreSQL in DATA_DIR.

Run by tests/test_fresh_machine.py as a process of its own, because the embedded server
stops when the last process using it exits:

    python -m tests.apps.embedded DATA_DIR launch       # run a parent+child hierarchy
    python -m tests.apps.embedded DATA_DIR read ROOT    # report an earlier hierarchy

Prints one JSON object on stdout: the server's DSN and postmaster pid, and what it found.
"""

from __future__ import annotations

import json
import logging
import sys
import uuid
from pathlib import Path
from typing import Any

import anyio
import structlog

from scoopy import Cooperation, Message, Saga, Scope
from scoopy.postgres import embedded_dsn

WAIT = 60.0

order = Saga("order")
stock = Saga("stock")


@order.step()
async def reserve(scope: Scope, message: Message[Any]) -> None:
    await scope.launch("stock", {"order": message.payload["order"]})


@order.step()
async def confirm(scope: Scope, message: Message[Any]) -> None:
    pass


@stock.step()
async def take(scope: Scope, message: Message[Any]) -> None:
    pass


def postmaster_pid(data_dir: Path) -> int:
    """The server's pid: the first line of postmaster.pid."""
    return int((data_dir / "postmaster.pid").read_text().splitlines()[0])


async def main(data_dir: Path, command: str, root: str | None) -> dict[str, Any]:
    report: dict[str, Any] = {}
    async with Cooperation(data_dir=data_dir, worker=command == "launch") as coop:
        report["dsn"] = embedded_dsn(data_dir)  # the DSN the Cooperation started on
        report["postmaster"] = postmaster_pid(data_dir)
        if command == "launch":
            coop.subscribe("orders", order)
            coop.subscribe("stock", stock)
            handle = await coop.launch("orders", {"order": 7})
            outcome = await handle.wait(timeout=WAIT)
        else:
            assert root is not None
            handle = coop.handle(uuid.UUID(root))
            outcome = await handle.wait(timeout=WAIT)
        report["root"] = str(handle.id)
        report["status"] = outcome.status
        report["events"] = [[e.type, e.saga, e.step] for e in await coop.events(handle.id)]
    return report


if __name__ == "__main__":
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    data_dir, command, *rest = sys.argv[1:]
    found = anyio.run(main, Path(data_dir), command, rest[0] if rest else None)
    print(json.dumps(found), flush=True)
