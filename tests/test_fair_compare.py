"""`finetune-phi compare` is fair: transient endpoint failures are retried, a line that failed on either side
is left out of every paired statistic on both sides, sampling is greedy unless asked, too many failures
make it exit non-zero (report written), and a comparison killed half way is continued with --resume to
the table an uninterrupted run gives.

The endpoint here is tests/standin.py, an HTTP stand-in on 127.0.0.1 for a remote Azure ML endpoint (which
cannot be reached from here): both of its deployments answer every question with the same text, so the
true difference is exactly 0, and it serves planned faults (503 + Retry-After, 429, resets, a line that
always fails on one deployment). The real `finetune-phi compare` runs through the real `pf` (and the Agent
Framework twins); determinism on real weights is in test_real_model.
"""

import json
import os
import signal
import subprocess

import psutil
import pytest
from standin import StandInEndpoint
from support import REPO, compare_command, compare_summary, wait_for


pytestmark = pytest.mark.slow
KEY = "s" * 32
MAF_PYTHON = REPO / ".venv-maf" / "bin" / "python"


def rows(n: int = 20) -> list[dict]:
    return [
        {
            "question": f"Question {i}: what do you know about topic {i}?",
            "chat_history": [],
            "ground_truth": f"Topic {i} is a subject with {i} known facts, studied by many people for years.",
        }
        for i in range(n)
    ]


def answer(question: str) -> str:
    """The same answer from both deployments: part of the reference, so scores differ between lines."""
    i = int(question.split()[1].rstrip(":"))
    return " ".join(
        f"Topic {i} is a subject with {i} known facts, studied by many people for years.".split()[: 4 + i % 9]
    )


@pytest.fixture
def standin(pf_home, request):
    from finetune_phi.serving.connection import connect

    server = StandInEndpoint({"base": answer, "ft": answer}, getattr(request, "param", {}), KEY)
    connect(server.url + "/score", KEY, name="standin")
    yield server
    server.close()


def compare(tmp_path, *args, timeout=600, **popen) -> subprocess.CompletedProcess:
    return subprocess.run(compare_command(tmp_path, *args), capture_output=True, text=True, timeout=timeout, **popen)


def write_rows(tmp_path, n: int = 20):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(n)))
    return data


Q = [r["question"] for r in rows()]
FAULTS = {
    ("ft", Q[1]): ["503:1"],
    ("ft", Q[2]): ["503:1", "503:1"],
    ("base", Q[3]): ["429:0"],
    ("ft", Q[4]): ["reset"],
    ("base", Q[5]): ["502", "504"],
    ("ft", Q[6]): ["503:1"],
    ("ft", Q[7]): ["always", "500"],
}  # ft fails line 7 for good


@pytest.mark.parametrize("standin", [FAULTS], indirect=True)
@pytest.mark.parametrize("runner", ["promptflow", "maf"])
def test_transient_failures_cost_no_line_and_a_one_sided_failure_is_left_out_on_both_sides(standin, runner, tmp_path):
    if runner == "maf" and not MAF_PYTHON.exists():
        pytest.skip("no .venv-maf: `make maf` creates it (`make test` does)")
    data = write_rows(tmp_path)
    done = compare(
        tmp_path, "--runner", runner, "--base", "base", "--candidate", "ft", "--data", str(data), "--name", "fair"
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    got = compare_summary(tmp_path, "fair")
    assert got["lines"] == {"total": 20, "paired": 19, "failed": {"base": 0, "ft": 1}}
    for row in got["rows"]:  # the true difference is 0, and so is every paired statistic
        assert row["base"] == row["candidate"] and row["delta"] == 0 and row["ci_low"] == row["ci_high"] == 0, row
    assert "19 of 20 paired; failed: base 0, ft 1" in done.stdout
    assert "19 of 20 paired" in (tmp_path / "reports" / "fair" / "compare.html").read_text()
    planned = sum(len([f for f in v if f not in ("always", "500")]) for v in FAULTS.values())
    assert standin.count() - standin.count("ok") - standin.count("500") == planned  # every transient fault was served
    assert all(body["temperature"] == 0 for body in standin.bodies)  # greedy unless --temperature says otherwise
    import pandas as pd

    lines = pd.read_csv(tmp_path / "reports" / "fair" / "lines.csv")
    failed = lines[lines["line"] == 7].iloc[0]
    assert not failed["paired"] and "HTTP 500" in failed["error_ft"] and pd.isna(failed["f1_score_ft"])
    assert failed["f1_score_base"] > 0 and pd.isna(failed["f1_score_delta"])  # the base's score kept, not compared
    assert list(lines["line"])[-1] == 7 and len(lines) == 20  # failed lines after the paired ones


@pytest.mark.parametrize(
    "standin", [{("ft", Q[0]): ["always", "400"], ("ft", Q[1]): ["always", "503:0"]}], indirect=True
)
def test_more_failures_than_max_failed_write_the_report_and_exit_non_zero(standin, tmp_path, monkeypatch):
    data = write_rows(tmp_path, 10)
    done = compare(
        tmp_path,
        "--base",
        "base",
        "--candidate",
        "ft",
        "--data",
        str(data),
        "--name",
        "lossy",
        "--temperature",
        "0.3",
        "--max-tokens",
        "40",
        env={**os.environ, "FINETUNE_PHI_RETRY_ATTEMPTS": "2"},
    )
    assert done.returncode == 2 and "too many lines failed (ft 2 of 10; --max-failed 5%)" in done.stderr
    assert "Traceback" not in done.stderr
    got = compare_summary(tmp_path, "lossy")
    assert got["lines"] == {"total": 10, "paired": 8, "failed": {"base": 0, "ft": 2}} and got["temperature"] == 0.3
    assert all(b["temperature"] == 0.3 and b["max_tokens"] == 40 for b in standin.bodies)
    import pandas as pd

    errors = pd.read_csv(tmp_path / "reports" / "lossy" / "lines.csv").set_index("line")["error_ft"]
    assert "HTTP 400" in errors[0] and "HTTP 503" in errors[1] and "gave up after 2 attempts" in errors[1]
    # the same deployment name on two connections: the runs carry the side, the table tells them apart
    done = compare(
        tmp_path,
        "--base",
        "ft",
        "--candidate",
        "ft",
        "--data",
        str(data),
        "--name",
        "same_name",
        "--max-failed",
        "100%",
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert compare_summary(tmp_path, "same_name")["lines"]["failed"] == {"ft_base": 2, "ft_candidate": 2}
    again = compare(tmp_path, "--base", "ft", "--candidate", "ft", "--data", str(data), "--name", "same_name")
    assert again.returncode == 2 and "--resume same_name" in again.stderr and "Traceback" not in again.stderr


@pytest.mark.parametrize("standin", [{("ft", Q[i]): ["always", "500"] for i in range(6)}], indirect=True)
def test_a_side_that_fails_every_line_still_gets_a_report(standin, tmp_path):
    data = write_rows(tmp_path, 6)
    done = compare(tmp_path, "--base", "base", "--candidate", "ft", "--data", str(data), "--name", "all_failed")
    assert done.returncode == 2 and "too many lines failed (ft 6 of 6" in done.stderr, (
        done.stdout[-2000:] + done.stderr[-2000:]
    )
    got = compare_summary(tmp_path, "all_failed")
    assert got["lines"] == {"total": 6, "paired": 0, "failed": {"base": 0, "ft": 6}}
    assert all(row["delta"] is None for row in got["rows"]) and "0 of 6 paired" in done.stdout


@pytest.mark.parametrize("runner", ["promptflow", "maf"])
def test_a_comparison_killed_half_way_resumes_to_the_uninterrupted_table(pf_home, tmp_path, runner):
    if runner == "maf" and not MAF_PYTHON.exists():
        pytest.skip("no .venv-maf: `make maf` creates it (`make test` does)")
    from finetune_phi.serving.connection import connect

    slow = StandInEndpoint({"base": answer, "ft": lambda q: answer(q) + " More."}, {}, KEY, delay=0.4)
    connect(slow.url + "/score", KEY, name="standin")
    data = write_rows(tmp_path, 16)
    try:
        args = ["--runner", runner, "--base", "base", "--candidate", "ft", "--data", str(data), "--workers", "2"]
        proc = subprocess.Popen(
            compare_command(tmp_path, *args, "--name", "killed"),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_for(lambda: slow.count() >= 6, "six answers before the kill", timeout=120, proc=proc)
        children = psutil.Process(proc.pid).children(recursive=True)  # pf's workers (or the maf runner), the watchdog
        assert len(children) >= 2
        proc.send_signal(signal.SIGKILL)  # compare alone, mid-run: no handler of its own can run
        proc.wait()
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"left running after compare was killed: {[p.cmdline()[:3] for p in alive]}"
        asked_before = slow.count()
        assert not (tmp_path / "reports" / "killed" / "summary.json").exists()
        resumed = compare(tmp_path, "--resume", "killed")
        assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
        assert "resuming killed" in resumed.stdout
        asked_after = slow.count() - asked_before
        assert asked_after <= 32 - asked_before + 2 * 2  # only lines without an answer (and those in flight) again
        whole = compare(tmp_path, *args, "--name", "whole")
        assert whole.returncode == 0, whole.stdout[-3000:] + whole.stderr[-3000:]
    finally:
        slow.close()
    a, b = compare_summary(tmp_path, "killed"), compare_summary(tmp_path, "whole")
    assert a["rows"] == b["rows"] and a["lines"] == b["lines"] == {
        "total": 16,
        "paired": 16,
        "failed": {"base": 0, "ft": 0},
    }
    assert a["rows"][0]["delta"] != 0  # the candidate's answers differ: a real table, not all zeros
