"""Several `scoopy worker` processes that a test SIGKILLs and restarts.

Each `ManagedWorker` is one logical worker whose successive processes (incarnations) are
`tests.helpers.WorkerProcess`es. It tells a death the test caused (SIGKILL) from one the
worker chose (it exited by itself): the second is what a reliability test is about.
"""

from __future__ import annotations

import random
import signal
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType

import anyio
import anyio.abc

from ..helpers import ROOT, WAIT, WorkerProcess


@dataclass
class Exit:
    """A worker process that ended without being told to."""

    worker: int
    pid: int
    returncode: int | None
    output_tail: str


class FleetProcess(WorkerProcess):
    """A `WorkerProcess` whose output is drained by a task of the fleet's task group.

    `WorkerProcess` opens a task group of its own in `__aenter__` and closes it in
    `__aexit__`, so both must run in one task; a fleet starts, kills and restarts its
    workers from whichever task injects the fault.
    """

    def __init__(self, tg: anyio.abc.TaskGroup, dsn: str, schema: str, app: str, **env: str):
        super().__init__(dsn, schema, app, **env)
        self._fleet_tg = tg

    async def __aenter__(self) -> FleetProcess:
        self.process = await anyio.open_process(self.args, env=self.env, cwd=ROOT)
        self._fleet_tg.start_soon(self._drain)
        await self.wait_for(b"worker started")
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.process is not None
        with anyio.CancelScope(shield=True):
            if self.process.returncode is None:
                self.process.send_signal(signal.SIGTERM)
                with anyio.move_on_after(WAIT):
                    await self.process.wait()
                if self.process.returncode is None:
                    self.process.kill()
            await self.process.wait()
            with anyio.move_on_after(5):
                while not self._eof:  # the rest of its output
                    changed = self._changed
                    await changed.wait()


class ManagedWorker:
    """One worker slot: start, SIGKILL, restart; remembers every process it ran."""

    def __init__(
        self,
        index: int,
        tg: anyio.abc.TaskGroup,
        dsn: str,
        schema: str,
        app: str,
        *,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.index = index
        self.tg = tg
        self.dsn = dsn
        self.schema = schema
        self.app = app
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.current: FleetProcess | None = None
        self.incarnations: list[FleetProcess] = []
        self.kills = 0
        self.exits: list[Exit] = []  # processes that ended on their own, noticed by `check`

    def _new_process(self) -> FleetProcess:
        process = FleetProcess(self.tg, self.dsn, self.schema, self.app, **self.env)
        process.args += self.extra_args  # options of the `worker` subcommand go after APP
        return process

    @property
    def alive(self) -> bool:
        return (
            self.current is not None
            and self.current.process is not None
            and self.current.process.returncode is None
        )

    @property
    def pid(self) -> int:
        assert self.current is not None
        return self.current.pid

    async def start(self) -> None:
        """Start a new process and wait until it reports it has started."""
        process = self._new_process()
        self.incarnations.append(process)
        self.current = process
        try:
            await process.__aenter__()
        except BaseException:
            if process.process is not None:  # started, then exited or hung before "started"
                await self._reap()
            raise

    async def kill(self) -> None:
        """SIGKILL the current process (a crash: no shutdown, no cleanup)."""
        if self.current is None:
            return
        if self.alive:
            self.kills += 1
            await self.current.kill()
        await self._reap()

    async def restart(self) -> None:
        await self.kill()
        await self.start()

    def check(self) -> Exit | None:
        """Record and return an exit the test did not cause, if the process has one."""
        current = self.current
        if current is None or current.process is None or current.process.returncode is None:
            return None
        if any(e.pid == current.pid for e in self.exits):
            return None
        found = Exit(
            self.index,
            current.pid,
            current.process.returncode,
            current.output.decode(errors="replace")[-3000:],
        )
        self.exits.append(found)
        return found

    async def _reap(self) -> None:
        if self.current is not None:
            await self.current.__aexit__(None, None, None)

    async def stop(self) -> None:
        """SIGTERM (graceful stop) the current process and wait for it."""
        self.check()
        await self._reap()
        self.current = None

    def output(self) -> str:
        return "".join(p.output.decode(errors="replace") for p in self.incarnations)


class WorkerFleet:
    """`size` managed workers serving one app; `async with` starts and stops them all."""

    def __init__(
        self,
        size: int,
        dsn: str,
        schema: str,
        app: str,
        *,
        extra_args: Sequence[str] = (),
        env: dict[str, str] | None = None,
        seed: int | None = None,
    ) -> None:
        self.size = size
        self.options = (dsn, schema, app, list(extra_args), dict(env or {}))
        self.workers: list[ManagedWorker] = []
        self._tg: anyio.abc.TaskGroup | None = None
        self.random = random.Random(seed)
        self.revived = 0

    def __getitem__(self, index: int) -> ManagedWorker:
        return self.workers[index]

    def __len__(self) -> int:
        return len(self.workers)

    async def __aenter__(self) -> WorkerFleet:
        dsn, schema, app, extra_args, env = self.options
        self._tg = anyio.create_task_group()
        await self._tg.__aenter__()
        self.workers = [
            ManagedWorker(i, self._tg, dsn, schema, app, extra_args=extra_args, env=env)
            for i in range(self.size)
        ]
        try:
            async with anyio.create_task_group() as starting:
                for worker in self.workers:
                    starting.start_soon(worker.start)
        except BaseException as exc:
            await self.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        assert self._tg is not None
        with anyio.CancelScope(shield=True):
            async with anyio.create_task_group() as stopping:
                for worker in self.workers:
                    stopping.start_soon(worker.stop)
        # Every drain task ends with its process's output, so this returns at once.
        await self._tg.__aexit__(None, None, None)

    @property
    def kills(self) -> int:
        return sum(worker.kills for worker in self.workers)

    def alive(self) -> list[bool]:
        return [worker.alive for worker in self.workers]

    def pids(self) -> list[int]:
        return [worker.pid for worker in self.workers if worker.alive]

    async def kill_random(self) -> ManagedWorker | None:
        """SIGKILL one live worker picked at random (None if none is alive)."""
        live = [worker for worker in self.workers if worker.alive]
        if not live:
            return None
        victim = self.random.choice(live)
        await victim.kill()
        return victim

    def unexpected_exits(self) -> list[Exit]:
        """Every process that exited without being killed, so far."""
        for worker in self.workers:
            worker.check()
        return [exit for worker in self.workers for exit in worker.exits]

    async def revive_dead(self) -> int:
        """Start a new process for each slot whose process exited by itself; how many."""
        revived = 0
        for worker in self.workers:
            worker.check()
            if worker.current is not None and not worker.alive:
                dead = worker.current.pid
                if any(exit.pid == dead for exit in worker.exits):
                    await worker._reap()
                    await worker.start()
                    revived += 1
        self.revived += revived
        return revived
