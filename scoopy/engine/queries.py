"""Every SQL statement scoopy runs, read once from the named statements in `engine/sql/`.

Each `.sql` file holds statements that begin with a `-- name: NAME` line. A name starting
with `_` is a fragment: statements include it as `{_name}`. The only other placeholders are
`{q}`, the schema quoted as an identifier, `{schema}`, its validated name for use inside
literals, and names a statement sets for the fragments it includes (a `-- set NAME: text`
line); the schema is checked (`check_schema`) before it is substituted, and nothing else is
ever spliced into SQL text. Whole-line comments are stripped, so the files can say why a
statement is shaped the way it is without that text travelling to the server.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from importlib import resources

from ..errors import check_schema

_NAME = re.compile(r"^-- name: (\w+)[ \t]*$", re.MULTILINE)
_SET = re.compile(r"^-- set (\w+):[ \t]*(.*?)[ \t]*$", re.MULTILINE)
_SLOT = re.compile(r"\{(\w+)\}")
_COMMENT = re.compile(r"^[ \t]*--.*\n?", re.MULTILINE)


@functools.cache
def sources() -> Mapping[str, tuple[str, Mapping[str, str]]]:
    """Each statement and fragment by name, as written in the files (placeholders left in),
    with the values its `-- set NAME: value` lines give placeholders within it."""
    found: dict[str, tuple[str, Mapping[str, str]]] = {}
    for entry in sorted(resources.files(__package__).joinpath("sql").iterdir(), key=str):
        if not entry.name.endswith(".sql"):
            continue
        parts = _NAME.split(entry.read_text(encoding="utf-8"))
        for name, body in zip(parts[1::2], parts[2::2], strict=True):
            if name in found:
                raise RuntimeError(f"SQL statement {name!r} is defined twice (in {entry.name})")
            found[name] = (_COMMENT.sub("", body).strip(), dict(_SET.findall(body)))
    return found


def statements(schema: str) -> dict[str, str]:
    """Every statement (fragments resolved) for one schema."""
    values = {"q": '"' + check_schema(schema) + '"', "schema": schema}
    source = sources()

    def resolve(name: str, local: Mapping[str, str], seen: tuple[str, ...]) -> str:
        if name in seen:
            raise RuntimeError(f"SQL fragment {name!r} includes itself")
        text, own = source[name]
        scope = {**local, **own}

        def fill(slot: re.Match[str]) -> str:
            key = slot.group(1)
            if key in values:
                return values[key]
            if key in scope:
                return scope[key]
            if key.startswith("_") and key in source:
                return resolve(key, scope, (*seen, name))
            raise RuntimeError(f"SQL statement {name!r} uses an unknown placeholder {{{key}}}")

        return _SLOT.sub(fill, text)

    return {name: resolve(name, {}, ()) for name in source if not name.startswith("_")}
