"""docs/errors.md stays true: every row names a test that exists and asserts the row's message,
and the library really raises that message. (The behaviour itself is tested by the named tests.)"""

from __future__ import annotations

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent
# the package's source (library and tools) with adjacent string literals joined ("abc "\n    f"def" -> "abc def")
LIBRARY = re.sub(r"[\"']\s*\n\s*f?[\"']", "", "\n".join(p.read_text() for p in (ROOT / "ulysses_dtensor").rglob("*.py")))


def _rows():
    for line in (ROOT / "docs" / "errors.md").read_text().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            yield cells[0].strip("`"), cells[2], re.findall(r"`([^`]+)`", cells[3]), cells[4]


def test_every_row_of_docs_errors_is_tested_and_raised():
    rows = list(_rows())
    assert len(rows) >= 45, len(rows)
    assert len({case for case, *_ in rows}) == len(rows), "case names must be unique"
    for case, error, fragments, test in rows:
        file, func = test.split("::")
        source = (ROOT / "tests" / file).read_text()
        assert f"def {func}(" in source, f"{case}: {test} does not exist"
        for fragment in fragments:
            assert fragment in source, f"{case}: {file} never asserts {fragment!r}"
            if error.endswith("Error") and case != "no_process_group":  # torch's own message there
                assert fragment in LIBRARY, f"{case}: the library never raises {fragment!r}"
