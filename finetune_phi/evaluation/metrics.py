"""Reference-based answer metrics that need no LLM judge and no network.

token F1: azure-ai-evaluation's F1ScoreEvaluator (SQuAD-style);  ROUGE-L: rouge-score, with a
Unicode-aware tokenizer (its default drops every non-ASCII letter);  BLEU and chrF: sacrebleu
(no NLTK downloads);  exact match and answer length: a few lines here. All in [0, 1] except length.
"""

from __future__ import annotations

import re
import unicodedata
from functools import lru_cache


METRICS = ("f1_score", "rouge_l", "bleu", "chrf", "exact_match", "answer_length")


class _UnicodeTokenizer:
    """Lower-cased word tokens of any script, for rouge-score."""

    def tokenize(self, text: str) -> list[str]:
        return re.findall(r"\w+", text.casefold())


@lru_cache(maxsize=1)
def _rouge():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], tokenizer=_UnicodeTokenizer())


@lru_cache(maxsize=1)
def _f1():
    from azure.ai.evaluation import (
        F1ScoreEvaluator,  # slow import (~5 s): only when scoring
    )

    return F1ScoreEvaluator()


def normalize(text: str) -> str:
    """Case-folded, punctuation dropped, whitespace collapsed."""
    text = "".join(" " if unicodedata.category(c).startswith("P") else c for c in text.casefold())
    return " ".join(text.split())


def score_line(answer: str | None, ground_truth: str | None) -> dict:
    """The eval flows' line: every metric and `failed`. A line without a reference cannot be scored: it is marked
    failed (and counted by the aggregation) rather than raised, since a batch run leaves raised lines out of its
    aggregation node, which would then undercount them."""
    if not ground_truth or not ground_truth.strip():
        return score("", "") | {"failed": True}
    return score(answer, ground_truth) | {"failed": False}


def score(answer: str | None, ground_truth: str) -> dict:
    """All metrics for one answer. An empty or missing answer scores 0 (length 0)."""
    import sacrebleu

    answer = answer or ""
    if not answer.strip():
        return dict.fromkeys(METRICS, 0.0) | {"answer_length": 0}
    return {
        "f1_score": float(_f1()(response=answer, ground_truth=ground_truth)["f1_score"]),
        "rouge_l": _rouge().score(ground_truth, answer)["rougeL"].fmeasure,
        "bleu": sacrebleu.sentence_bleu(answer, [ground_truth], tokenize="intl").score / 100,
        "chrf": sacrebleu.sentence_chrf(answer, [ground_truth]).score / 100,
        "exact_match": float(normalize(answer) == normalize(ground_truth)),
        "answer_length": len(answer.split()),
    }


def aggregate(lines: list[dict | None]) -> dict:
    """Means over scored lines plus counts; a None line is one whose answer never came (failed)."""
    scored = [line for line in lines if line is not None and not line.get("failed")]
    summary = {"lines_scored": len(scored), "lines_failed": len(lines) - len(scored)}
    for m in METRICS:
        summary[m] = sum(line[m] for line in scored) / len(scored) if scored else 0.0
    return summary
