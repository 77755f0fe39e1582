"""The one door for reading chat data files: raw records with their location (iter_file), the rows of a file the
project wrote (read_jsonl), and validated UltraChat conversations (read_conversations). Files of a set that
`finetune-phi data` wrote are checked against the set's manifest first (dataset.check_set_member).
Plain Python: pandas is imported only for a parquet file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from .dataset import check_set_member
from .rows import DataError, SourceLine, load_valid


def iter_file(path: str | Path) -> Iterator[SourceLine]:
    """Yield raw rows of a .jsonl, .json (a list of rows) or .parquet file with their location.

    A UTF-8 byte-order mark is accepted; a line that is not UTF-8 or not JSON comes as a SourceLine with
    `error` set, so `--skip-invalid` can skip it like any other bad row.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    if path.is_dir():
        raise DataError(f"{path}: is a folder; give a .jsonl, .json or .parquet file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd  # lazy: heavy import

        try:
            frame = pd.read_parquet(path)
        except Exception as e:  # pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        for i, record in enumerate(frame.to_dict(orient="records"), start=1):
            yield SourceLine(f"{path}:row {i}", plain(record))
    elif suffix == ".json":
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = raw.count(b"\n", 0, e.start) + 1
            raise DataError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[e.start]:02x})") from None
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        for i, record in enumerate(records, start=1):
            yield SourceLine(f"{path}:item {i}", record)
    elif suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                try:
                    line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
                except UnicodeDecodeError as e:
                    yield SourceLine(
                        where, None, f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                    )
                    continue
                if not line.strip():
                    continue
                try:
                    yield SourceLine(where, json.loads(line))
                except json.JSONDecodeError as e:
                    yield SourceLine(where, None, f"{where}: invalid JSON ({e.msg} at column {e.colno})")
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")


def plain(value):
    """numpy arrays/scalars from parquet -> plain lists/str so rows serialise as JSON."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a jsonl file the project wrote (train/test/eval), naming the line of any bad JSON.

    A file of a set that `finetune-phi data` wrote is checked against the set's manifest first.
    """
    check_set_member(path)
    rows = []
    for row in iter_file(path):
        if row.error:
            raise DataError(row.error)
        rows.append(row.data)
    return rows


def read_conversations(path: str | Path) -> list[dict]:
    """The UltraChat rows of a file, each validated (a DataError naming the file and line on the first bad one);
    a set member is checked against its manifest first, so a train split from one `data` run is never used
    beside a test split from another."""
    check_set_member(path)
    rows, _ = load_valid(iter_file(path))
    return rows
