"""A data set (train/test/eval.jsonl) written as one: a manifest written last lists the files with their sizes
and sha256, and readers refuse a folder whose files do not match it (a run killed half way)."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

from ..files import sha256, umask_mode
from .rows import DataError


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
        _write_json_atomic(
            out / MANIFEST,
            {
                "state": "complete",
                **about,
                "files": {
                    name: {"rows": n, "bytes": (out / name).stat().st_size, "sha256": sha256(out / name)}
                    for name, (_, n) in written.items()
                },
            },
        )
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
        raise DataError(
            f"{path.parent}: the data set was not written completely (a `finetune-phi data` run "
            f"stopped half way); re-run `finetune-phi data --out {path.parent}`"
        )
    entry = manifest.get("files", {}).get(path.name)
    if entry is None:
        return  # not one of the set's files
    if path.stat().st_size != entry["bytes"] or sha256(path) != entry["sha256"]:
        raise DataError(
            f"{path}: differs from the data set written with it; if you edited it on purpose, "
            f"delete {manifest_path}, else re-run `finetune-phi data --out {path.parent}`"
        )
