"""Chat data as people have it: UltraChat, OpenAI messages, ShareGPT and original UltraChat rows,
in jsonl/json/parquet, converted to the same UltraChat rows; the set lands together or not at all."""

import hashlib
import json
import subprocess
import sys

import pytest
from support import BIN, SHARED_ASSETS, ULTRACHAT40

from finetune_phi.data.prepare import prepare
from finetune_phi.data.read import read_jsonl
from finetune_phi.data.rows import DataError


MESSAGES1000 = SHARED_ASSETS / "ultrachat-sample" / "ultrachat1000-messages.jsonl"
needs_real_rows = pytest.mark.skipif(
    not (ULTRACHAT40.exists() and MESSAGES1000.exists()), reason="shared UltraChat rows not present"
)


def as_form(row: dict, form: str) -> dict:
    """A real UltraChat row written the way another tool would have it."""
    turns = row["messages"]
    if form == "messages":
        return {"messages": turns}
    if form == "sharegpt":
        return {
            "conversations": [
                {"from": {"user": "human", "assistant": "gpt"}[m["role"]], "value": m["content"]} for m in turns
            ]
        }
    return {"id": row["prompt_id"][:8], "data": [m["content"] for m in turns]}  # ultrachat-original


def write(path, rows):
    if path.suffix == ".parquet":
        import pandas as pd

        pd.DataFrame(rows).to_parquet(path)
    elif path.suffix == ".json":
        path.write_text(json.dumps(rows))
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@needs_real_rows
@pytest.mark.parametrize(
    "form, suffix",
    [("messages", ".jsonl"), ("sharegpt", ".json"), ("ultrachat-original", ".parquet"), ("messages", ".parquet")],
)
def test_each_form_converts_real_rows_to_the_same_ultrachat_rows(tmp_path, form, suffix):
    originals = read_jsonl(ULTRACHAT40)
    src = write(tmp_path / f"chats{suffix}", [as_form(r, form) for r in originals])
    result = prepare(str(src), tmp_path / "out")
    assert result.formats == {form: 40} and result.train + result.test == 40
    converted = {
        r["prompt_id"]: r for r in read_jsonl(tmp_path / "out/train.jsonl") + read_jsonl(tmp_path / "out/test.jsonl")
    }
    for original in originals:
        first_user = original["messages"][0]["content"]
        row = converted[hashlib.sha256(first_user.encode()).hexdigest()]  # UltraChat's own id rule
        assert row["messages"] == original["messages"] and row["prompt"] == first_user
        if first_user == original["prompt"]:
            assert row == original


@needs_real_rows
@pytest.mark.slow
def test_thousand_real_messages_only_rows_through_the_cli(tmp_path):
    done = subprocess.run(
        [str(BIN / "finetune-phi"), "data", "--source", str(MESSAGES1000), "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "1000 rows in messages form" in done.stdout
    train, test = read_jsonl(tmp_path / "train.jsonl"), read_jsonl(tmp_path / "test.jsonl")
    first_questions = {json.loads(line)["messages"][0]["content"] for line in MESSAGES1000.open()}
    assert len(train) + len(test) == len(first_questions)  # one row per prompt_id, repeats counted
    if len(first_questions) < 1000:
        assert f"dropped {1000 - len(first_questions)} rows" in done.stderr
    assert not {r["prompt_id"] for r in train} & {r["prompt_id"] for r in test}


@pytest.mark.slow
def test_duplicates_are_counted_not_dropped_silently(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": f"q{i % 11}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(20)
    ]  # 20 rows, 11 distinct first questions
    done = subprocess.run(
        [
            str(BIN / "finetune-phi"),
            "data",
            "--source",
            str(write(tmp_path / "c.jsonl", rows)),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and "dropped 9 rows whose prompt_id repeats" in done.stderr


def test_bom_is_accepted_and_bad_bytes_are_named_by_line(tmp_path):
    good = [
        json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]})
        for i in range(6)
    ]
    src = tmp_path / "c.jsonl"
    src.write_bytes(
        b"\xef\xbb\xbf"
        + "\n".join(good[:3]).encode()
        + b'\n{"messages": "\xff\xfe"}\n'
        + "\n".join(good[3:]).encode()
        + b"\n"
    )
    with pytest.raises(DataError, match=rf"{src}:4: not valid UTF-8 \(byte 0xff"):
        prepare(str(src), tmp_path / "o")
    result = prepare(str(src), tmp_path / "o", skip_invalid=True)
    assert result.train + result.test == 6 and len(result.skipped) == 1 and f"{src}:4" in result.skipped[0]


def test_unknown_form_is_named(tmp_path):
    with pytest.raises(DataError, match=r"c.jsonl:1: not a chat row I know \(keys \['text'\]\)"):
        prepare(str(write(tmp_path / "c.jsonl", [{"text": "hello"}])), tmp_path / "o")


# A run killed between writing two files must not leave a new train split beside an old test split.
KILL_AFTER_FIRST_RENAME = """
import os, sys
real_replace = os.replace
def replace(src, dst):
    real_replace(src, dst)
    if str(dst).endswith("train.jsonl"):
        os._exit(9)  # killed: train.jsonl is new, test.jsonl and eval.jsonl are the old ones
os.replace = replace
from finetune_phi.data.prepare import prepare
prepare("sample", sys.argv[1], seed=int(sys.argv[2]))
"""


@pytest.mark.slow
def test_killed_between_files_the_set_is_refused_and_the_next_run_repairs_it(tmp_path):
    out = tmp_path / "data"
    prepare("sample", out, seed=1)
    done = subprocess.run([sys.executable, "-c", KILL_AFTER_FIRST_RENAME, str(out), "2"], timeout=120)
    assert done.returncode == 9
    leftovers = [p.name for p in out.glob(".*.tmp")]
    assert leftovers  # the killed run's temp files for test/eval
    for name in ("train.jsonl", "test.jsonl", "eval.jsonl"):
        with pytest.raises(DataError, match="was not written completely"):
            read_jsonl(out / name)
    train = subprocess.run(
        [str(BIN / "finetune-phi"), "train", "--base-model", "tiny", "--data", str(out), "--out", str(tmp_path / "m")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode != 0 and "was not written completely" in train.stderr and "Traceback" not in train.stderr
    prepare("sample", out, seed=2)  # the next run cleans up and writes a consistent set
    assert not list(out.glob(".*.tmp"))
    train_ids = {r["prompt_id"] for r in read_jsonl(out / "train.jsonl")}
    assert not train_ids & {r["prompt_id"] for r in read_jsonl(out / "test.jsonl")}


def test_a_failing_third_write_changes_nothing(tmp_path, monkeypatch):
    from finetune_phi.data import dataset as prepare_module  # where the set is written

    out = tmp_path / "data"
    prepare("sample", out, seed=1)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = prepare_module._write_temp

    def full_disk(folder, name, rows):
        if name == "eval.jsonl":
            raise OSError(28, "No space left on device")
        return real(folder, name, rows)

    monkeypatch.setattr(prepare_module, "_write_temp", full_disk)
    with pytest.raises(DataError, match="No space left on device"):
        prepare("sample", out, seed=2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # no temp file left, old set intact


def test_a_file_changed_after_the_set_was_written_is_refused(tmp_path):
    prepare("sample", tmp_path, seed=1)
    with (tmp_path / "test.jsonl").open("a") as f:
        f.write(json.dumps(read_jsonl(tmp_path / "train.jsonl")[0]) + "\n")  # a train row leaks into test
    with pytest.raises(DataError, match="differs from the data set written with it"):
        read_jsonl(tmp_path / "test.jsonl")
