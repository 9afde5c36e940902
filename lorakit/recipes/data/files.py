"""Local data files: CSV / JSONL / JSON (a list of objects) / Parquet, read into a list of rows."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

FILE_TYPES = (".csv", ".jsonl", ".json", ".parquet")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local CSV / JSONL / JSON (list of objects) / Parquet file."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"data file {str(path)!r} does not exist; check the path (data.source / data.validation / data.test)")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            return list(csv.DictReader(f))
    if suffix == ".jsonl":
        rows = []
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise LorakitError(f"{path}: line {number} is not valid JSON; write one JSON object per line") from None
        return rows
    if suffix == ".json":
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LorakitError(f"{path} is not valid JSON ({exc.msg}); write a list of objects") from None
        if not isinstance(rows, list):
            raise LorakitError(f"{path} must hold a JSON list of objects (or use .jsonl, one object per line)")
        return rows
    if suffix == ".parquet":
        if importlib.util.find_spec("pyarrow") is None:
            raise LorakitError("reading Parquet needs pyarrow; run `pip install pyarrow` or convert the file to CSV/JSONL")
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    raise LorakitError(f"data file {str(path)!r} has an unknown type; use one of {', '.join(FILE_TYPES)}")
