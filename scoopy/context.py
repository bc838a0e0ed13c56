"""CooperationContext: typed data that flows from a run to its later steps and its children."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, Generic, TypeVar, overload

import msgspec

from .errors import PayloadError, check_name, check_storable

T = TypeVar("T")

_MISSING: Any = object()

# Keys whose values only move one way (deadlines). Setting one by its bare name, or merging
# a context that carries it raw, must combine too, or a child could loosen what it inherited.
_COMBINING: dict[str, ContextKey[Any]] = {}


class ContextKey(Generic[T]):
    """A typed context key. `combine(old, new)` decides what setting an existing key keeps.

    Without `combine` the new value wins; deadlines use it so that a value can only get
    stricter as it travels down the hierarchy.
    """

    __slots__ = ("combine", "name", "type")

    @overload
    def __init__(
        self, name: str, type: type[T], *, combine: Callable[[T, T], T] | None = None
    ) -> None: ...
    @overload
    def __init__(
        self, name: str, type: Any, *, combine: Callable[[T, T], T] | None = None
    ) -> None: ...
    def __init__(
        self,
        name: str,
        type: Any,
        *,
        combine: Callable[[T, T], T] | None = None,
    ) -> None:
        self.name = check_name("context key", name)
        self.type = type
        self.combine = combine
        if combine is not None:
            _COMBINING[self.name] = self

    def __repr__(self) -> str:
        return f"ContextKey({self.name!r})"


AnyKey = ContextKey[Any] | str
ContextInput = "CooperationContext | Mapping[ContextKey[Any] | str, Any] | None"

_json = msgspec.json.Encoder(order="sorted")


def _encode_value(name: str, value: Any) -> bytes:
    try:
        encoded = _json.encode(value)
    except (TypeError, msgspec.EncodeError) as exc:
        raise PayloadError(
            f"context value for key {name!r} is not JSON-serialisable: {exc}"
        ) from exc
    return check_storable(encoded, f"context value for key {name!r}")


def _as_type(key: ContextKey[T], value: Any) -> T:
    """`value` (as given under the key's bare name) decoded to the key's type."""
    try:
        decoded: T = msgspec.json.decode(_encode_value(key.name, value), type=key.type)
    except msgspec.ValidationError as exc:
        raise PayloadError(f"context value for key {key.name!r} does not decode: {exc}") from exc
    return decoded


class CooperationContext:
    """A mapping from context keys to values, stored as a JSON object sorted by key name.

    Keys this service does not know are kept as raw JSON and passed on unchanged.
    """

    __slots__ = ("_keys", "_raw", "_values")

    def __init__(self, items: Mapping[Any, Any] | None = None) -> None:
        self._raw: dict[str, bytes] = {}
        self._values: dict[str, Any] = {}
        self._keys: dict[str, ContextKey[Any]] = {}
        for key, value in (items or {}).items():
            self[key] = value

    # -- reading ---------------------------------------------------------------------------

    @overload
    def __getitem__(self, key: ContextKey[T]) -> T: ...
    @overload
    def __getitem__(self, key: str) -> Any: ...
    def __getitem__(self, key: AnyKey) -> Any:
        value = self.get(key, _MISSING)
        if value is _MISSING:
            raise KeyError(key.name if isinstance(key, ContextKey) else key)
        return value

    @overload
    def get(self, key: ContextKey[T]) -> T | None: ...
    @overload
    def get(self, key: ContextKey[T], default: T) -> T: ...
    @overload
    def get(self, key: str, default: Any = None) -> Any: ...
    def get(self, key: AnyKey, default: Any = None) -> Any:
        name = key.name if isinstance(key, ContextKey) else key
        if name in self._values and (not isinstance(key, ContextKey) or name in self._keys):
            return self._values[name]
        raw = self._raw.get(name)
        if raw is None:
            return default
        if isinstance(key, ContextKey):
            try:
                value = msgspec.json.decode(raw, type=key.type)
            except msgspec.ValidationError as exc:
                raise PayloadError(
                    f"context value for key {name!r} does not decode: {exc}"
                ) from exc
            self._keys[name] = key
        else:
            value = msgspec.json.decode(raw)
        self._values[name] = value
        return value

    def __contains__(self, key: object) -> bool:
        name = key.name if isinstance(key, ContextKey) else key
        return name in self._raw or name in self._values

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._raw.keys() | self._values.keys()))

    def __len__(self) -> int:
        return len(self._raw.keys() | self._values.keys())

    def __bool__(self) -> bool:
        return bool(self._raw) or bool(self._values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, CooperationContext) and self.encode() == other.encode()

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"CooperationContext({self.to_builtins()!r})"

    def to_builtins(self) -> dict[str, Any]:
        """Plain JSON values by key name (for display and logs)."""
        encoded = self.encode()
        return {} if encoded is None else dict(msgspec.json.decode(encoded))

    # -- writing ---------------------------------------------------------------------------

    def __setitem__(self, key: AnyKey, value: Any) -> None:
        if isinstance(key, ContextKey):
            name = key.name
            if key.combine is not None and name in self:
                value = key.combine(self[key], value)
            self._keys[name] = key
        else:
            name = check_name("context key", key)
            typed = _COMBINING.get(name)
            if typed is not None:
                self[typed] = _as_type(typed, value)
                return
            self._keys.pop(name, None)
        self._raw[name] = _encode_value(name, value)
        self._values[name] = value

    def __delitem__(self, key: AnyKey) -> None:
        name = key.name if isinstance(key, ContextKey) else key
        if name not in self:
            raise KeyError(name)
        if name in _COMBINING:
            raise PayloadError(f"context key {name!r} can only be tightened, not removed")
        self._raw.pop(name, None)
        self._values.pop(name, None)
        self._keys.pop(name, None)

    def copy(self) -> CooperationContext:
        clone = CooperationContext()
        clone._raw = dict(self._raw)
        clone._values = dict(self._values)
        clone._keys = dict(self._keys)
        return clone

    def merged(self, other: CooperationContext | Mapping[Any, Any] | None) -> CooperationContext:
        """A copy of this context with `other` set on top (typed keys combine, others overwrite)."""
        result = self.copy()
        if other is None:
            return result
        if isinstance(other, CooperationContext):
            for name in other:
                key = other._keys.get(name)
                typed = self._keys.get(name) or _COMBINING.get(name)
                if key is not None:
                    result[key] = other[key]
                elif typed is not None:
                    result[typed] = msgspec.json.decode(other._raw_of(name), type=typed.type)
                else:
                    result._raw[name] = other._raw_of(name)
                    result._values.pop(name, None)
            return result
        for item_key, value in other.items():
            result[item_key] = value
        return result

    def _raw_of(self, name: str) -> bytes:
        if name in self._values:
            return _encode_value(name, self._values[name])
        return self._raw[name]

    # -- wire format -----------------------------------------------------------------------

    def encode(self) -> bytes | None:
        """The JSON object, keys sorted; `None` when empty (stored as SQL NULL)."""
        names = self._raw.keys() | self._values.keys()
        if not names:
            return None
        return _json.encode({name: msgspec.Raw(self._raw_of(name)) for name in names})

    @classmethod
    def decode(cls, data: bytes | str | None) -> CooperationContext:
        ctx = cls()
        if data:
            raw = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
            ctx._raw = {name: bytes(value) for name, value in raw.items()}
        return ctx

    @classmethod
    def coerce(cls, value: CooperationContext | Mapping[Any, Any] | None) -> CooperationContext:
        if value is None:
            return cls()
        if isinstance(value, CooperationContext):
            return value.copy()
        if isinstance(value, Mapping):
            return cls(value)
        raise PayloadError(
            f"context must be a CooperationContext or a mapping of keys to values, "
            f"not {type(value).__name__}"
        )
