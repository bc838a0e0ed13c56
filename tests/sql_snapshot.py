"""The fingerprint of every SQL statement scoopy sends, to notice when one changes.

A statement's text decides its plan, and the benchmarks' figures with it: a change to one
should be deliberate. `tests/test_sql.py` compares the statements with the fingerprints in
`tests/data/sql_statements.json`; after changing a statement on purpose, run
`.venv/bin/python -m tests.sql_snapshot` and commit the file it writes.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from scoopy.engine.queries import statements

SNAPSHOT = Path(__file__).parent / "data" / "sql_statements.json"


def normalized(sql: str) -> str:
    """The text with comments dropped and whitespace collapsed (neither reaches the planner)."""
    sql = re.sub(r"^[ \t]*--.*\n?", "", sql, flags=re.MULTILINE)
    sql = re.sub(r"\s+", " ", sql).strip()
    return re.sub(r"\s*([(),])\s*", r"\1", sql)


def fingerprints(schema: str = "scoopy") -> dict[str, str]:
    return {
        name: hashlib.sha256(normalized(sql).encode()).hexdigest()[:16]
        for name, sql in sorted(statements(schema).items())
    }


def main() -> None:
    SNAPSHOT.write_text(json.dumps(fingerprints(), indent=1) + "\n")
    print(f"wrote {SNAPSHOT}")


if __name__ == "__main__":
    main()
