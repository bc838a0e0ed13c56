"""The named SQL statements: all of them used, none unknown, none changed by accident."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from scoopy.engine.queries import sources, statements

from .sql_snapshot import SNAPSHOT, fingerprints

ENGINE = Path(__file__).resolve().parent.parent / "scoopy" / "engine"


def engine_code() -> str:
    return "\n".join(path.read_text() for path in sorted(ENGINE.glob("*.py")))


def test_every_statement_is_used_by_the_engine() -> None:
    named = set(re.findall(r'\bsql\["(\w+)"\]', engine_code()))
    assert [name for name in statements("scoopy") if name not in named] == []


def test_every_statement_the_engine_names_exists() -> None:
    named = set(re.findall(r'\bsql\["(\w+)"\]', engine_code()))
    assert named, "the store names its statements as sql[...]"
    assert named - set(statements("scoopy")) == set()


def test_every_fragment_is_included_somewhere() -> None:
    texts = {name: text for name, (text, _) in sources().items()}
    fragments = [name for name in texts if name.startswith("_")]
    assert fragments
    for name in fragments:
        assert any("{" + name + "}" in text for other, text in texts.items() if other != name)


def test_the_text_sent_to_the_server_is_unchanged() -> None:
    """Plans (and the benchmarks' figures) depend on it; see tests/sql_snapshot.py."""
    assert fingerprints() == json.loads(SNAPSHOT.read_text())


def test_only_the_validated_schema_is_substituted() -> None:
    sql = statements("my_schema")["claim"]
    assert '"my_schema".run' in sql and "{" not in sql.replace("'{}'", "")
    with pytest.raises(ValueError, match="invalid schema name"):
        statements('x"; DROP TABLE run; --')
