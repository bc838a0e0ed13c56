"""A saga's definition as deployed code sees it: its ordered steps, and which runs it may advance.

A run's cursor counts steps by position in the definition it started under. Code deployed
later may have inserted, removed, renamed or reordered steps, so positions alone would point
at the wrong step. Each definition is therefore identified by the names and kinds of its
steps, and each run records how far it got under its definition: the *prefix* hash of the
steps it has reached. A worker advances a run only if the run's prefix is one of its own
prefixes (the steps up to the run's position are the same, in the same order, under the
same names, possibly through a declared alias): steps appended or inserted after that
position, new bodies, compensations and handlers are all compatible; any other change
leaves the run to a worker whose definition fits, or, if there is none, holds it visibly.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from ..saga import Saga
from .machine import Instance, RunState

# Alias combinations considered per prefix: aliases are for a few renames, not a search space.
MAX_VARIANTS = 64


class StepShape(msgspec.Struct, frozen=True, array_like=True):
    """What identifies a step in a definition: its name, its kind, the names it had before."""

    name: str
    kind: str
    aliases: tuple[str, ...] = ()


def _hash(names: Sequence[tuple[str, str]]) -> str:
    text = "\x1f".join(f"{kind}:{name}" for name, kind in names)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def _prefixes(shapes: Sequence[StepShape]) -> tuple[str, ...]:
    return tuple(_hash([(s.name, s.kind) for s in shapes[: i + 1]]) for i in range(len(shapes)))


@dataclass(frozen=True)
class Definition:
    """The steps of one saga as this process defines them."""

    saga: str
    steps: tuple[StepShape, ...]
    fingerprint: str = field(init=False)
    prefixes: tuple[str, ...] = field(init=False)  # the prefix hash at each position
    accepted: frozenset[str] = field(init=False)  # prefixes of runs this definition advances

    def __post_init__(self) -> None:
        prefixes = _prefixes(self.steps)
        object.__setattr__(self, "prefixes", prefixes)
        object.__setattr__(self, "fingerprint", prefixes[-1] if prefixes else _hash([]))
        accepted = set(prefixes)
        for end in range(len(self.steps)):
            choices = [(s.name, *s.aliases) for s in self.steps[: end + 1]]
            variants = itertools.islice(itertools.product(*choices), MAX_VARIANTS)
            for names in variants:
                shaped = [(name, s.kind) for name, s in zip(names, self.steps, strict=False)]
                accepted.add(_hash(shaped))
        object.__setattr__(self, "accepted", frozenset(accepted))

    @classmethod
    def of(cls, saga: Saga) -> Definition:
        return cls(saga.name, tuple(StepShape(s.name, s.kind, s.aliases) for s in saga.steps))

    def prefix_at(self, reached: int) -> str:
        return self.prefixes[min(reached, len(self.prefixes) - 1)]

    def index_of(self, name: str) -> int | None:
        """The position of the step called `name` here, or called so before (an alias)."""
        for position, shape in enumerate(self.steps):
            if shape.name == name or name in shape.aliases:
                return position
        return None

    def names(self) -> list[str]:
        return [shape.name for shape in self.steps]

    def difference(self, other: Definition, reached: int) -> str:
        """Why a run that reached `reached` under `other` does not fit this definition."""
        theirs = other.names()[: reached + 1]
        ours = self.names()[: reached + 1]
        for position, (old, new) in enumerate(itertools.zip_longest(theirs, ours)):
            if old != new:
                if new is None:
                    return f"step {old!r} (position {position + 1}) is gone"
                if old is None:
                    return f"step {new!r} was inserted at position {position + 1}"
                if old in self.names():
                    return (
                        f"step {new!r} is now at position {position + 1}, where the run had "
                        f"{old!r} (inserted or reordered)"
                    )
                return f"step {old!r} (position {position + 1}) was renamed or removed"
        return "the kinds of its steps changed"


def encode_steps(definition: Definition) -> str:
    return msgspec.json.encode(definition.steps).decode()


def decode_steps(saga: str, text: str) -> Definition:
    return Definition(saga, msgspec.json.decode(text, type=tuple[StepShape, ...]))


class Untranslatable(Exception):
    """A run's position cannot be carried over to this definition; the message says why."""


def translate(state: RunState, old: Definition, new: Definition) -> RunState:
    """The run's cursor, counted in `old`, counted in `new` instead (by step name).

    A run going on to the step that follows its last one (or done with every step) goes on
    to whatever follows that step in `new`: steps inserted or appended after its position
    apply to it. A jump (`NextStep.goto`, a repeat) keeps its target by name.
    """

    def moved(position: int) -> int:
        name = old.steps[position].name
        found = new.index_of(name)
        if found is None:
            raise Untranslatable(f"step {name!r} is not in the definition this worker runs")
        return found

    last = None if state.last is None else moved(state.last)
    after_last = 0 if state.last is None else state.last + 1
    if state.step is None or state.step == after_last:
        following = 0 if last is None else last + 1
        step = following if following < len(new.steps) else None
    else:
        step = moved(state.step)
    plan = None
    if state.plan is not None:
        plan = [
            Instance(each.seq, moved(each.step), each.iteration, each.handler)
            for each in state.plan
        ]
    return msgspec.structs.replace(
        state, step=step, last=last, reached=moved(state.reached), plan=plan
    )
