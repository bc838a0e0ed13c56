"""Topics and messages."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from .errors import PayloadError, ScoopyError, check_name, check_storable

P = TypeVar("P")

_json = msgspec.json.Encoder()


class Topic(Generic[P]):
    """A named topic, optionally typed.

    A typed topic validates payloads on launch and decodes them for steps; with `result`,
    it also types the values its handlers return to their parents (`Scope.set_result`).
    """

    __slots__ = ("name", "payload_type", "result_type")

    def __init__(self, name: str, payload_type: Any = Any, *, result: Any = Any) -> None:
        self.name = check_name("topic", name)
        self.payload_type = payload_type
        self.result_type = result

    @property
    def typed(self) -> bool:
        return self.payload_type is not Any

    def encode(self, payload: Any) -> bytes:
        """Validate `payload` for this topic and return its JSON, or raise `PayloadError`."""
        return _encode(payload, self.payload_type, f"payload for topic {self.name!r}")

    def decode(self, data: bytes | str) -> P:
        decoded: P = _decode(data, self.payload_type, f"payload on topic {self.name!r}")
        return decoded

    def encode_result(self, value: Any) -> bytes:
        return _encode(value, self.result_type, f"result for topic {self.name!r}")

    def decode_result(self, data: bytes | str) -> Any:
        return _decode(data, self.result_type, f"result on topic {self.name!r}")

    def __repr__(self) -> str:
        return f"Topic({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topic) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def _encode(value: Any, kind: Any, what: str) -> bytes:
    if kind is not Any and not (isinstance(kind, type) and isinstance(value, kind)):
        try:
            value = msgspec.convert(value, kind)
        except msgspec.ValidationError as exc:
            expected = getattr(kind, "__name__", repr(kind))
            raise PayloadError(f"{what} is not a valid {expected}: {exc}") from exc
    try:
        encoded = _json.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise PayloadError(f"{what} is not JSON-serialisable: {exc}") from exc
    return check_storable(encoded, what)


def _decode(data: bytes | str, kind: Any, what: str) -> Any:
    try:
        return msgspec.json.decode(data) if kind is Any else msgspec.json.decode(data, type=kind)
    except msgspec.ValidationError as exc:
        raise PayloadError(f"{what} does not decode: {exc}") from exc


MAX_PRIORITY = 1_000_000


def check_priority(priority: object) -> int:
    """Return `priority` if it is a valid launch priority, else raise `ScoopyError`."""
    if (
        not isinstance(priority, int)
        or isinstance(priority, bool)
        or not 0 <= priority <= MAX_PRIORITY
    ):
        raise ScoopyError(f"`priority` must be an int from 0 to {MAX_PRIORITY}, got {priority!r}")
    return priority


def as_topic(topic: Topic[Any] | str) -> Topic[Any]:
    return topic if isinstance(topic, Topic) else Topic(topic)


@dataclass(frozen=True, slots=True)
class Message(Generic[P]):
    """A message as a step sees it."""

    id: uuid.UUID
    topic: str
    payload: P


@dataclass(slots=True)
class NewMessage:
    """A message to insert: launched from a step (scoped or global) or from outside."""

    id: uuid.UUID
    root_id: uuid.UUID
    topic: str
    payload: str
    context: str | None
    instance: int | None  # the emitting step instance; None for a launch outside the hierarchy
    key: str | None = None  # idempotency key: at most one message per key
    priority: int = 0  # claimed sooner by sagas that declare priorities (Saga(priorities=True))

    @property
    def scoped(self) -> bool:
        return self.instance is not None
