import json
import subprocess

import pytest
from support import BIN, ULTRACHAT40

from finetune_phi.data.prepare import prepare, split_rows
from finetune_phi.data.read import read_jsonl
from finetune_phi.data.rows import DataError, eval_row
from finetune_phi.data.sample import generate_sample


def write_lines(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def good(i=0, messages=None):
    return {
        "prompt": f"q{i}",
        "prompt_id": f"id{i}",
        "messages": messages or [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}],
    }


@pytest.mark.parametrize(
    "bad, problem",
    [
        ({"prompt": "q", "messages": []}, "missing key 'prompt_id'"),
        (
            good(messages=[{"role": "user", "content": "q"}, {"role": "assistant", "content": "  "}]),
            "messages[1] (assistant) has empty content",
        ),
        (good(messages=[{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]), "unknown role 'robot'"),
        (good(messages=[{"role": "user", "content": "q"}]), "no assistant reply"),
        ("{not json", "invalid JSON"),
    ],
)
def test_bad_row_is_named_by_file_and_line(tmp_path, bad, problem):
    src = write_lines(tmp_path / "chat.jsonl", [good(1), good(2), bad])
    with pytest.raises(DataError) as err:
        prepare(str(src), tmp_path / "out")
    assert f"{src}:3" in str(err.value) and problem in str(err.value)
    assert not (tmp_path / "out" / "train.jsonl").exists()  # nothing half-written


def test_skip_invalid_counts_and_keeps_the_rest(tmp_path):
    rows = [good(i) for i in range(10)] + [good(99, [{"role": "user", "content": "only a question"}])]
    result = prepare(str(write_lines(tmp_path / "c.jsonl", rows)), tmp_path / "out", skip_invalid=True)
    assert len(result.skipped) == 1 and "c.jsonl:11" in result.skipped[0]
    assert result.train + result.test == 10


def test_failed_prepare_leaves_previous_output_intact(tmp_path):
    out = tmp_path / "out"
    prepare(str(write_lines(tmp_path / "ok.jsonl", [good(i) for i in range(10)])), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(DataError):
        prepare(str(write_lines(tmp_path / "bad.jsonl", [good(1), "{"])), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_split_is_deterministic_and_never_shares_a_prompt_id():
    rows = generate_sample(300, seed=3)
    rows += [dict(rows[0], prompt="a repeat of the same conversation id")]  # same prompt_id twice
    train1, test1 = split_rows(rows, 0.2, seed=7)
    train2, test2 = split_rows(rows, 0.2, seed=7)
    assert train1 == train2 and test1 == test2
    assert not {r["prompt_id"] for r in train1} & {r["prompt_id"] for r in test1}
    assert len({r["prompt_id"] for r in test1}) == 60
    assert split_rows(rows, 0.2, seed=8)[1] != test1


def test_eval_row_takes_last_question_and_history_in_prompt_flow_shape():
    row = good(
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "Hi, I am Ann."},
            {"role": "assistant", "content": "Hello Ann!"},
            {"role": "user", "content": "Capital of Peru?"},
            {"role": "assistant", "content": "Lima."},
            {"role": "user", "content": "trailing question with no answer"},
        ]
    )
    assert eval_row(row) == {
        "prompt_id": "id0",
        "question": "Capital of Peru?",
        "ground_truth": "Lima.",
        "chat_history": [{"inputs": {"question": "Hi, I am Ann."}, "outputs": {"answer": "Hello Ann!"}}],
    }


def test_sample_source_writes_three_consistent_files(tmp_path):
    result = prepare("sample", tmp_path)
    train, test, evals = (read_jsonl(tmp_path / f) for f in ("train.jsonl", "test.jsonl", "eval.jsonl"))
    assert (len(train), len(test), len(evals)) == (480, 120, 120) == (result.train, result.test, result.eval)
    assert [e["prompt_id"] for e in evals] == [r["prompt_id"] for r in test]
    assert any(e["chat_history"] for e in evals)  # some held-out rows are multi-turn
    assert generate_sample(50, seed=0) == generate_sample(50, seed=0) != generate_sample(50, seed=1)


def test_parquet_and_json_inputs(tmp_path):
    import pandas as pd

    rows = [good(i) for i in range(10)]
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    (tmp_path / "c.json").write_text(json.dumps(rows))
    for name in ("c.parquet", "c.json"):
        result = prepare(str(tmp_path / name), tmp_path / name.replace(".", "_"))
        assert result.train + result.test == 10
    assert read_jsonl(tmp_path / "c_parquet" / "eval.jsonl")[0]["question"].startswith("q")


@pytest.mark.skipif(not ULTRACHAT40.exists(), reason="shared UltraChat rows not present")
def test_real_ultrachat_rows_go_through_unchanged(tmp_path):
    result = prepare(str(ULTRACHAT40), tmp_path)
    assert result.train + result.test == 40 and not result.skipped
    source = {r["prompt_id"]: r for r in read_jsonl(ULTRACHAT40)}
    for row in read_jsonl(tmp_path / "train.jsonl") + read_jsonl(tmp_path / "test.jsonl"):
        assert row == source[row["prompt_id"]]
    for e in read_jsonl(tmp_path / "eval.jsonl"):
        messages = source[e["prompt_id"]]["messages"]
        assert e["ground_truth"] == messages[-1]["content"] and e["question"] == messages[-2]["content"]
        assert len(e["chat_history"]) == (len(messages) - 2) // 2


@pytest.mark.slow
def test_cli_reports_bad_input_without_a_traceback(tmp_path):
    src = write_lines(tmp_path / "c.jsonl", [good(1), good(2, [{"role": "user", "content": "q"}])])
    done = subprocess.run(
        [str(BIN / "finetune-phi"), "data", "--source", str(src), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert f"{src}:2: no assistant reply" in done.stderr and "Traceback" not in done.stderr


def test_a_write_that_fails_half_way_puts_the_previous_set_back_byte_for_byte(tmp_path, monkeypatch):
    """A full disk (or an immutable file) at the second file's rename: readers that know nothing of the
    manifest (`pf run create --data`, pandas) must not find a new train.jsonl beside the old test.jsonl."""
    import os

    out = tmp_path / "data"
    prepare("sample", out, sample_size=60)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_replace, renames = os.replace, []

    def full_disk_at_the_second_file(src, dst):
        renames.append(dst)
        if str(dst).endswith("test.jsonl") and len([r for r in renames if str(r).endswith("test.jsonl")]) == 1:
            raise OSError(28, "No space left on device", str(dst))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "replace", full_disk_at_the_second_file)
    with pytest.raises(Exception, match="No space left"):
        prepare("sample", out, sample_size=80, seed=1)
    monkeypatch.undo()
    assert any(str(r).endswith("train.jsonl") for r in renames)  # the new train.jsonl had been put in place
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # ... and the old one is back, nothing else left
    assert len(read_jsonl(out / "train.jsonl")) + len(read_jsonl(out / "test.jsonl")) == 60


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600)])
def test_data_files_follow_the_umask(tmp_path, umask, mode):
    import os

    old = os.umask(umask)
    try:
        prepare("sample", tmp_path / "data", sample_size=40)
        prepare("sample", tmp_path / "data", sample_size=40, seed=2)  # a re-run keeps the modes too
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in (tmp_path / "data").iterdir()} == {oct(mode)}
