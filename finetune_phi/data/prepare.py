"""`finetune-phi data`: read chat data as people have it, split it, derive eval rows, write train/test/eval as one set.

Input files may hold UltraChat rows (rows.py), OpenAI `messages`-only rows, ShareGPT `conversations` or the
original UltraChat `{"id", "data": [...]}` rows; each file's form is detected from its first row and its rows
converted (formats.py). The set is written by dataset.write_set. Plain Python (no datasets/pandas import) so it
loads fast; the hub and parquet readers import their libraries only when used.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, field
from pathlib import Path

from . import formats
from .dataset import write_set
from .read import iter_file, plain
from .rows import DataError, SourceLine, eval_row, load_valid
from .sample import generate_sample


ULTRACHAT_HUB_ID = "HuggingFaceH4/ultrachat_200k"


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


def load_hub_rows(split: str, dataset: str = ULTRACHAT_HUB_ID) -> list[SourceLine]:
    """Rows of the hub dataset (needs network or a populated HF cache)."""
    import datasets  # lazy: slow import

    try:
        ds = datasets.load_dataset(dataset, split=split)
    except (ConnectionError, OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        # offline with nothing cached, no network, a split that does not exist: say which and what to do
        offline = (
            "HF_HUB_OFFLINE or HF_DATASETS_OFFLINE is set and "
            if (os.environ.get("HF_HUB_OFFLINE") or os.environ.get("HF_DATASETS_OFFLINE"))
            else ""
        )
        raise DataError(
            f"cannot load {dataset} (split {split}) from the Hugging Face Hub: {offline}"
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. Download it once with "
            "network (it is cached), or give a local file: `finetune-phi data --source PATH`"
        ) from None
    return [SourceLine(f"{dataset}[{split}]:row {i}", plain(r)) for i, r in enumerate(ds, start=1)]


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
    raw = list(iter_file(path))
    first = next((r for r in raw if not r.error), None)
    if first is None:
        if raw and not skip_invalid:
            raise DataError(raw[0].error)
        raise DataError(f"{path}: no rows")
    form = formats.detect(first.data, first.where)
    rows, errors = load_valid(raw, skip_invalid, formats.CONVERTERS[form])
    return rows, errors, form


def prepare(
    source: str,
    out: str | Path,
    split: str = "train_sft[:1%]",
    test_split: str | None = None,
    test_size: float = 0.2,
    seed: int = 0,
    skip_invalid: bool = False,
    sample_size: int = 600,
) -> PrepareResult:
    """Make data/train.jsonl, test.jsonl and eval.jsonl (and the manifest) from a source.

    source: "ultrachat" (the hub dataset, `split`, optionally `test_split` as the test set),
    "sample" (the offline generated sample) or a path to a chat jsonl/json/parquet (formats.py).
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DataError(f"--out {out}: is a file; give a folder")
    if source == "sample":
        raw = [SourceLine(f"sample:{i}", r) for i, r in enumerate(generate_sample(sample_size, seed=seed), start=1)]
        (rows, errors), form = load_valid(raw, skip_invalid), "ultrachat"
    elif source == "ultrachat":
        (rows, errors), form = load_valid(load_hub_rows(split), skip_invalid), "ultrachat"
    else:
        rows, errors, form = read_source(source, skip_invalid)
    forms = {form: len(rows)}
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
        raise DataError(
            f"--out {out}: cannot write the data set ({e.strerror or e}); nothing was changed "
            "unless the files were being renamed, in which case re-run"
        ) from None
    return PrepareResult(len(train), len(test), len(evals), errors, out, duplicates, forms)


def _dedupe(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the first row of each prompt_id (the hub data holds a few repeats); (rows, dropped count)."""
    seen, kept = set(), []
    for r in rows:
        if r["prompt_id"] not in seen:
            seen.add(r["prompt_id"])
            kept.append(r)
    return kept, len(rows) - len(kept)
