"""Every complete program in README.md runs and passes its own assertions."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .helpers import ROOT

_BLOCK = re.compile(r"```python\n(.*?)```", re.DOTALL)


def programs() -> list[tuple[str, str]]:
    """(first heading above it, source) of each block that runs itself."""
    text = (ROOT / "README.md").read_text()
    found = []
    for match in _BLOCK.finditer(text):
        source = match.group(1)
        if "asyncio.run(main())" not in source:
            continue
        heading = re.findall(r"^#+ (.+)$", text[: match.start()], re.MULTILINE)[-1]
        found.append((heading, source))
    return found


EXAMPLES = programs()


def test_the_readme_has_runnable_examples() -> None:
    assert len(EXAMPLES) >= 12


@pytest.mark.parametrize(("heading", "source"), EXAMPLES, ids=[h for h, _ in EXAMPLES])
def test_readme_example_runs(heading: str, source: str, dsn: str, schema: str) -> None:
    env = {**os.environ, "SCOOPY_DSN": dsn, "SCOOPY_SCHEMA": schema}
    result = subprocess.run(
        [sys.executable, "-c", source],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, f"{heading}:\n{result.stdout}\n{result.stderr}"
