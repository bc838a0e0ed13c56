"""Distributed failures: the language-neutral `CooperationFailure` and its Python exceptions."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import ClassVar

import msgspec

NO_MESSAGE = "<no message>"


class Frame(msgspec.Struct, frozen=True):
    """One stack frame of a failure."""

    file: str
    function: str
    line: int


class CooperationFailure(msgspec.Struct, frozen=True, kw_only=True):
    """A failure as it crosses service boundaries.

    JSON fields: type, message, source, stack_trace ([{file, function, line}]), causes.

    `source` is `saga-name[run-id]` for failures raised in steps, or whoever asked for a
    cancellation, rollback or deadline.
    """

    type: str
    message: str
    source: str
    stack_trace: list[Frame] = []
    causes: list[CooperationFailure] = []

    def to_json(self) -> bytes:
        return _encoder.encode(self)

    @classmethod
    def from_json(cls, data: bytes | str) -> CooperationFailure:
        return _decoder.decode(data)

    def to_exception(self) -> CooperationError:
        """The in-process exception for this failure (a `CooperationError` subclass)."""
        kind = _EXCEPTION_TYPES.get(self.type, CooperationError)
        return kind.from_failure(self)

    def render(self) -> str:
        """The distributed stack trace, most recent call last, causes indented below."""
        lines: list[str] = []
        _render(self, lines, "")
        return "\n".join(lines)

    def walk(self) -> list[CooperationFailure]:
        """This failure and all its causes, depth first."""
        found = [self]
        for cause in self.causes:
            found.extend(cause.walk())
        return found


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(CooperationFailure)


def _render(failure: CooperationFailure, lines: list[str], indent: str) -> None:
    lines.append(f"{indent}{failure.type}: {failure.message}")
    lines.append(f"{indent}  in {failure.source}")
    for frame in failure.stack_trace:
        lines.append(f'{indent}  File "{frame.file}", line {frame.line}, in {frame.function}')
    for number, cause in enumerate(failure.causes, 1):
        label = (
            "caused by" if len(failure.causes) == 1 else f"cause {number} of {len(failure.causes)}"
        )
        lines.append(f"{indent}  {label}:")
        _render(cause, lines, indent + "    ")


def type_name(kind: type[BaseException]) -> str:
    """The `type` of a failure: `module.QualName`, or `scoopy.Name` for scoopy's own errors."""
    if isinstance(kind, type) and issubclass(kind, CooperationError):
        return kind.wire_type
    module = kind.__module__
    if module == "builtins":
        return kind.__qualname__
    package = sys.modules.get("scoopy")
    if module.startswith("scoopy.") and getattr(package, kind.__qualname__, None) is kind:
        return f"scoopy.{kind.__qualname__}"  # stable however the package is laid out
    return f"{module}.{kind.__qualname__}"


_ENGINE = str(Path(__file__).resolve().parent / "engine")


def frames_of(tb: TracebackType | None) -> list[Frame]:
    """The traceback's frames, minus the leading ones inside scoopy's engine (not user code)."""
    frames = [
        Frame(file=entry.filename, function=entry.name, line=entry.lineno or 0)
        for entry in traceback.extract_tb(tb)
    ]
    while len(frames) > 1 and frames[0].file.startswith(_ENGINE):
        frames.pop(0)
    return frames


def failure_from_exception(exc: BaseException, source: str) -> CooperationFailure:
    """Convert an exception (and its cause chain) into a failure attributed to `source`.

    A `CooperationError` keeps the failure it carries, so provenance survives re-raising.
    """
    if isinstance(exc, CooperationError):
        return exc.failure
    causes: list[CooperationFailure] = []
    inner = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if inner is not None:
        causes.append(failure_from_exception(inner, source))
    if isinstance(exc, BaseExceptionGroup):
        causes.extend(failure_from_exception(e, source) for e in exc.exceptions)
    # PostgreSQL cannot store NUL; a failure must never be unrecordable.
    message = str(exc).replace("\x00", "\\x00") or NO_MESSAGE
    return CooperationFailure(
        type=type_name(type(exc)),
        message=message,
        source=source,
        stack_trace=frames_of(exc.__traceback__),
        causes=causes,
    )


class CooperationError(Exception):
    """An exception carrying a `CooperationFailure`; `str()` renders the distributed trace."""

    # The failure's `type` on the wire: "scoopy." and the class name, for every subclass.
    wire_type: ClassVar[str] = "scoopy.CooperationError"

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        cls.wire_type = f"scoopy.{cls.__name__}"

    def __init__(self, failure: CooperationFailure) -> None:
        super().__init__(failure.message)
        self.failure = failure

    @classmethod
    def from_failure(cls, failure: CooperationFailure) -> CooperationError:
        return cls(failure)

    @classmethod
    def build(
        cls,
        message: str,
        source: str,
        causes: Sequence[CooperationFailure] = (),
    ) -> CooperationError:
        """A framework failure of this kind, with no stack of its own."""
        return cls(
            CooperationFailure(
                type=cls.wire_type, message=message, source=source, causes=list(causes)
            )
        )

    @property
    def causes(self) -> list[CooperationFailure]:
        return self.failure.causes

    def __str__(self) -> str:
        return self.failure.render()


class ChildRolledBack(CooperationError):
    """A child run failed and rolled back while this run waited for it."""


class ChildRollbackFailed(CooperationError):
    """A child run failed to roll back."""


class ParentSaidSo(CooperationError):
    """This run is rolled back because its parent rolled back."""


class GaveUp(CooperationError):
    """The run gave up: cancellation was requested or a deadline passed."""


class CancellationRequested(CooperationError):
    """Someone asked for the hierarchy to be cancelled."""


class RollbackRequested(CooperationError):
    """Someone asked for a finished hierarchy to be undone."""


class DeadlineMissed(CooperationError):
    """A deadline passed before the run finished."""


class RetriesExhausted(CooperationError):
    """A step failed on every attempt its retry policy allowed; causes hold each attempt."""


class RollbackFailed(CooperationError):
    """A rollback did not complete: causes hold what failed and then the original failure."""


_EXCEPTION_TYPES: dict[str, type[CooperationError]] = {
    kind.wire_type: kind
    for kind in (
        CooperationError,
        ChildRolledBack,
        ChildRollbackFailed,
        ParentSaidSo,
        GaveUp,
        CancellationRequested,
        RollbackRequested,
        DeadlineMissed,
        RetriesExhausted,
        RollbackFailed,
    )
}
