"""Topics and messages."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec

from .errors import PayloadError, check_name

P = TypeVar("P")

_json = msgspec.json.Encoder()


class Topic(Generic[P]):
    """A named topic, optionally typed: a typed topic validates on launch and decodes for steps."""

    __slots__ = ("name", "payload_type")

    def __init__(self, name: str, payload_type: Any = Any) -> None:
        self.name = check_name("topic", name)
        self.payload_type = payload_type

    @property
    def typed(self) -> bool:
        return self.payload_type is not Any

    def encode(self, payload: Any) -> bytes:
        """Validate `payload` for this topic and return its JSON, or raise `PayloadError`."""
        value = payload
        if self.typed and not (
            isinstance(self.payload_type, type) and isinstance(payload, self.payload_type)
        ):
            try:
                value = msgspec.convert(payload, self.payload_type)
            except msgspec.ValidationError as exc:
                expected = getattr(self.payload_type, "__name__", repr(self.payload_type))
                raise PayloadError(
                    f"payload for topic {self.name!r} is not a valid {expected}: {exc}"
                ) from exc
        try:
            return _json.encode(value)
        except (TypeError, msgspec.EncodeError) as exc:
            raise PayloadError(
                f"payload for topic {self.name!r} is not JSON-serialisable: {exc}"
            ) from exc

    def decode(self, data: bytes | str) -> P:
        try:
            if self.typed:
                decoded: P = msgspec.json.decode(data, type=self.payload_type)
            else:
                decoded = msgspec.json.decode(data)
        except msgspec.ValidationError as exc:
            raise PayloadError(f"payload on topic {self.name!r} does not decode: {exc}") from exc
        return decoded

    def __repr__(self) -> str:
        return f"Topic({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Topic) and other.name == self.name

    def __hash__(self) -> int:
        return hash(self.name)


def as_topic(topic: Topic[Any] | str) -> Topic[Any]:
    return topic if isinstance(topic, Topic) else Topic(topic)


@dataclass(frozen=True, slots=True)
class Message(Generic[P]):
    """A message as a step sees it."""

    id: uuid.UUID
    topic: str
    payload: P
