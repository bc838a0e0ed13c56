"""Sagas: named sequences of transactional steps, with compensations and child-failure handlers."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Literal, Protocol, overload

from .context import ContextKey
from .errors import SagaDefinitionError, check_name, check_step_name

if TYPE_CHECKING:
    from .failure import CooperationError
    from .message import Message
    from .scope import Scope
    from .strategy import EventLoopStrategy


@dataclass(frozen=True, slots=True)
class NextStep:
    """Where a saga goes after a step: `CONTINUE`, `REPEAT` or `goto(step)`."""

    kind: Literal["continue", "repeat", "goto"]
    target: str | None = None

    CONTINUE: ClassVar[NextStep]
    REPEAT: ClassVar[NextStep]

    @staticmethod
    def goto(step: str | Step) -> NextStep:
        return NextStep("goto", step.name if isinstance(step, Step) else step)


NextStep.CONTINUE = NextStep("continue")
NextStep.REPEAT = NextStep("repeat")


@dataclass(frozen=True)
class RetryPolicy:
    """Durable retries of a failing step: `attempts` in total, exponential backoff with jitter.

    Only exceptions that are instances of `on` are retried; others roll the saga back at once.
    """

    attempts: int = 3
    backoff: float = 1.0
    multiplier: float = 2.0
    max_backoff: float = 300.0
    jitter: float = 0.2
    on: tuple[type[BaseException], ...] = (Exception,)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise SagaDefinitionError(f"retry attempts must be at least 1, got {self.attempts}")
        if self.backoff < 0 or self.multiplier < 1 or self.max_backoff < 0:
            raise SagaDefinitionError("retry backoff must be >= 0 and multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise SagaDefinitionError(f"retry jitter must be within [0, 1], got {self.jitter}")

    def retries(self, exc: BaseException, attempt: int) -> bool:
        """Whether a failure of attempt number `attempt` (1-based) gets another attempt."""
        return attempt < self.attempts and isinstance(exc, self.on)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        base = min(self.max_backoff, self.backoff * self.multiplier ** (attempt - 1))
        spread = base * self.jitter
        return max(0.0, base + (rng or random).uniform(-spread, spread))


class StepFn(Protocol):
    def __call__(self, scope: Scope, message: Message[Any], /) -> Awaitable[NextStep | None]: ...


class RollbackFn(Protocol):
    def __call__(
        self, scope: Scope, message: Message[Any], failure: BaseException, /
    ) -> Awaitable[None]: ...


class CleanupFn(Protocol):
    def __call__(self, scope: Scope, message: Message[Any], /) -> Awaitable[None]: ...


class ChildFailureFn(Protocol):
    def __call__(
        self, scope: Scope, message: Message[Any], failure: CooperationError, /
    ) -> Awaitable[NextStep | None]: ...


@dataclass(frozen=True)
class Rate:
    """At most `starts` step transactions of a saga begin per `per` seconds, across every
    worker process, evenly spaced (never a burst at the edge of a period)."""

    starts: int
    per: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.starts, int) or isinstance(self.starts, bool) or self.starts < 1:
            raise SagaDefinitionError(f"a rate needs starts >= 1, got {self.starts!r}")
        if not (isinstance(self.per, int | float) and 0 < self.per < float("inf")):
            raise SagaDefinitionError(f"a rate needs a period > 0 seconds, got {self.per!r}")

    @property
    def interval(self) -> float:
        """Seconds between two starts."""
        return self.per / self.starts


@dataclass(eq=False)
class Step:
    """One step of a saga.

    Decorators add handlers: `@step.rollback` (compensation), `@step.on_child_failure`
    and `@step.finally_` (a distributed try/finally around the work the step launches).
    """

    saga: Saga
    name: str
    index: int
    invoke: StepFn
    retry: RetryPolicy | None = None
    child_failure: ChildFailureFn | None = None
    undo: RollbackFn | None = None
    cleanup: CleanupFn | None = None
    kind: str = "step"  # or "finally": the step `finally_` adds after this one
    aliases: tuple[str, ...] = ()  # names the step had in earlier deployments (renames)

    @property
    def compensate(self) -> RollbackFn | None:
        """What rolling this step back runs: its `finally_` (once) and then its rollback."""
        if self.cleanup is None:
            return self.undo
        return self._compensate_with_cleanup

    async def _compensate_with_cleanup(
        self, scope: Scope, message: Message[Any], failure: BaseException
    ) -> None:
        await self._cleanup_once(scope, message)
        if self.undo is not None:
            await self.undo(scope, message, failure)

    async def _cleanup_once(self, scope: Scope, message: Message[Any]) -> None:
        # The marker lives in the run's context so that it travels into the rollback path;
        # its key names the run, so a parent's marker merged into a child never collides.
        done: ContextKey[list[str]] = ContextKey(f"scoopy.finally.{scope.run_id}", list[str])
        ran = scope.context.get(done, [])
        if self.name in ran:
            return
        assert self.cleanup is not None
        await self.cleanup(scope, message)
        scope.context[done] = [*ran, self.name]

    def rollback(self, fn: RollbackFn) -> RollbackFn:
        """Decorate the compensating action run when this step, once committed, is rolled back."""
        if self.undo is not None:
            raise SagaDefinitionError(
                f"step {self.name!r} of {self.saga.name!r} has a rollback already"
            )
        self.undo = fn
        return fn

    def finally_(self, fn: CleanupFn) -> CleanupFn:
        """Decorate an action that runs exactly once when the work this step launched is over.

        It runs after every child of the step committed (in a step of its own, named
        "<step> (finally)"), or during rollback before this step's compensation, or, if the
        step itself raises, right away in the step's (doomed) transaction.
        """
        if self.cleanup is not None:
            raise SagaDefinitionError(f"step {self.name!r} of {self.saga.name!r} has a finally_")
        self.cleanup = fn
        body = self.invoke

        async def guarded(scope: Scope, message: Message[Any]) -> NextStep | None:
            try:
                return await body(scope, message)
            except Exception:
                await fn(scope, message)
                raise

        async def after_children(scope: Scope, message: Message[Any]) -> None:
            await self._cleanup_once(scope, message)

        self.invoke = guarded
        self.saga._insert(
            self.index + 1,
            f"{self.name} (finally)",
            after_children,
            aliases=tuple(f"{alias} (finally)" for alias in self.aliases),
        )
        return fn

    def on_child_failure(self, fn: ChildFailureFn) -> ChildFailureFn:
        """Decorate the handler for children of this step that failed; returning means handled."""
        if self.child_failure is not None:
            raise SagaDefinitionError(
                f"step {self.name!r} of {self.saga.name!r} has an on_child_failure already"
            )
        self.child_failure = fn
        return fn

    async def __call__(self, scope: Scope, message: Message[Any]) -> NextStep | None:
        return await self.invoke(scope, message)

    def __repr__(self) -> str:
        return f"<Step {self.saga.name}.{self.name}>"


class Saga:
    """A named sequence of steps. Subscribe it to topics with `Cooperation.subscribe`."""

    def __init__(
        self,
        name: str,
        *,
        instances: int = 4,
        strategy: EventLoopStrategy | None = None,
        version: int = 0,
        concurrency: int | None = None,
        rate: Rate | None = None,
        priorities: bool = False,
    ) -> None:
        """`instances` bounds this saga's concurrent step transactions in one process;
        `concurrency` bounds them across every process, and `rate` bounds how many begin
        per period. `priorities` claims ready runs by the priority their launch gave them.
        """
        self.name = check_name("saga", name)
        if not isinstance(instances, int) or instances < 1:
            raise SagaDefinitionError(f"saga {name!r}: instances must be >= 1, got {instances!r}")
        if concurrency is not None and (
            not isinstance(concurrency, int) or isinstance(concurrency, bool) or concurrency < 1
        ):
            raise SagaDefinitionError(
                f"saga {name!r}: concurrency must be None or an int >= 1, got {concurrency!r}"
            )
        if rate is not None and not isinstance(rate, Rate):
            raise SagaDefinitionError(f"saga {name!r}: rate must be a scoopy.Rate, got {rate!r}")
        self.concurrency = concurrency
        self.rate = rate
        self.priorities = bool(priorities)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise SagaDefinitionError(
                f"saga {name!r}: version must be an int >= 0, got {version!r}"
            )
        self.instances = instances
        # Blue/green: while workers of a higher version are alive, workers of a lower one
        # finish the runs they started and start no new ones.
        self.version = version
        self.strategy = strategy
        self.steps: list[Step] = []

    @overload
    def step(self, name: StepFn, /) -> Step: ...
    @overload
    def step(
        self,
        name: str | None = None,
        /,
        *,
        retry: RetryPolicy | None = None,
        aliases: Sequence[str] = (),
    ) -> Callable[[StepFn], Step]: ...
    def step(
        self,
        name: str | StepFn | None = None,
        /,
        *,
        retry: RetryPolicy | None = None,
        aliases: Sequence[str] = (),
    ) -> Step | Callable[[StepFn], Step]:
        """Decorate `async def step(scope, message)` as the next step (named after the function).

        `aliases` are names the step had in earlier deployments: runs that reached it under
        an old name go on under the new one (see "Deploying changes" in the README).
        """
        if callable(name):
            return self._add(name, None, retry)

        def decorate(fn: StepFn) -> Step:
            return self._add(fn, name, retry, aliases)

        return decorate

    def sleep(self, duration: timedelta | float, name: str | None = None) -> Step:
        """Add a step that only sleeps: the run resumes after `duration` (durably)."""

        async def sleeping(scope: Scope, message: Message[Any]) -> None:
            await scope.sleep(duration)

        return self._add(sleeping, name or f"sleep {len(self.steps)}", None)

    def _insert(self, index: int, name: str, fn: StepFn, aliases: Sequence[str] = ()) -> Step:
        step = self._add(fn, name, None, aliases, kind="finally")
        self.steps.remove(step)
        self.steps.insert(index, step)
        for position, each in enumerate(self.steps):
            each.index = position
        return step

    def _add(
        self,
        fn: StepFn,
        name: str | None,
        retry: RetryPolicy | None,
        aliases: Sequence[str] = (),
        kind: str = "step",
    ) -> Step:
        step_name = check_step_name(name if name is not None else getattr(fn, "__name__", ""))
        if isinstance(aliases, str):
            raise SagaDefinitionError(
                f"aliases of step {step_name!r} must be a list of names, not the string {aliases!r}"
            )
        names = [step_name, *(check_step_name(alias) for alias in aliases)]
        taken = {n for existing in self.steps for n in (existing.name, *existing.aliases)}
        for each in names:
            if each in taken or names.count(each) > 1:
                raise SagaDefinitionError(f"saga {self.name!r} already has a step named {each!r}")
        if step_name.startswith("Rollback of "):
            raise SagaDefinitionError(
                f"step names may not start with 'Rollback of ': {step_name!r}"
            )
        step = Step(
            saga=self,
            name=step_name,
            index=len(self.steps),
            invoke=fn,
            retry=retry,
            kind=kind,
            aliases=tuple(names[1:]),
        )
        self.steps.append(step)
        return step

    def validate(self) -> None:
        """Raise `SagaDefinitionError` if this saga cannot run."""
        if not self.steps:
            raise SagaDefinitionError(f"saga {self.name!r} has no steps")

    def index_of(self, name: str) -> int:
        for step in self.steps:
            if step.name == name:
                return step.index
        raise SagaDefinitionError(f"saga {self.name!r} has no step named {name!r}")

    def __repr__(self) -> str:
        return f"<Saga {self.name} ({len(self.steps)} steps)>"
