"""The Cooperation's background tasks, in a task of their own.

An anyio task group must be left by the task that entered it. Hosting the group in a task
created for it lets a `Cooperation` be started in one task and closed in another: a
pytest-asyncio fixture does exactly that, as does an ASGI lifespan on some servers.
(asyncio only, as asyncpg is.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import anyio
import structlog

from .worker import Worker

log = structlog.get_logger("scoopy")


class Background:
    """Runs the registry's syncer and, if there is one, the worker, until `stop`."""

    def __init__(self) -> None:
        self._task: asyncio.Task[None] | None = None
        self._stop: anyio.Event | None = None
        self._worker: Worker | None = None

    async def start(
        self, syncer: Callable[[], Coroutine[Any, Any, None]], worker: Worker | None
    ) -> None:
        started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        stop = self._stop = anyio.Event()
        self._worker = worker

        async def host() -> None:
            try:
                async with anyio.create_task_group() as tg:
                    tg.start_soon(syncer)
                    if worker is not None:
                        await tg.start(worker.run)
                    started.set_result(None)
                    await stop.wait()
                    tg.cancel_scope.cancel()
            except BaseException as exc:
                if not started.done():
                    started.set_exception(exc)
                    return
                log.error("scoopy's background tasks failed", error=repr(exc))
                raise

        self._task = asyncio.get_running_loop().create_task(host(), name="scoopy")
        await started

    async def stop(self, grace: float) -> None:
        """Stop claiming, let running steps finish (up to `grace` s), then end the tasks."""
        task, self._task = self._task, None
        if task is None or self._stop is None:
            return
        with anyio.CancelScope(shield=True):
            if self._worker is not None:
                await self._worker.stop(grace)
            self._stop.set()
            await task
