"""UltraChat rows: read chat data as people have it, validate, split, derive eval rows, write as one set.

A row follows the HuggingFaceH4/ultrachat_200k schema:
    {"prompt": str, "prompt_id": str, "messages": [{"role": ..., "content": ...}, ...]}
Input files may also hold OpenAI `messages`-only rows, ShareGPT `conversations` or the original
UltraChat `{"id", "data": [...]}` rows; each file's form is detected from its first row and its rows
converted (formats.py). train/test/eval are written as one set: a manifest written last lists
them, and readers refuse a folder whose files do not match it (a run killed half way).
Everything here is plain Python (no datasets/pandas import) so it loads fast; the hub and
parquet readers import their libraries only when used.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import UserError
from ..files import umask_mode

ROLES = ("system", "user", "assistant")
ULTRACHAT_HUB_ID = "HuggingFaceH4/ultrachat_200k"


class DataError(UserError, ValueError):
    """A bad input row or file; the message names the file and line."""


@dataclass
class SourceLine:
    """One record as read from a source (a file line, a parquet row, a hub row), with where it came from."""
    where: str  # "file:line" for error messages
    data: object
    error: str | None = None  # a line that could not be read at all (bad bytes, bad JSON)


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
        except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a damaged file
            raise DataError(f"{path}: not a readable parquet file ({e})") from None
        for i, record in enumerate(frame.to_dict(orient="records"), start=1):
            yield SourceLine(f"{path}:row {i}", _plain(record))
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
                    yield SourceLine(where, None, f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})")
                    continue
                if not line.strip():
                    continue
                try:
                    yield SourceLine(where, json.loads(line))
                except json.JSONDecodeError as e:
                    yield SourceLine(where, None, f"{where}: invalid JSON ({e.msg} at column {e.colno})")
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


def load_valid(rows: Iterable[SourceLine], skip_invalid: bool = False, convert=None) -> tuple[list[dict], list[str]]:
    """Validate rows (converted to UltraChat rows by `convert` first, if given); raise on the first
    bad one, or skip them when asked and return the errors."""
    good, errors = [], []
    for row in rows:
        try:
            if row.error:
                raise DataError(row.error)
            data = convert(row.data, row.where) if convert else row.data
            good.append(validate_row(data, row.where))
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


MANIFEST = "dataset.json"  # written last: lists the set's files with their sizes and sha256
SET_FILES = ("train.jsonl", "test.jsonl", "eval.jsonl")


def _mkstemp(prefix: str, folder: Path) -> tuple[int, str]:
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=folder)
    os.fchmod(fd, umask_mode())  # the file the user gets follows their umask, as if written in place
    return fd, tmp


def _write_temp(folder: Path, name: str, rows: Iterable[dict]) -> tuple[Path, int]:
    """Rows as JSON lines in a temp file beside `name`, flushed to disk: (temp path, row count)."""
    fd, tmp = _mkstemp(f".{name}.", folder)
    count = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
                count += 1
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Path(tmp), count


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _write_json_atomic(path: Path, value: dict):
    fd, tmp = _mkstemp(f".{path.name}.", path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_set(out: Path, files: dict[str, list[dict]], about: dict) -> dict[str, int]:
    """Write train/test/eval so that they land together or not at all, as far as readers can tell.

    Every file is first written whole to a temp file. Then the manifest is marked "writing", the
    files are renamed into place, and the manifest is rewritten "complete" with each file's size
    and sha256. A run killed between two renames leaves a "writing" manifest, which readers refuse
    (check_set_member), so a new train split is never used beside an old test split. A rename or
    write that fails (a full disk, an immutable file) puts the previous set back, byte for byte, so
    readers that know nothing of the manifest (`pf run create --data`, pandas) never see a mix either.
    """
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temp_files(out)
    written: dict[str, tuple[Path, int]] = {}
    previous: dict[str, Path] = {}  # name -> a hard link to the file it replaces, until the set is complete
    replacing = False  # from the "writing" manifest on, the set in place changes: a failure puts it back
    try:
        for name, rows in files.items():
            written[name] = _write_temp(out, name, rows)
        for name in (*written, MANIFEST):
            if (out / name).exists():
                previous[name] = out / f".{name}.previous.tmp"
                os.link(out / name, previous[name])
        replacing = True
        _write_json_atomic(out / MANIFEST, {"state": "writing", "files": {}})
        for name, (tmp, _) in written.items():
            os.replace(tmp, out / name)
        _write_json_atomic(out / MANIFEST, {
            "state": "complete", **about,
            "files": {name: {"rows": n, "bytes": (out / name).stat().st_size, "sha256": _sha256(out / name)}
                      for name, (_, n) in written.items()}})
    except BaseException:
        for name in (*written, MANIFEST) if replacing else ():  # the previous set back; files it lacked removed
            with contextlib.suppress(OSError):  # one that cannot be put back must not stop the others
                if name in previous:
                    os.replace(previous[name], out / name)
                elif name == MANIFEST or not written[name][0].exists():
                    (out / name).unlink(missing_ok=True)
        for tmp, _ in written.values():
            tmp.unlink(missing_ok=True)
        raise
    finally:
        for link in previous.values():
            link.unlink(missing_ok=True)
    return {name: n for name, (_, n) in written.items()}


def remove_stale_temp_files(folder: Path) -> list[Path]:
    """Temp files a killed run left beside the set (.train.jsonl.*.tmp, ...): removed at the next run."""
    stale = [p for name in (*SET_FILES, MANIFEST) for p in folder.glob(f".{name}.*.tmp")]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def check_set_member(path: str | Path):
    """Refuse a file of a set whose writing did not finish, or that changed since (a DataError).

    A file in a folder without a manifest (data you made yourself) is taken as it is.
    """
    path = Path(path)
    manifest_path = path.parent / MANIFEST
    if not manifest_path.exists():
        return
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise DataError(f"{manifest_path}: unreadable ({e}); re-run `finetune-phi data --out {path.parent}`") from None
    if manifest.get("state") != "complete":
        raise DataError(f"{path.parent}: the data set was not written completely (a `finetune-phi data` run "
                        f"stopped half way); re-run `finetune-phi data --out {path.parent}`")
    entry = manifest.get("files", {}).get(path.name)
    if entry is None:
        return  # not one of the set's files
    if path.stat().st_size != entry["bytes"] or _sha256(path) != entry["sha256"]:
        raise DataError(f"{path}: differs from the data set written with it; if you edited it on purpose, "
                        f"delete {manifest_path}, else re-run `finetune-phi data --out {path.parent}`")


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


def load_hub_rows(split: str, dataset: str = ULTRACHAT_HUB_ID) -> list[SourceLine]:
    """Rows of the hub dataset (needs network or a populated HF cache)."""
    import datasets  # lazy: slow import

    try:
        ds = datasets.load_dataset(dataset, split=split)
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        # offline with nothing cached, no network, a split that does not exist: say which and what to do
        offline = "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set and " if (
            os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE")) else ""
        raise DataError(f"cannot load {dataset} (split {split}) from the Hugging Face Hub: {offline}"
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Download it once with "
                        "network (it is cached), or give a local file: `finetune-phi data --source PATH`") from None
    return [SourceLine(f"{dataset}[{split}]:row {i}", _plain(r)) for i, r in enumerate(ds, start=1)]


@dataclass
class PrepareResult:
    train: int
    test: int
    eval: int
    skipped: list[str]
    out: Path
    duplicates: int = 0  # rows dropped because their prompt_id repeats an earlier row's
    formats: dict[str, int] = field(default_factory=dict)  # input form -> rows read in it


def read_source(path: str | Path, skip_invalid: bool = False) -> tuple[list[dict], list[str], str]:
    """UltraChat rows of a local file in any of the forms formats.py knows: (rows, errors, form)."""
    from . import formats

    raw = list(iter_file(path))
    first = next((r for r in raw if not r.error), None)
    if first is None:
        if raw and not skip_invalid:
            raise DataError(raw[0].error)
        raise DataError(f"{path}: no rows")
    form = formats.detect(first.data, first.where)
    rows, errors = load_valid(raw, skip_invalid, formats.CONVERTERS[form])
    return rows, errors, form


def prepare(source: str, out: str | Path, split: str = "train_sft[:1%]", test_split: str | None = None,
            test_size: float = 0.2, seed: int = 0, skip_invalid: bool = False, sample_size: int = 600) -> PrepareResult:
    """Make data/train.jsonl, test.jsonl and eval.jsonl (and the manifest) from a source.

    source: "ultrachat" (the hub dataset, `split`, optionally `test_split` as the test set),
    "sample" (the offline generated sample) or a path to a chat jsonl/json/parquet (formats.py).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; give a folder")
    if source == "sample":
        from .sample import generate_sample

        raw = [SourceLine(f"sample:{i}", r) for i, r in enumerate(generate_sample(sample_size, seed=seed), start=1)]
        (rows, errors), form = load_valid(raw, skip_invalid), "ultrachat"
    elif source == "ultrachat":
        (rows, errors), form = load_valid(load_hub_rows(split), skip_invalid), "ultrachat"
    else:
        rows, errors, form = read_source(source, skip_invalid)
    formats = {form: len(rows)}
    rows, duplicates = _dedupe(rows)
    if source == "ultrachat" and test_split:
        train = rows
        test_ids = {r["prompt_id"] for r in train}
        test_rows, test_errors = load_valid(load_hub_rows(test_split), skip_invalid)
        errors += test_errors
        test_rows, test_duplicates = _dedupe(test_rows)
        duplicates += test_duplicates
        test = [r for r in test_rows if r["prompt_id"] not in test_ids]
    else:
        train, test = split_rows(rows, test_size, seed)
    if not train or not test:
        raise DataError(f"{source}: {len(rows)} valid rows is too few to make both a train and a test split")
    evals = [eval_row(r) for r in test]
    about = {"source": str(source), "split": split, "test_split": test_split, "test_size": test_size, "seed": seed}
    try:
        write_set(out, {"train.jsonl": train, "test.jsonl": test, "eval.jsonl": evals}, about)
    except OSError as e:
        raise DataError(f"--out {out}: cannot write the data set ({e.strerror or e}); nothing was changed "
                        "unless the files were being renamed, in which case re-run") from None
    return PrepareResult(len(train), len(test), len(evals), errors, out, duplicates, formats)


def _dedupe(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the first row of each prompt_id (the hub data holds a few repeats); (rows, dropped count)."""
    seen, kept = set(), []
    for r in rows:
        if r["prompt_id"] not in seen:
            seen.add(r["prompt_id"])
            kept.append(r)
    return kept, len(rows) - len(kept)
