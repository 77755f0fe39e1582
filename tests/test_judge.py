"""The pairwise judge: MT-Bench's protocol (both orders, [[A]]/[[B]]/[[C]], disagreement = tie, anything else a
parse failure), its statistics, and `finetune-phi compare --judge` with both runners.

The judge model (Azure OpenAI / OpenAI) cannot be reached from here, so it is tests/standin.py's StandInJudge,
an OpenAI-compatible HTTP server on 127.0.0.1 with planted behaviour: one that prefers by content (an exact,
known win rate), one that always answers [[A]] (all ties, consistency 0), one with replies without a verdict
(counted), one that answers 429 + Retry-After first (retried). The endpoint under comparison is
tests/standin.py's StandInEndpoint (see test_fair_compare).
"""

import json
import re
import subprocess

import pytest
from standin import StandInEndpoint, StandInJudge
from support import REPO, compare_command, compare_summary

from finetune_phi.evaluation import judge as J


KEY = "s" * 32


def answer_of(messages: list[dict], slot: str) -> str:
    text = messages[-1]["content"]
    return re.search(
        rf"\[The Start of Assistant {slot}'s Answer\]\n(.*)\n\[The End of Assistant {slot}'s Answer\]", text, re.S
    ).group(1)


def by_content(messages: list[dict]) -> str:
    """Prefers the answer that says GOOD; a tie when both or neither do."""
    a, b = ("GOOD" in answer_of(messages, s) for s in ("A", "B"))
    return "Both are alike. [[C]]" if a == b else ("A is better. [[A]]" if a else "B is better. [[B]]")


@pytest.mark.parametrize(
    "reply, verdict",
    [
        ("...so [[A]]", "A"),
        ("[[A]] at first, but in the end [[B]]", "B"),
        ("a tie: [[C]]", "C"),
        ("A is better", None),
        ("[A]", None),
        ("", None),
    ],
)
def test_the_verdict_is_the_last_double_bracket(reply, verdict):
    assert J.parse_verdict(reply) == verdict


def test_both_orders_agreeing_decide_and_disagreeing_tie():
    # game 1: base in slot A; game 2: candidate in slot A
    assert J.outcome("B", "A") == ("win", True) and J.outcome("A", "B") == ("loss", True)
    assert J.outcome("A", "A") == ("tie", False) and J.outcome("C", "C") == ("tie", True)
    assert J.outcome("B", None) == (None, None)


def test_summary_counts_rates_and_a_length_control_that_sees_through_length():
    results = (
        [{"verdict_1": "B", "verdict_2": "A"}] * 6
        + [{"verdict_1": "A", "verdict_2": "B"}] * 2
        + [{"verdict_1": "A", "verdict_2": "A"}] * 2
        + [{"verdict_1": "B", "verdict_2": "junk"}]
    )
    s = J.summarize(results, [0.0] * len(results), "m")
    assert (s["n"], s["wins"], s["losses"], s["ties"], s["parse_failures"]) == (10, 6, 2, 2, 1)
    assert s["win_rate"] == pytest.approx(0.7) and s["ci_low"] < 0.7 < s["ci_high"]
    assert s["position_consistency"] == pytest.approx(0.8)
    assert s["first_slot_rate"] == pytest.approx(12 / 21)  # 21 games with a verdict, 12 of them [[A]]
    assert s["lc_win_rate"] == pytest.approx(0.7, abs=1e-6)  # lengths explain nothing: the win rate itself
    # wins that come with longer answers only: length control pulls the rate back towards 0.5
    values = [1.0] * 10 + [0.0] * 10
    longer = [50.0] * 10 + [-50.0] * 10
    assert J.length_controlled(values + [0.5] * 4, longer + [0.0] * 4) == pytest.approx(0.5, abs=0.01)


def test_prompt_carries_history_reference_and_both_answers():
    history = [{"inputs": {"question": "Hi"}, "outputs": {"answer": "Hello!"}}]
    messages = J.prompt("What next?", history, "the reference", "answer one", "answer two")
    assert messages[0]["role"] == "system" and "[[C]]" in messages[0]["content"]
    user = messages[1]["content"]
    assert "Hello!" in user and "the reference" in user and answer_of(messages, "A") == "answer one"
    assert answer_of(messages, "B") == "answer two"


def rows(n: int = 16) -> list[dict]:
    return [{"question": f"Question {i}?", "chat_history": [], "ground_truth": f"Reference {i}."} for i in range(n)]


def base_answer(q: str) -> str:
    i = int(q.split()[1].rstrip("?"))
    return f"Base answer {i}" + (" GOOD" if i in (12, 13) else "")


def cand_answer(q: str) -> str:
    i = int(q.split()[1].rstrip("?"))
    return f"Candidate answer {i} with more words" + (" GOOD" if i < 12 else "")


@pytest.fixture
def setting(pf_home, tmp_path):
    from promptflow.client import PFClient
    from promptflow.connections import OpenAIConnection

    from finetune_phi.serving.connection import connect

    endpoint = StandInEndpoint({"base": base_answer, "ft": cand_answer}, {}, KEY)
    connect(endpoint.url + "/score", KEY, name="standin")
    judges = {}

    def judge(name: str, reply, faults=None) -> StandInJudge:
        j = judges[name] = StandInJudge(reply, faults)
        PFClient().connections.create_or_update(OpenAIConnection(name=name, api_key=j.key, base_url=j.url))
        return j

    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    yield judge, data
    endpoint.close()
    for j in judges.values():
        j.close()


def compare(tmp_path, data, *args) -> subprocess.CompletedProcess:
    command = compare_command(tmp_path, "--base", "base", "--candidate", "ft", "--data", str(data), *args)
    return subprocess.run(command, capture_output=True, text=True, timeout=600)


def judge_and_evaluators(messages: list[dict]) -> str:
    """A judge for the pairwise prompts (by_content) and for Azure AI Evaluation's prompty evaluators: a JSON
    score of 5 for an answer that says GOOD, else 2; for line 3 a reply the evaluator cannot read."""
    if "[[C]]" in messages[0]["content"]:
        return by_content(messages)
    text = messages[-1]["content"]
    if re.search(r"answer 3\b", text):
        return "I would rather not say."
    return json.dumps(
        {"reason": "Let's think step by step: planted.", "score": 5 if "GOOD" in text else 2, "status": "completed"}
    )


@pytest.mark.slow
def test_judged_by_content_both_runners_give_the_known_win_rate_evaluator_means_and_a_rerun_asks_nothing(
    setting, tmp_path
):
    """The pairwise verdicts (a judge that prefers by content: an exact, known win rate) and, with
    --judge-evaluators, azure-ai-evaluation's own Coherence/Fluency/Relevance/Similarity evaluators given the
    judge connection as their OpenAIModelConfiguration: means and paired CIs beside the lexical metrics, a reply
    without a score counted (not a number). Both runners agree; the twin's run asks the judge nothing more."""
    make_judge, data = setting
    judge = make_judge("content_judge", judge_and_evaluators, faults=["429:1", "503:0"])  # retried, not lost
    names = "coherence,fluency,relevance,similarity"
    got = {}
    for runner in ("promptflow", "maf"):
        if runner == "maf" and not (REPO / ".venv-maf" / "bin" / "python").exists():
            continue
        done = compare(
            tmp_path,
            data,
            "--runner",
            runner,
            "--name",
            f"judged_{runner}",
            "--judge",
            "content_judge",
            "--judge-model",
            "content-v1",
            "--judge-evaluators",
            names,
        )
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        got[runner] = compare_summary(tmp_path, f"judged_{runner}")
        if runner == "promptflow":
            asked = judge.asked
            # both orders of 16 lines, the two planted faults retried; 4 evaluators x 2 answers x 16 lines
            assert asked == 2 * 16 + 2 + 4 * 2 * 16
            assert "ft wins 12, loses 2, ties 2 of 16 -> win rate 0.812" in done.stdout
            assert "judge, 1-5, 15 lines (1 unscored)" in done.stdout
    j = got["promptflow"]["judge"]
    assert (j["n"], j["wins"], j["losses"], j["ties"], j["parse_failures"], j["failed"]) == (16, 12, 2, 2, 0, 0)
    assert j["win_rate"] == pytest.approx(13 / 16) and j["ci_low"] < 13 / 16 < j["ci_high"]
    assert j["position_consistency"] == 1.0 and j["first_slot_rate"] == pytest.approx(14 / 32)
    assert j["model"] == "content-v1" and 0 < j["lc_win_rate"] < 1
    rows = {r["metric"]: r for r in got["promptflow"]["rows"]}
    for name in names.split(","):  # line 3 unscored; GOOD: the candidate on lines 0-11, the base on 12-13
        r = rows[name]
        assert (r["n"], r["unscored"], r["scale"]) == (15, 1, "1-5")
        assert r["candidate"] == pytest.approx(63 / 15) and r["base"] == pytest.approx(36 / 15)
        assert r["delta"] == pytest.approx(27 / 15) and r["ci_low"] < r["delta"] < r["ci_high"]
    assert "scale" not in rows["f1_score"] and rows["f1_score"]["delta"] is not None  # the lexical rows beside them
    if "maf" in got:  # the same verdicts and scores from the Agent Framework twin, all from the cache
        maf_rows = {r["metric"]: r for r in got["maf"]["rows"]}
        assert got["maf"]["judge"] == j and all(maf_rows[n] == rows[n] for n in names.split(","))
        assert judge.asked == asked
    import pandas as pd

    lines = pd.read_csv(tmp_path / "reports" / "judged_promptflow" / "lines.csv").set_index("line")
    assert (lines.loc[0, "judge_verdict_1"], lines.loc[0, "judge_verdict_2"], lines.loc[0, "judge_outcome"]) == (
        "B",
        "A",
        "win",
    )
    assert "better" in lines.loc[0, "judge_reason_1"]
    assert (lines.loc[0, "coherence_ft"], lines.loc[0, "coherence_base"]) == (5, 2) and pd.isna(
        lines.loc[3, "fluency_ft"]
    )
    assert "judge content-v1" in (tmp_path / "reports" / "judged_promptflow" / "compare.html").read_text()
    wrong = compare(tmp_path, data, "--name", "bad_evaluator", "--judge", "content_judge", "--judge-evaluators", "wit")
    assert wrong.returncode == 2 and "unknown judge evaluator wit" in wrong.stderr


@pytest.mark.slow
def test_a_judge_that_always_picks_slot_a_gives_ties_and_replies_without_a_verdict_are_counted(setting, tmp_path):
    make_judge, data = setting
    data.write_text("".join(json.dumps(r) + "\n" for r in rows(8)))  # 8 lines are enough here
    make_judge("first_slot_judge", lambda messages: "The first one. [[A]]")
    done = compare(tmp_path, data, "--name", "slot_a", "--judge", "first_slot_judge", "--judge-model", "always-a")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    j = compare_summary(tmp_path, "slot_a")["judge"]
    assert (j["n"], j["ties"], j["win_rate"], j["position_consistency"], j["first_slot_rate"]) == (8, 8, 0.5, 0.0, 1.0)

    def sometimes_no_verdict(messages):
        return "I cannot decide." if "Question 3?" in messages[-1]["content"] else by_content(messages)

    make_judge("vague_judge", sometimes_no_verdict)
    done = compare(tmp_path, data, "--name", "vague", "--judge", "vague_judge", "--judge-model", "vague-v1")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    j = compare_summary(tmp_path, "vague")["judge"]
    assert j["parse_failures"] == 2 and j["n"] == 7 and j["wins"] == 7  # line 3 is not judged, not a tie
    wrong = compare(tmp_path, data, "--name", "wrong_type", "--judge", "standin")
    assert wrong.returncode == 2 and "a judge connection is of type open_ai or azure_open_ai" in wrong.stderr
