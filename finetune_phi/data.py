"""UltraChat rows: read, validate, split into train/test, derive eval rows, write atomically.

A row follows the HuggingFaceH4/ultrachat_200k schema:
    {"prompt": str, "prompt_id": str, "messages": [{"role": ..., "content": ...}, ...]}
Everything here is plain Python (no datasets/pandas import) so it loads fast; the hub and
parquet readers import their libraries only when used.
"""
from __future__ import annotations

import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

ROLES = ("system", "user", "assistant")
ULTRACHAT_HUB_ID = "HuggingFaceH4/ultrachat_200k"


class DataError(ValueError):
    """A bad input row or file; the message names the file and line."""


@dataclass
class Row:
    where: str  # "file:line" for error messages
    data: dict


def validate_row(row: object, where: str) -> dict:
    """Return the row if it is a valid UltraChat row, else raise DataError naming `where`."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    for key in ("prompt", "prompt_id", "messages"):
        if key not in row:
            raise DataError(f"{where}: missing key {key!r}")
    if not isinstance(row["prompt_id"], str) or not row["prompt_id"].strip():
        raise DataError(f"{where}: 'prompt_id' must be a non-empty string")
    if not isinstance(row["prompt"], str):
        raise DataError(f"{where}: 'prompt' must be a string")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise DataError(f"{where}: messages[{i}] needs 'role' and 'content'")
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: messages[{i}] has unknown role {message['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(message["content"], str) or not message["content"].strip():
            raise DataError(f"{where}: messages[{i}] ({message['role']}) has empty content")
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant reply in 'messages'")
    if not any(m["role"] == "user" for m in messages):
        raise DataError(f"{where}: no user turn in 'messages'")
    return row


def iter_file(path: str | Path) -> Iterator[Row]:
    """Yield raw rows of a .jsonl, .json (a list of rows) or .parquet file with their location."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pandas as pd  # lazy: heavy import

        for i, record in enumerate(pd.read_parquet(path).to_dict(orient="records"), start=1):
            yield Row(f"{path}:row {i}", _plain(record))
    elif suffix == ".json":
        try:
            records = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
        if not isinstance(records, list):
            raise DataError(f"{path}: expected a JSON list of rows")
        for i, record in enumerate(records, start=1):
            yield Row(f"{path}:item {i}", record)
    elif suffix == ".jsonl":
        with path.open(encoding="utf-8") as f:
            for lineno, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    yield Row(f"{path}:{lineno}", json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
    else:
        raise DataError(f"{path}: unsupported file type {suffix!r} (use .jsonl, .json or .parquet)")


def _plain(value):
    """numpy arrays/scalars from parquet -> plain lists/str so rows serialise as JSON."""
    if hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def load_valid(rows: Iterable[Row], skip_invalid: bool = False) -> tuple[list[dict], list[str]]:
    """Validate rows; raise on the first bad one, or skip them when asked and return the errors."""
    good, errors = [], []
    for row in rows:
        try:
            good.append(validate_row(row.data, row.where))
        except DataError as e:
            if not skip_invalid:
                raise
            errors.append(str(e))
    return good, errors


def split_rows(rows: list[dict], test_size: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Deterministic split by prompt_id: every row of one prompt_id lands in the same split."""
    if not 0 < test_size < 1:
        raise DataError(f"--test-size must be between 0 and 1, got {test_size}")
    ids = sorted({r["prompt_id"] for r in rows})
    random.Random(seed).shuffle(ids)
    n_test = max(1, round(len(ids) * test_size)) if len(ids) > 1 else 0
    test_ids = set(ids[:n_test])
    train = [r for r in rows if r["prompt_id"] not in test_ids]
    test = [r for r in rows if r["prompt_id"] in test_ids]
    return train, test


def eval_row(row: dict) -> dict:
    """One batch-run row: the last user turn before the final assistant turn, and what came before.

    chat_history uses Prompt flow's shape: [{"inputs": {"question": u}, "outputs": {"answer": a}}].
    System turns have no place in that shape and are left out; consecutive turns of one role are
    joined so user/assistant pairs stay aligned.
    """
    turns = [m for m in row["messages"] if m["role"] != "system"]
    while turns and turns[-1]["role"] != "assistant":
        turns = turns[:-1]  # a trailing user turn has no reference answer
    merged: list[dict] = []
    for m in turns:
        if merged and merged[-1]["role"] == m["role"]:
            merged[-1] = {"role": m["role"], "content": merged[-1]["content"] + "\n" + m["content"]}
        else:
            merged.append(dict(m))
    if merged and merged[0]["role"] == "assistant":
        merged = merged[1:]  # an opening assistant turn answers no question
    if len(merged) < 2:
        raise DataError(f"prompt_id {row['prompt_id']}: no user turn followed by an assistant reply")
    pairs = [(merged[i]["content"], merged[i + 1]["content"]) for i in range(0, len(merged) - 1, 2)]
    history = [{"inputs": {"question": q}, "outputs": {"answer": a}} for q, a in pairs[:-1]]
    question, answer = pairs[-1]
    return {"prompt_id": row["prompt_id"], "question": question, "chat_history": history, "ground_truth": answer}


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict]) -> int:
    """Write rows as JSON lines to a temp file in the same folder, then rename: never a half file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return count


def read_jsonl(path: str | Path) -> list[dict]:
    """Read a jsonl file the project wrote (train/test/eval), naming the line of any bad JSON."""
    return [row.data for row in iter_file(path)]


def load_hub_rows(split: str, dataset: str = ULTRACHAT_HUB_ID) -> list[Row]:
    """Rows of the hub dataset (needs network or a populated HF cache)."""
    import datasets  # lazy: slow import

    ds = datasets.load_dataset(dataset, split=split)
    return [Row(f"{dataset}[{split}]:row {i}", _plain(r)) for i, r in enumerate(ds, start=1)]


@dataclass
class PrepareResult:
    train: int
    test: int
    eval: int
    skipped: list[str]
    out: Path


def prepare(source: str, out: str | Path, split: str = "train_sft[:1%]", test_split: str | None = None,
            test_size: float = 0.2, seed: int = 0, skip_invalid: bool = False, sample_size: int = 600) -> PrepareResult:
    """Make data/train.jsonl, test.jsonl and eval.jsonl from a source.

    source: "ultrachat" (the hub dataset, `split`, optionally `test_split` as the test set),
    "sample" (the offline generated sample) or a path to an UltraChat-format jsonl/json/parquet.
    """
    out = Path(out)
    if source == "sample":
        from .sample import generate_sample

        raw = [Row(f"sample:{i}", r) for i, r in enumerate(generate_sample(sample_size, seed=seed), start=1)]
    elif source == "ultrachat":
        raw = load_hub_rows(split)
    else:
        raw = list(iter_file(source))
    rows, errors = load_valid(raw, skip_invalid)
    rows = _dedupe(rows)
    if source == "ultrachat" and test_split:
        train = rows
        test_ids = {r["prompt_id"] for r in train}
        test_rows, test_errors = load_valid(load_hub_rows(test_split), skip_invalid)
        errors += test_errors
        test = [r for r in _dedupe(test_rows) if r["prompt_id"] not in test_ids]
    else:
        train, test = split_rows(rows, test_size, seed)
    if not train or not test:
        raise DataError(f"{source}: {len(rows)} valid rows is too few to make both a train and a test split")
    evals = [eval_row(r) for r in test]
    write_jsonl_atomic(out / "train.jsonl", train)
    write_jsonl_atomic(out / "test.jsonl", test)
    write_jsonl_atomic(out / "eval.jsonl", evals)
    return PrepareResult(len(train), len(test), len(evals), errors, out)


def _dedupe(rows: list[dict]) -> list[dict]:
    """Keep the first row of each prompt_id (the hub data holds a few repeats)."""
    seen, kept = set(), []
    for r in rows:
        if r["prompt_id"] not in seen:
            seen.add(r["prompt_id"])
            kept.append(r)
    return kept
