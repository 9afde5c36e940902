"""Local data files: CSV / JSONL / JSON (a list of objects) / Parquet, read into a list of rows.

Every way a file can be off (not UTF-8, a line that is not an object, not Parquet at all, a
folder) is one LorakitError naming the file, the place and the fix."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path
from typing import Any, Callable

from lorakit.errors import LorakitError

FILE_TYPES = (".csv", ".jsonl", ".json", ".parquet")


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a local CSV / JSONL / JSON (list of objects) / Parquet file."""
    path = Path(path)
    if path.is_dir():
        raise LorakitError(f"data path {str(path)!r} is a folder; give a {'/'.join(FILE_TYPES)} file "
                           "(data.source / data.validation / data.test)")
    if not path.is_file():
        raise LorakitError(f"data file {str(path)!r} does not exist; check the path (data.source / data.validation / data.test)")
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise LorakitError(f"data file {str(path)!r} has an unknown type; use one of {', '.join(FILE_TYPES)}")
    try:
        rows = reader(path)
    except UnicodeDecodeError:
        raise LorakitError(_not_utf8(path)) from None
    return rows


def _not_utf8(path: Path) -> str:
    """Where ``path`` stops being UTF-8 (a text reader's error counts from the chunk it decoded, not the file)."""
    data = path.read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        return (f"{path}: line {line} is not UTF-8 (byte 0x{data[exc.start]:02x}); "
                "save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    return f"{path} is not UTF-8; save the file as UTF-8"


def _csv(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise LorakitError(f"{path}: line {number} is not valid JSON; write one JSON object per line") from None
                if not isinstance(row, dict):
                    raise LorakitError(f"{path}: line {number} is a JSON {type(row).__name__}, not an object of columns; "
                                       'write one JSON object per line, e.g. {"text": ..., "label": ...}')
                rows.append(row)
    return rows


def _json(path: Path) -> list[dict[str, Any]]:
    try:
        rows = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LorakitError(f"{path} is not valid JSON ({exc.msg}); write a list of objects") from None
    if not isinstance(rows, list):
        raise LorakitError(f"{path} must hold a JSON list of objects (or use .jsonl, one object per line)")
    for number, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise LorakitError(f"{path}: entry {number} is a JSON {type(row).__name__}, not an object of columns; "
                               'write one object per example, e.g. {"text": ..., "label": ...}')
    return rows


def _parquet(path: Path) -> list[dict[str, Any]]:
    if importlib.util.find_spec("pyarrow") is None:
        raise LorakitError("reading Parquet needs pyarrow; run `pip install pyarrow` or convert the file to CSV/JSONL")
    import pyarrow
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path).to_pylist()
    except pyarrow.ArrowException as exc:
        raise LorakitError(f"{path} is not a readable Parquet file ({str(exc).splitlines()[0]}); "
                           "check the file or give it its real extension (.csv, .jsonl, .json)") from None


READERS: dict[str, Callable[[Path], list[dict[str, Any]]]] = {".csv": _csv, ".jsonl": _jsonl, ".json": _json, ".parquet": _parquet}
