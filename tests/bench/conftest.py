"""Every bench test writes only under its own tmp_path: bench/results/ (the committed results and their run
ledger) must come out of a test as it went in."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

RESULTS = Path(__file__).resolve().parents[2] / "bench" / "results"
TMP = str(Path(tempfile.gettempdir()).resolve())


def _a_tests(path: Path) -> bool:
    """A result file, or a ledger record of a run trained under the temporary directory (a test's tmp_path).
    Runner processes write parts/ and ledger records of their own runs while tests run: not a test's doing."""
    rel = path.relative_to(RESULTS).parts
    if rel[0] == "parts":
        return False
    if rel[0] != "runs":
        return True
    try:
        return str(json.loads(path.read_text())["spec"]["output"]["dir"]).startswith(TMP)
    except (OSError, ValueError, KeyError, TypeError):
        return True


def _listing() -> dict[str, int]:
    return {str(p.relative_to(RESULTS)): p.stat().st_mtime_ns for p in RESULTS.rglob("*") if p.is_file() and _a_tests(p)}


@pytest.fixture(autouse=True)
def results_left_alone():
    before = _listing()
    yield
    after = _listing()
    changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
    assert not changed, f"a test wrote into bench/results/: {changed[:5]}; point quality.RESULTS at tmp_path"
