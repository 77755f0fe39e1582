"""Evaluation: metric values, the eval flow through real `pf` batch runs, the comparison and its report."""

import json
import re
import subprocess

import pytest
from support import BIN, EVAL_ROWS, REPO

from finetune_phi.data.read import read_jsonl
from finetune_phi.evaluation import metrics, report


@pytest.mark.parametrize(
    "answer, truth, metric, expected",
    [
        (
            "The capital of France is Paris.",
            "Paris is the capital of France",
            "f1_score",
            1.0,
        ),  # order, articles, punctuation
        ("Paris", "The capital is Paris", "f1_score", 0.5),  # P = 1, R = 1/3
        ("the cat is on the mat", "the cat sat on the mat", "rouge_l", 5 / 6),  # LCS of 5 in 6 tokens each
        ("東京 は 首都", "東京 は 首都 です", "rouge_l", 6 / 7),  # P = 1, R = 3/4: non-ASCII words count
        ("naïve café", "Naïve café!", "exact_match", 1.0),
        ("naïve café", "naive cafe", "exact_match", 0.0),
        ("The opposite of hot is cold.", "The opposite of hot is cold.", "bleu", 1.0),
        ("The opposite of hot is cold.", "The opposite of hot is cold.", "chrf", 1.0),
        ("one two three", "x", "answer_length", 3),
    ],
)
def test_metric_values_on_hand_worked_examples(answer, truth, metric, expected):
    assert metrics.score(answer, truth)[metric] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("empty", ["", "   ", None])
def test_empty_answer_scores_zero(empty):
    assert metrics.score(empty, "Paris") == dict.fromkeys(metrics.METRICS, 0)


def test_partial_overlap_scores_between_zero_and_one():
    s = metrics.score("The capital of Peru is Quito.", "The capital of Peru is Lima.")
    assert 0 < s["bleu"] < s["rouge_l"] < 1 and 0 < s["chrf"] < 1 and s["exact_match"] == 0


def test_aggregate_means_and_counts():
    a, b = metrics.score("Paris", "The capital is Paris"), metrics.score("x y", "x y")
    summary = metrics.aggregate([a, b, {**a, "failed": True}, None])
    assert summary["lines_scored"] == 2 and summary["lines_failed"] == 2
    assert summary["f1_score"] == pytest.approx((0.5 + 1.0) / 2)


@pytest.mark.slow
def test_eval_flow_batch_run_logs_means_and_counts(eval_flow_run):
    from promptflow.client import PFClient

    name, _ = eval_flow_run
    logged = PFClient().get_metrics(name)  # what `pf run show-metrics` prints (the CLI: test_pf_run_create_...)
    scored = [None if not r["ground_truth"] else metrics.score(r["answer"], r["ground_truth"]) for r in EVAL_ROWS]
    expected = metrics.aggregate(scored)
    assert logged["lines_scored"] == 4 and logged["lines_failed"] == 1  # the line without a reference
    for m in metrics.METRICS:
        assert logged[m] == pytest.approx(expected[m])


def side(label, scores, failed=()):
    lines = [None if i in failed else dict.fromkeys(metrics.METRICS, s) for i, s in enumerate(scores)]
    return report.Side(
        label,
        f"{label}_chat",
        f"{label}_eval",
        lines,
        [None if i in failed else f"answer {i}" for i in range(len(scores))],
        1.0,
        {},
    )


def test_paired_bootstrap_on_known_deltas():
    assert report.paired_bootstrap([0.25] * 40) == pytest.approx((0.25, 0.25, 0.25))
    mean, lo, hi = report.paired_bootstrap([1.0, -1.0] * 50)  # mean 0, standard error 0.1
    assert mean == 0 and lo == pytest.approx(-0.196, abs=0.03) and hi == pytest.approx(0.196, abs=0.03)


def test_pairing_finds_a_small_consistent_gain_that_noise_between_lines_would_hide():
    base_scores = [i / 39 for i in range(40)]  # lines differ a lot in difficulty
    base, cand = side("base", base_scores), side("ft", [s + 0.05 for s in base_scores])
    row = next(r for r in report.table(base, cand) if r["metric"] == "f1_score")
    assert (
        row["delta"] == pytest.approx(0.05)
        and row["ci_low"] == pytest.approx(0.05)
        and row["ci_high"] == pytest.approx(0.05)
    )
    assert row["base"] == pytest.approx(0.5) and row["candidate"] == pytest.approx(0.55)


def test_a_line_failed_on_one_side_is_left_out_on_both_and_counted():
    base, cand = side("base", [0.2, 0.2, 0.2, 0.9]), side("ft", [0.8, 0.8, 0.8, 0.0], failed={3})
    row = next(r for r in report.table(base, cand) if r["metric"] == "rouge_l")
    # line 3 (base 0.9, ft no answer) counts against neither side: 3 paired lines
    assert (
        row["base"] == pytest.approx(0.2)
        and row["candidate"] == pytest.approx(0.8)
        and row["delta"] == pytest.approx(0.6)
    )
    assert report.line_counts(base, cand) == {"total": 4, "paired": 3, "failed": {"base": 0, "ft": 1}}
    assert "3 of 4 paired; failed: base 0, ft 1" in report.format_table(report.table(base, cand), base, cand, None)
    nothing = report.table(base, side("ft", [0.5] * 4, failed={0, 1, 2, 3}))
    assert all(r["delta"] is None and r["base"] is None for r in nothing)


def test_cells_a_spreadsheet_would_run_are_neutralised(tmp_path):
    rows = [
        {"question": '=HYPERLINK("http://x","y")', "ground_truth": "@SUM(A1)"},
        {"question": "-2+3", "ground_truth": "ok"},
    ]
    base, cand = side("base", [0.5, 0.5]), side("ft", [0.5, 0.5])
    frame = report.per_line_frame(rows, base, cand)
    assert set(frame["question"]) == {'\'=HYPERLINK("http://x","y")', "'-2+3"} and "'@SUM(A1)" in set(
        frame["ground_truth"]
    )
    assert report.spreadsheet_safe("fine") == "fine" and report.spreadsheet_safe(0.5) == 0.5


def test_report_files_work_offline_and_list_worst_regressions_first(tmp_path):
    rows = [{"question": f"q{i}", "ground_truth": f"t{i}"} for i in range(4)]
    base, cand = side("base", [0.5, 0.5, 0.9, 0.1]), side("ft", [0.6, 0.2, 0.9, 0.8])
    table = report.table(base, cand)
    paths = report.write_report(
        tmp_path, "unit", table, base, cand, {"base": 3.0, "candidate": 1.0}, report.per_line_frame(rows, base, cand)
    )
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = paths["html"].read_text()
    assert "<script" not in page and not re.search(r"""(src|href)=["']?(https?:)?//""", page)
    assert 'src="data:image/png;base64,' in page and "held-out loss" in page
    assert "f1_score" in paths["md"].read_text()
    import pandas as pd

    frame = pd.read_csv(paths["csv"])
    assert list(frame["line"]) == [1, 2, 0, 3]  # F1 deltas -0.3, 0, +0.1, +0.7
    assert {"question", "ground_truth", "answer_base", "answer_ft", "f1_score_delta"} <= set(frame.columns)


@pytest.mark.slow
def test_pf_run_create_commands_as_a_user_types_them(connected, sample_data, tmp_path):
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in read_jsonl(sample_data / "eval.jsonl")[:5]))
    name = tmp_path.name
    pf = str(BIN / "pf")
    chat = subprocess.run(
        [
            pf,
            "run",
            "create",
            "--flow",
            str(REPO / "flows" / "chat"),
            "--data",
            str(data),
            "--name",
            f"chat_ft_{name}",
            "--column-mapping",
            "question=${data.question}",
            "chat_history=${data.chat_history}",
            "deployment=ft",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert chat.returncode == 0, chat.stdout[-2000:]
    ev = subprocess.run(
        [
            pf,
            "run",
            "create",
            "--flow",
            str(REPO / "flows" / "eval"),
            "--data",
            str(data),
            "--run",
            f"chat_ft_{name}",
            "--name",
            f"eval_ft_{name}",
            "--column-mapping",
            "question=${data.question}",
            "ground_truth=${data.ground_truth}",
            "answer=${run.outputs.answer}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ev.returncode == 0, ev.stdout[-2000:]
    shown = subprocess.run(
        [pf, "run", "show-metrics", "--name", f"eval_ft_{name}"], capture_output=True, text=True, timeout=120
    )
    logged = json.loads(shown.stdout[shown.stdout.index("{") :])
    assert logged["lines_scored"] == 5 and logged["f1_score"] > 0.3  # the fine-tuned model answers in shape


def test_an_azure_ai_project_reaches_evaluate_in_the_form_azure_ai_evaluation_accepts():
    """--azure-ai-project, built and checked offline (a Foundry project cannot be reached here): both spellings
    become what evaluate(azure_ai_project=...) takes, as azure-ai-evaluation's own check reads it."""
    from azure.ai.evaluation._common.utils import validate_azure_ai_project

    from finetune_phi.evaluation.compare import CompareConfig

    by_ids = CompareConfig("b", "c", runner="maf", azure_ai_project="0000-sub/my-rg/my-project").ai_project()
    assert by_ids == {"subscription_id": "0000-sub", "resource_group_name": "my-rg", "project_name": "my-project"}
    url = "https://my-resource.services.ai.azure.com/api/projects/my-project"
    for value in (by_ids, CompareConfig("b", "c", runner="maf", azure_ai_project=url).ai_project()):
        assert validate_azure_ai_project(value) == value
    assert CompareConfig("b", "c").ai_project() is None
